"""Training targets, pure jnp on padded arrays (SPEC 3; choices in docs/LOSSES.md).

refine.py        gt -> level/position assignment and sampled positions (L_R)
proposals.py     fixed-size proposals from the refined boxes, with origins
roi_sampling.py  IoU labelling and balanced sampling (T-head, S-head)
"""
