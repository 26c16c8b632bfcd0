"""The demo recipe on the real-image proxy (data/photos, `make proxy-data`).

Only the data paths differ from configs/demo.py, so S-head / T-head figures
on the two data sets compare the same recipe (widths, lr, steps, seed).
The proxy's images are 192..384 px a side; data.min_size = data.max_size =
256 (the demo's) brings the longer side to 256, so the 256 x 256 canvas
holds every image. The number of classes (12) comes from the annotation
file (data.num_classes = -1).
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.data.train_annotations = 'data/photos/annotations/train.json'
  c.data.train_images = 'data/photos/train'
  c.data.val_annotations = 'data/photos/annotations/val.json'
  c.data.val_images = 'data/photos/val'
  return c
