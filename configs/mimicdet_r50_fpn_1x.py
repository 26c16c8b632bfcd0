"""MimicDet, ResNet-50 FPN, 1x (90k steps, batch 16) on COCO 2017 (SPEC.md section 5)."""
from configs import common


def get_config():
  c = common.base_config()
  c.model.dtype = 'bfloat16'
  c.model.backbone.arch = 'resnet50'
  c.model.backbone_init = 'weights/resnet50'
  return c
