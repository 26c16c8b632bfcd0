"""MimicDet, ResNet-101 FPN, 2x (180k steps; lr x0.1 at 120k and 160k) on COCO 2017."""
from configs import common


def get_config():
  c = common.base_config()
  c.model.dtype = 'bfloat16'
  c.model.backbone.arch = 'resnet101'
  c.model.backbone_init = 'weights/resnet101'
  c.train.total_steps = 180000
  c.optim.decay_steps = (120000, 160000)
  return c
