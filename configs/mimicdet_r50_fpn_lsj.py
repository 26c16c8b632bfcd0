"""MimicDet, ResNet-50 FPN, large-scale jitter on one 1024 x 1024 canvas with
detectron2's 100-epoch LSJ schedule (docs/TRAINING.md, "Large-scale jitter")."""
from configs import common


def get_config():
  c = common.base_config()
  c.model.dtype = 'bfloat16'
  c.model.backbone.arch = 'resnet50'
  c.model.backbone_init = 'weights/resnet50'
  c.data.augment = 'lsj'  # one compiled training canvas, not three buckets
  c.data.lsj_size = 1024
  c.data.lsj_scale = (0.1, 2.0)
  # detectron2 new_baselines R50 100ep LSJ: the shortest schedule LSJ is published with (it pays only when long).
  c.train.batch_size = 64
  c.train.total_steps = 184375  # 100 epochs of COCO train2017 at 64 images
  c.optim.base_lr = 0.1
  c.optim.base_batch_size = 64  # 0.1 at 64 images, as detectron2
  c.optim.weight_decay = 4e-5
  c.optim.warmup_steps = 500
  c.optim.warmup_factor = 0.067
  c.optim.decay_steps = (163889, 177546)
  return c
