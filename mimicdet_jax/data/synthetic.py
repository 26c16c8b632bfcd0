"""Synthetic shapes detection data set, written as a real COCO JSON + images.

    python -m mimicdet_jax.data.synthetic OUT --num-train 2000 --num-val 200 \
        --seed 0 [--min-size 160 --max-size 320] [--format jpg|png] [--viz 8]

writes OUT/annotations/{train,val}.json, OUT/train/*.jpg, OUT/val/*.jpg and,
with --viz K, OUT/viz/*.png (the first K training images with their boxes).

Each image has a cluttered background (colour gradient, stripes, noise, faint
random shapes that are *not* objects) and 1..8 objects of 6 shape classes
(circle, square, triangle, star, cross, ring) in random colours, sizes from
~8 px to most of the image, rotations, partial overlaps and cut-offs at the
border. The class is decided by shape alone (colour is random) so a small
detector can learn it. A box is the exact extent of the drawn shape's pixels
(x1, y1, x2, y2 end exclusive; in the JSON as integer [x, y, w, h]), clipped
to the image; occluded parts still count (drawn later objects may cover up to
`MAX_COVER` of an earlier object's box).

Category ids are deliberately non-contiguous (1, 3, 5, ...) to exercise the
id <-> label mapping. Everything is a pure function of (seed, split, index):
`render_example` re-creates any image in memory, which the tests compare with
what `CocoSource` reads back from disk.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from PIL import Image, ImageDraw

from mimicdet_jax import errors
from mimicdet_jax.data import generated

CATEGORIES = (
    {'id': 1, 'name': 'circle'},
    {'id': 3, 'name': 'square'},
    {'id': 5, 'name': 'triangle'},
    {'id': 7, 'name': 'star'},
    {'id': 9, 'name': 'cross'},
    {'id': 11, 'name': 'ring'},
)
_SHAPES = tuple(c['name'] for c in CATEGORIES)
_SPLIT_CODES = {'train': 0, 'val': 1}
# Shapes whose features vanish at a few pixels get a larger minimum size.
_MIN_SHAPE_SIZE = {'star': 12.0, 'cross': 12.0, 'ring': 14.0}
MIN_OBJECT_SIZE = 8.0  # px, smallest nominal object side
SMALL_FRACTION = 0.15  # share of objects drawn 8..20 px; the rest 20 px..most of the image
MAX_OBJECT_FRACTION = 0.85  # of the shorter image side
MAX_OBJECTS = 8
MAX_COVER = 0.45  # max intersection / smaller box area between two objects
MIN_CONTRAST = 150.0  # L1 RGB distance from the background under the shape


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  return points @ np.array([[c, s], [-s, c]])


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, size: float,
                aspect: float, angle: float, hole: float) -> np.ndarray:
  """Rasterises one shape; returns bool [h, w] (True = the shape's pixels)."""
  mask = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(mask)
  r = size / 2
  rx, ry = r * math.sqrt(aspect), r / math.sqrt(aspect)
  if shape in ('circle', 'ring'):
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    if shape == 'ring':
      draw.ellipse((cx - rx * hole, cy - ry * hole, cx + rx * hole,
                    cy + ry * hole), fill=0)
  else:
    if shape == 'square':
      pts = np.array([[-rx, -ry], [rx, -ry], [rx, ry], [-rx, ry]])
    elif shape == 'triangle':
      t = np.deg2rad([-90.0, 30.0, 150.0])
      pts = r * np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == 'star':
      t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
      rad = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
      pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif shape == 'cross':
      a, b = r, 0.3 * r
      pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                      [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    else:
      raise ValueError(f'unknown shape {shape!r}')
    pts = _rotate(pts, angle) + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
  return np.asarray(mask) > 0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Cluttered float32 [h, w, 3] background in 0..255."""
  ys = np.arange(h, dtype=np.float32)[:, None, None]
  xs = np.arange(w, dtype=np.float32)[None, :, None]
  # Base colour with a smooth gradient (one broadcast pass).
  g = rng.uniform(-40, 40, (2, 3)).astype(np.float32)
  img = (rng.uniform(40, 215, 3).astype(np.float32) + (xs / w - 0.5) * g[0]
         + (ys / h - 0.5) * g[1])
  # Stripes at a random angle and period.
  if rng.random() < 0.6:
    theta, period = rng.uniform(0, np.pi), rng.uniform(5, 40)
    phase = (xs[..., 0] * math.cos(theta) + ys[..., 0] * math.sin(theta)) * (
        2 * np.pi / period)
    img = img + np.sin(phase)[..., None] * rng.uniform(5, 30, 3).astype(np.float32)
  # Blotchy low-frequency noise.
  gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
  blot = rng.uniform(-25, 25, (gh, gw, 3)).astype(np.float32)
  blot_img = Image.fromarray(((blot + 25) * 5.1).astype(np.uint8)).resize(
      (w, h), Image.BILINEAR)
  img += np.asarray(blot_img, np.float32) * np.float32(1 / 5.1) - 25
  # Faint random shapes that are not objects: lines, blobs, polygons.
  overlay = Image.new('RGBA', (w, h), (0, 0, 0, 0))
  draw = ImageDraw.Draw(overlay)
  for _ in range(int(rng.integers(3, 13))):
    colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (
        int(rng.integers(20, 60)),)
    kind = rng.integers(3)
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    extent = rng.uniform(10, max(h, w))
    if kind == 0:
      draw.line((x0, y0, x0 + rng.normal() * extent, y0 + rng.normal() * extent),
                fill=colour, width=int(rng.integers(1, 6)))
    elif kind == 1:
      draw.ellipse((x0, y0, x0 + extent, y0 + extent * rng.uniform(0.3, 1.0)),
                   fill=colour)
    else:
      pts = rng.uniform(-extent / 2, extent / 2, (int(rng.integers(4, 8)), 2))
      draw.polygon([(x0 + p[0], y0 + p[1]) for p in pts.tolist()], fill=colour)
  background = Image.fromarray(
      np.clip(img, 0, 255).astype(np.uint8)).convert('RGBA')
  return np.asarray(Image.alpha_composite(background, overlay).convert('RGB'),
                    np.float32)


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
  """A random colour far (L1 RGB) from the mean background under the shape."""
  best, best_dist = None, -1.0
  for _ in range(8):
    colour = rng.integers(0, 256, 3).astype(np.float32)
    dist = float(np.abs(colour - under).sum())
    if dist > best_dist:
      best, best_dist = colour, dist
    if dist >= MIN_CONTRAST:
      break
  if best_dist < MIN_CONTRAST:  # e.g. mid-grey background: push to an extreme
    best = np.where(under > 127, 0.0, 255.0).astype(np.float32)
  return best


def _sample_size(rng: np.random.Generator, shape: str, short_side: int) -> float:
  hi = MAX_OBJECT_FRACTION * short_side
  lo = max(MIN_OBJECT_SIZE, _MIN_SHAPE_SIZE.get(shape, 0.0))
  if rng.random() < SMALL_FRACTION:
    lo_s, hi_s = lo, max(lo, 20.0)
  else:
    lo_s, hi_s = max(lo, 20.0), max(hi, 20.0)
  return float(math.exp(rng.uniform(math.log(lo_s), math.log(hi_s))))


def render_example(seed: int, split: str, index: int, min_size: int = 160,
                   max_size: int = 320, return_masks: bool = False
                   ) -> dict[str, np.ndarray]:
  """Draws image `index` of `split`; a pure function of its arguments.

  Returns:
    {'image': uint8 [h, w, 3], 'boxes': float32 [n, 4] (x1, y1, x2, y2, end
    exclusive, integer-valued pixels), 'category_ids': int64 [n],
    'areas': int64 [n] (shape pixels before occlusion)}, and with
    return_masks 'masks': bool [n, h, w] (each shape's pixels before
    occlusion). h and w are drawn independently from [min_size, max_size].
  """
  rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
  img = _background(rng, h, w)
  boxes, cats, areas, masks = [], [], [], []
  for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
    label = int(rng.integers(len(_SHAPES)))
    shape = _SHAPES[label]
    for _ in range(15):  # placement attempts
      size = _sample_size(rng, shape, min(h, w))
      margin = 0.25 * size  # up to ~a quarter of the shape may leave the image
      cx = rng.uniform(margin, max(margin, w - margin))
      cy = rng.uniform(margin, max(margin, h - margin))
      mask = _shape_mask(shape, h, w, cx, cy, size,
                         aspect=float(rng.uniform(0.75, 1.33)),
                         angle=float(rng.uniform(0, 2 * np.pi)),
                         hole=float(rng.uniform(0.45, 0.65)))
      rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
      if rows.size == 0:
        continue
      box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
      if all(_cover(box, other) <= MAX_COVER for other in boxes):
        break
    else:
      continue
    colour = _object_colour(rng, img[mask].mean(0))
    img[mask] = colour
    boxes.append(box)
    cats.append(CATEGORIES[label]['id'])
    areas.append(int(mask.sum()))
    if return_masks:
      masks.append(mask)
  # Noise over everything, so objects are not perfectly flat either.
  img += rng.standard_normal(img.shape, np.float32) * np.float32(
      rng.uniform(3, 10))
  out = {
      'image': np.clip(np.rint(img), 0, 255).astype(np.uint8),
      'boxes': np.array(boxes, np.float32).reshape(-1, 4),
      'category_ids': np.array(cats, np.int64),
      'areas': np.array(areas, np.int64),
  }
  if return_masks:
    out['masks'] = np.array(masks, bool).reshape(-1, h, w)
  return out


def _cover(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over the smaller of the two box areas."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
  return float(iw * ih / small)


SET = generated.GeneratedSet(
    module='mimicdet_jax.data.synthetic', doc=__doc__, render=render_example,
    categories=CATEGORIES,
    description='mimicdet_jax synthetic shapes',
    min_size=160, max_size=320, smallest=16,
    # 4:4:4 chroma keeps colour edges (and so the boxes) sharp.
    jpeg_options={'quality': 92, 'subsampling': 0},
    num_train=2000, num_val=200)
write_split, main = SET.write_split, SET.main


if __name__ == '__main__':
  errors.cli(main)(sys.argv[1:])
