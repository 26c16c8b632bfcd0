"""MimicDet, ResNeXt-101 64x4d FPN, 2x with multi-scale training (640..800)."""
from configs import common


def get_config():
  c = common.base_config()
  c.data.train_min_sizes = (640, 672, 704, 736, 768, 800)
  c.model.dtype = 'bfloat16'
  c.model.backbone.arch = 'resnext101_64x4d'
  c.model.backbone_init = 'weights/resnext101_64x4d'
  c.model.backbone.remat = True
  c.train.total_steps = 180000
  c.optim.decay_steps = (120000, 160000)
  return c
