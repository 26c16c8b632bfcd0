"""Training losses (SPEC 3; choices in docs/LOSSES.md).

detection.py  BCE / focal / CE / L1 and the refine, T-head, S-head (OHEM) losses
mimic.py      dual-path mimic distances and variants
total.py      make_loss_fn: the whole MimicDet loss with diagnostics
"""
