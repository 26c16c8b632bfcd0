"""MimicDet in JAX/Flax."""
