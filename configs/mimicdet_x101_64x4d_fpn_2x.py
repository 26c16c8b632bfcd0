"""MimicDet, ResNeXt-101 64x4d FPN, 2x with multi-scale training (640..800)."""
from configs import common


def get_config():
  c = common.base_config()
  c.data.train_min_sizes = (640, 672, 704, 736, 768, 800)
  c.model.dtype = 'bfloat16'
  c.model.backbone.arch = 'resnext101_64x4d'
  c.model.backbone_init = 'weights/resnext101_64x4d'
  # No remat (common.py's default): at its 2 images per chip the step needs
  # 5.3 GB of a TPU chip's HBM without it, and remat costs 1.26x the flops
  # and 1.18x the bytes (docs/BENCHMARKS.md, "X101 without remat"). Turn it
  # on (--config.model.backbone.remat=true) where the step does not fit
  # (python -m mimicdet_jax.tools.plan_tpu says so, and how much it lacks).
  c.train.total_steps = 180000
  c.optim.decay_steps = (120000, 160000)
  return c
