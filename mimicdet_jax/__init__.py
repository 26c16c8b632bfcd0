"""MimicDet in JAX/Flax: a one-stage head trained to mimic a two-stage head."""
