"""The demo recipe for your own photographs: the demo, then an S-head finishing phase.

configs/demo.py's 2200 joint steps, bit for bit, then 1100 steps in which the
S-head alone learns against the teacher as it stands (train.s_head_finish_steps,
docs/TRAINING.md), its learning rate restarted at the demo's peak and decayed
on its own (E27 in docs/S_HEAD_GAP.md; chosen on the glyphs, then measured
on the shapes, the proxy and the crowds): docs/RESULTS.md, "Recipe for own
photographs". The data paths default to the real-image proxy
(data/photos, `make proxy-data`).

Point the data at your COCO-format set:
  python train.py --config configs/photos.py --workdir workdirs/mine \\
      --config.data.train_annotations=... --config.data.train_images=... \\
      --config.data.val_annotations=... --config.data.val_images=...
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.data.train_annotations = 'data/photos/annotations/train.json'  # the proxy
  c.data.train_images = 'data/photos/train'
  c.data.val_annotations = 'data/photos/annotations/val.json'
  c.data.val_images = 'data/photos/val'
  c.train.total_steps = 3300  # the demo's 2200, then the S-head's 1100 (E27)
  c.train.s_head_finish_steps = 1100
  c.train.s_head_finish_lr_mult = 100.0  # the decayed lr x100: the demo's peak (E27)
  c.optim.decay_steps = (1760, 2053, 2860, 3153)  # the demo's two, then the phase's
  return c
