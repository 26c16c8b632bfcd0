"""Real-image proxy detection set: real objects cut from photographs, pasted on real photographs.

    python -m mimicdet_jax.data.photos OUT --num-train 1500 --num-val 300 \
        --seed 0 [--min-size 192 --max-size 384] [--format jpg|png] [--viz 4]

writes OUT/annotations/{train,val}.json, OUT/train/*.jpg, OUT/val/*.jpg and,
with --viz K, OUT/viz/*.png (the first K training images with their boxes),
as `python -m mimicdet_jax.data.synthetic` does for the shapes.

Every pixel comes from a photograph that an installed package ships
(scikit-image's `skimage/data`, scikit-learn's `sklearn/datasets/images`,
matplotlib's `mpl-data/sample_data`); nothing is downloaded. An image is a
random crop of one photograph (rescaled, flipped, colour-jittered) with
1..`MAX_OBJECTS` objects of 12 classes pasted on it: regions of the
photographs with a known box (`OBJECTS`: a head, the cat, the cup, a coin,
...), cut with a feathered ellipse or rectangle (or the clip art's own
alpha), rescaled to 14 px .. 80 % of the image, jittered, flipped, partly
outside the image or under later pastes. Between and over them lie
`DISTRACTORS`: patches of the same photographs cut the same way from
regions that hold no object, so neither a paste edge nor a photograph's
colours give the class away.

A box is the extent of the pasted object's pixels with alpha >= 0.5 (x1, y1,
x2, y2 end exclusive; in the JSON as integer [x, y, w, h]), clipped to the
image; occluded parts still count. An object with less than `MIN_VISIBLE`
of its alpha mass left visible (inside the image, not under later pastes)
or a clipped box side under `MIN_BOX_SIDE` px is dropped from the labels.
Everything is a pure function of (seed, split, index): `render_example`
re-creates any image in memory. The public helpers (photos, background,
cut, place, paste, labels, ...) also draw data/glyphs.py and
data/crowds.py.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image

from mimicdet_jax import errors
from mimicdet_jax.data import generated

# (package, path inside the installed package). Only files that the wheels
# ship: scikit-image fetches most of its other data sets with pooch.
PHOTO_FILES = {
    'astronaut': ('skimage', 'data/astronaut.png'),
    'camera': ('skimage', 'data/camera.png'),
    'chelsea': ('skimage', 'data/chelsea.png'),
    'coffee': ('skimage', 'data/coffee.png'),
    'coins': ('skimage', 'data/coins.png'),
    'rocket': ('skimage', 'data/rocket.jpg'),
    'hubble': ('skimage', 'data/hubble_deep_field.jpg'),
    'ihc': ('skimage', 'data/ihc.png'),
    'motorcycle': ('skimage', 'data/motorcycle_left.png'),
    'brick': ('skimage', 'data/brick.png'),
    'grass': ('skimage', 'data/grass.png'),
    'gravel': ('skimage', 'data/gravel.png'),
    'china': ('sklearn', 'datasets/images/china.jpg'),
    'flower': ('sklearn', 'datasets/images/flower.jpg'),
    'grace_hopper': ('matplotlib', 'mpl-data/sample_data/grace_hopper.jpg'),
    'present': ('matplotlib', 'mpl-data/sample_data/Minduka_Present_Blue_Pack.png'),
}

CATEGORIES = tuple({'id': i + 1, 'name': n} for i, n in enumerate((
    'head', 'cat', 'cup', 'helmet', 'badge', 'shuttle', 'rocket', 'coin',
    'flower', 'present', 'motorcycle', 'pagoda')))

# The 24 coins of skimage's coins.png: boxes of a white top-hat threshold
# (Gaussian sigma 2, minus a 61 px grey opening, > 35, holes filled), checked
# by drawing them on the photo.
_COIN_BOXES = (
    (22, 36, 66, 74), (81, 39, 121, 74), (132, 30, 179, 74), (193, 30, 240, 73),
    (257, 34, 297, 72), (305, 15, 364, 73), (24, 103, 68, 146),
    (83, 107, 123, 145), (133, 109, 175, 146), (185, 104, 228, 145),
    (245, 95, 297, 145), (316, 104, 358, 146), (24, 178, 63, 217),
    (79, 174, 126, 218), (133, 178, 176, 218), (187, 169, 238, 218),
    (250, 171, 299, 218), (314, 156, 381, 218), (17, 232, 76, 288),
    (91, 244, 137, 288), (143, 236, 202, 288), (218, 239, 271, 289),
    (274, 239, 328, 289), (334, 247, 382, 290))

# (class, photo, box x1, y1, x2, y2 in the photo's pixels, end exclusive).
# Found by looking at each photo with a 10 px grid drawn on it.
OBJECTS = (
    ('head', 'astronaut', (155, 15, 300, 168)),  # Eileen Collins, hair to chin
    ('head', 'grace_hopper', (150, 25, 375, 335)),  # cap to chin
    ('head', 'camera', (152, 64, 262, 200)),  # the cameraman, grey
    ('cat', 'chelsea', (55, 0, 395, 300)),  # the head fills the photo
    ('cup', 'coffee', (75, 15, 482, 392)),  # espresso cup on its saucer, spoon
    ('helmet', 'astronaut', (278, 343, 512, 512)),  # cut by the photo's corner
    ('badge', 'astronaut', (133, 348, 212, 425)),  # mission patch on the suit
    ('shuttle', 'astronaut', (352, 0, 470, 282)),  # model on its stand
    ('rocket', 'rocket', (308, 126, 338, 407)),  # Falcon 9 on the pad
    *(('coin', 'coins', b) for b in _COIN_BOXES),
    ('flower', 'flower', (168, 85, 447, 360)),  # the dahlia in focus
    ('present', 'present', (9, 3, 119, 118)),  # clip art, pasted by its alpha
    ('motorcycle', 'motorcycle', (90, 70, 682, 448)),  # mirror to tyres
    ('pagoda', 'china', (60, 28, 372, 395)),  # Summer Palace tower, trees in front
)
# Unlabelled things of the classes above: backgrounds and distractors keep
# out of them as they keep out of OBJECTS.
_UNLABELLED = {'flower': ((288, 372, 470, 427), (565, 385, 625, 427))}  # dahlias at the bottom edge
_CLIP_ART = ('present',)  # not a photograph: never a background or a distractor

# Per class, how objects are cut: 'ellipse' for round things, 'rect' for
# upright ones (the crop with its surroundings), 'alpha' for the clip art.
# Any object is cut as a rectangle with probability RECT_PROB instead, so
# the paste outline does not name the class. Distractors are cut as
# ellipses as often as objects are (7 of 11 classes x 0.7 + 4 x 0.3).
_SHAPE = {'head': 'ellipse', 'cat': 'ellipse', 'cup': 'ellipse',
          'helmet': 'ellipse', 'badge': 'ellipse', 'coin': 'ellipse',
          'flower': 'ellipse', 'present': 'alpha', 'shuttle': 'rect',
          'rocket': 'rect', 'motorcycle': 'rect', 'pagoda': 'rect'}
RECT_PROB = 0.3
DISTRACTOR_ELLIPSE_PROB = 0.55
_SPLIT_CODES = {'train': 0, 'val': 1}

MIN_OBJECT_SIZE = 14.0  # px, smallest sqrt(w * h) of a pasted object
SMALL_FRACTION = 0.3  # share of objects drawn 14..32 px; the rest 32 px..MAX
MAX_OBJECT_FRACTION = 0.8  # of the shorter image side, for sqrt(w * h)
MAX_OBJECTS = 8
MIN_DISTRACTORS, MAX_DISTRACTORS = 1, 6
MAX_DISTRACTOR_FRACTION = 0.6
MAX_COVER = 0.5  # a later paste covers at most this share of an object's box
BORDER_CUT = 0.25  # at most this share of a side may leave the image
KEEP_OUT_OVERLAP = 0.1  # a background / distractor crop holds <= this of any object
MIN_VISIBLE = 0.4  # of an object's alpha mass, else it is dropped
MIN_BOX_SIDE = 4  # px, clipped box sides below are dropped
CROP_JITTER = 0.04  # of the box side, per side, for object crops


@dataclasses.dataclass(frozen=True)
class Photo:
  image: Image.Image  # RGB
  alpha: Image.Image | None  # L, the clip art's own alpha
  grey: bool
  keep_out: tuple[tuple[int, int, int, int], ...]


def package_dir(package: str) -> str:
  spec = importlib.util.find_spec(package)  # finds without importing it
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError(
        f'the real-image sets read photographs and fonts shipped with {package}; '
        'install it: pip install scikit-image scikit-learn matplotlib')
  return list(spec.submodule_search_locations)[0]


@functools.cache
def photos() -> dict[str, Photo]:
  """The photographs, read once per process."""
  keep_out: dict[str, list] = {name: list(_UNLABELLED.get(name, ()))
                               for name in PHOTO_FILES}
  for _, name, box in OBJECTS:
    keep_out[name].append(box)
  out = {}
  for name, (package, rel) in PHOTO_FILES.items():
    with Image.open(os.path.join(package_dir(package), rel)) as img:
      img.load()
      alpha = img.getchannel('A') if img.mode == 'RGBA' else None
      out[name] = Photo(img.convert('RGB'), alpha, img.mode in ('L', 'I;16'),
                         tuple(keep_out[name]))
  return out


def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
  return float(math.exp(rng.uniform(math.log(lo), math.log(max(lo, hi)))))


def jitter(rng: np.random.Generator, rgb: np.ndarray, grey: bool,
            strength: float) -> np.ndarray:
  """Saturation, contrast, brightness and white balance; float32 [h, w, 3].

  One 3x3 colour matrix and a bias: saturation (lum + (x - lum) * sat, lum =
  channel mean) keeps the image mean m, so contrast (m + (x - m) * con) and
  the per-channel gains compose with it into gains * (con * S x + (1 - con) m).
  """
  s = strength
  sat = rng.uniform(1 - 1.6 * s, 1 + 1.6 * s)
  con = rng.uniform(1 - s, 1 + s)
  tint = (0.8 if grey else 0.3) * s  # grey photos get a colour cast
  gains = rng.uniform(1 - tint, 1 + tint, 3) * rng.uniform(1 - s, 1 + s)
  saturation = sat * np.eye(3) + (1 - sat) / 3
  matrix = gains[:, None] * con * saturation
  bias = gains * (1 - con) * float(rgb.mean())
  return rgb @ matrix.T.astype(np.float32) + bias.astype(np.float32)


def cut_alpha(shape: str, th: int, tw: int, feather: float) -> np.ndarray:
  """Soft mask float32 [th, tw] in 0..1: ellipse or rectangle, feathered edges."""
  ys = (np.arange(th, dtype=np.float32) + 0.5)[:, None]
  xs = (np.arange(tw, dtype=np.float32) + 0.5)[None, :]
  if shape == 'rect':
    # Distance of each pixel centre to the nearest edge, in pixels.
    edge = np.minimum(np.minimum(xs, tw - xs), np.minimum(ys, th - ys))
  else:
    rx, ry = tw / 2, th / 2
    d = np.sqrt(((xs - rx) / rx) ** 2 + ((ys - ry) / ry) ** 2)
    edge = (1 - d) * min(rx, ry)
  return np.clip(edge / np.float32(feather), 0, 1).astype(np.float32)


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection area of two x1y1x2y2 boxes over the area of `b`."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  return float(iw * ih / ((b[2] - b[0]) * (b[3] - b[1])))


def free_window(rng: np.random.Generator, photo: Photo, min_side: float,
                 max_side: float, aspect: float, attempts: int = 20):
  """A crop (x1, y1, x2, y2) of `photo` holding <= KEEP_OUT_OVERLAP of any object, or None."""
  pw, ph = photo.image.size
  for _ in range(attempts):
    side = loguniform(rng, min_side, max_side)  # sqrt(w * h)
    cw, ch = side * math.sqrt(aspect), side / math.sqrt(aspect)
    fit = min(1.0, pw / cw, ph / ch)  # shrink, keeping the aspect
    cw, ch = cw * fit, ch * fit
    x1 = rng.uniform(0, max(0.0, pw - cw))
    y1 = rng.uniform(0, max(0.0, ph - ch))
    box = (x1, y1, x1 + cw, y1 + ch)
    if all(_overlap(box, k) <= KEEP_OUT_OVERLAP for k in photo.keep_out):
      return box
  return None


def background(rng: np.random.Generator, h: int, w: int,
               names: Sequence[str] | None = None) -> np.ndarray:
  """A rescaled, flipped, jittered crop of one photograph; float32 [h, w, 3].

  `names`: the photographs to draw from (default: all but the clip art);
  it must hold one without objects ('hubble') or with room beside them.
  """
  all_photos = photos()
  if names is None:
    names = [n for n in PHOTO_FILES if n not in _CLIP_ART]
  window, photo = None, None
  while window is None:  # 'hubble' has no objects, so this ends
    photo = all_photos[names[int(rng.integers(len(names)))]]
    pw, ph = photo.image.size
    aspect = (w / h) * rng.uniform(0.9, 1.1)
    window = free_window(rng, photo, 0.25 * min(pw, ph), max(pw, ph), aspect)
  rgb = np.asarray(photo.image.resize((w, h), Image.BILINEAR, box=window),
                   np.float32)
  if rng.random() < 0.5:
    rgb = rgb[:, ::-1]
  return jitter(rng, rgb, photo.grey, 0.3)


def patch_size(rng: np.random.Generator, size: float, aspect: float, h: int,
                w: int) -> tuple[int, int]:
  """(th, tw) with sqrt(th * tw) ~ size, tw / th ~ aspect, fitting the image."""
  tw, th = size * math.sqrt(aspect), size / math.sqrt(aspect)
  fit = min(1.0, w / tw, h / th)
  grow = max(1.0, (MIN_BOX_SIDE + 1) / min(tw * fit, th * fit))
  tw, th = tw * fit * grow, th * fit * grow
  return max(1, min(h, int(round(th)))), max(1, min(w, int(round(tw))))


def cut(rng: np.random.Generator, photo: Photo, box: Sequence[float],
         shape: str, th: int, tw: int, jitter_strength: float
         ) -> tuple[np.ndarray, np.ndarray]:
  """Cuts `box` of `photo` at (th, tw): (rgb float32 [th, tw, 3], alpha float32 [th, tw])."""
  rgb = np.asarray(photo.image.resize((tw, th), Image.BILINEAR, box=box),
                   np.float32)
  if shape == 'alpha':
    alpha = np.asarray(photo.alpha.resize((tw, th), Image.BILINEAR, box=box),
                       np.float32) * np.float32(1 / 255)
  else:
    feather = rng.uniform(1.0, max(1.5, 0.08 * min(th, tw)))
    alpha = cut_alpha(shape, th, tw, feather)
  if rng.random() < 0.5:
    rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
  return jitter(rng, rgb, photo.grey, jitter_strength), alpha


def place(rng: np.random.Generator, th: int, tw: int, h: int, w: int,
          border_cut: float = BORDER_CUT) -> tuple[int, int]:
  """Top-left (y0, x0): up to `border_cut` of each side may leave the image."""
  my, mx = border_cut * th, border_cut * tw
  cy = rng.uniform(min(my, h - my), max(my, h - my))
  cx = rng.uniform(min(mx, w - mx), max(mx, w - mx))
  return int(round(cy - th / 2)), int(round(cx - tw / 2))


@dataclasses.dataclass
class Pasted:
  category_id: int
  window: tuple[int, int, int, int]  # y0, x0, y1, x1 of the part inside the image
  alpha: np.ndarray  # float32 [y1 - y0, x1 - x0], inside the image
  visible: np.ndarray  # alpha x (1 - alpha of each later paste)
  mass: float  # alpha sum of the whole patch, inside the image or not


def paste(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, y0: int,
           x0: int, pasted: list[Pasted]):
  """Alpha-blends the patch into img in place; returns the clipped window and alpha."""
  h, w = img.shape[:2]
  th, tw = alpha.shape
  wy0, wx0, wy1, wx1 = max(0, y0), max(0, x0), min(h, y0 + th), min(w, x0 + tw)
  if wy1 <= wy0 or wx1 <= wx0:
    return None
  a = alpha[wy0 - y0:wy1 - y0, wx0 - x0:wx1 - x0]
  region = img[wy0:wy1, wx0:wx1]
  region += (rgb[wy0 - y0:wy1 - y0, wx0 - x0:wx1 - x0] - region) * a[..., None]
  for p in pasted:  # what this paste hides of earlier objects
    py0, px0, py1, px1 = p.window
    oy0, ox0, oy1, ox1 = max(py0, wy0), max(px0, wx0), min(py1, wy1), min(px1, wx1)
    if oy1 > oy0 and ox1 > ox0:
      p.visible[oy0 - py0:oy1 - py0, ox0 - px0:ox1 - px0] *= (
          1 - a[oy0 - wy0:oy1 - wy0, ox0 - wx0:ox1 - wx0])
  return (wy0, wx0, wy1, wx1), a


def paste_and_record(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray,
                     y0: int, x0: int, pasted: list[Pasted],
                     category_id: int | None,
                     uncovered: np.ndarray | None) -> None:
  """`paste`, then an object (category_id not None) joins `pasted`.

  `uncovered` (float32 [h, w], prod(1 - alpha) of every paste, distractors
  included; None when the layers are not wanted) takes this paste's alpha.
  """
  res = paste(img, rgb, alpha, y0, x0, pasted)
  if res is None:
    return
  window, a = res
  if uncovered is not None:
    uncovered[window[0]:window[2], window[1]:window[3]] *= 1 - a
  if category_id is not None:
    pasted.append(Pasted(category_id, window, a, a.copy(), float(alpha.sum())))


def finish(rng: np.random.Generator, img: np.ndarray, pasted: Sequence[Pasted],
           min_visible: float, min_box_side: int,
           bg_layer: np.ndarray | None = None,
           uncovered: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Adds the final sensor noise to img; returns render_example's dict.

  With the layers (bg_layer, the image before any paste, and uncovered, see
  paste_and_record; both None without) also 'background', 'masks',
  'visible' and 'pasted'.
  """
  h, w = img.shape[:2]
  return_layers = bg_layer is not None
  img += rng.standard_normal(img.shape, np.float32) * np.float32(
      rng.uniform(0, 4))
  out = {'image': np.clip(np.rint(img), 0, 255).astype(np.uint8),
         **labels(pasted, h, w, min_visible, min_box_side, return_layers)}
  if return_layers:
    out['background'] = np.clip(np.rint(bg_layer), 0, 255).astype(np.uint8)
    out['pasted'] = 1 - uncovered
  return out


def covers_too_much(y0: int, x0: int, th: int, tw: int,
                    pasted: list[Pasted], max_cover: float = MAX_COVER) -> bool:
  new = (x0, y0, x0 + tw, y0 + th)
  return any(_overlap(new, (p.window[1], p.window[0], p.window[3], p.window[2]))
             > max_cover for p in pasted)


def _sample_object_size(rng: np.random.Generator, short_side: int) -> float:
  if rng.random() < SMALL_FRACTION:
    return loguniform(rng, MIN_OBJECT_SIZE, 32.0)
  return loguniform(rng, 32.0, MAX_OBJECT_FRACTION * short_side)


def render_example(seed: int, split: str, index: int, min_size: int = 192,
                   max_size: int = 384, return_layers: bool = False
                   ) -> dict[str, np.ndarray]:
  """Draws image `index` of `split`; a pure function of its arguments.

  Returns:
    {'image': uint8 [h, w, 3], 'boxes': float32 [n, 4] (x1, y1, x2, y2, end
    exclusive, integer-valued pixels), 'category_ids': int64 [n],
    'areas': int64 [n] (pixels of alpha >= 0.5 inside the image, occluded
    ones included)}; with return_layers also 'background': uint8 [h, w, 3]
    (the image before any paste, before the final noise), 'masks': float32
    [n, h, w] (each kept object's alpha) and 'visible': float32 [n, h, w]
    (its alpha times 1 - alpha of every later paste) and 'pasted': float32
    [h, w] (1 - prod(1 - alpha) over all pastes, distractors included). h
    and w are drawn
    independently from [min_size, max_size].
  """
  rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
  all_photos = photos()
  img = background(rng, h, w)
  bg_layer = img.copy() if return_layers else None
  uncovered = np.ones((h, w), np.float32) if return_layers else None
  num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
  num_distractors = int(rng.integers(MIN_DISTRACTORS, MAX_DISTRACTORS + 1))
  kinds = rng.permutation([1] * num_objects + [0] * num_distractors)
  distractor_photos = [n for n in PHOTO_FILES if n not in _CLIP_ART]
  pasted: list[Pasted] = []
  for is_object in kinds.tolist():
    if is_object:
      category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
      choices = [o for o in OBJECTS if o[0] == category['name']]
      _, name, box = choices[int(rng.integers(len(choices)))]
      photo = all_photos[name]
      bw, bh = box[2] - box[0], box[3] - box[1]
      d = rng.uniform(-CROP_JITTER, CROP_JITTER, 4) * np.array([bw, bh, bw, bh])
      pw, ph = photo.image.size
      crop = (max(0.0, box[0] + d[0]), max(0.0, box[1] + d[1]),
              min(pw, box[2] + d[2]), min(ph, box[3] + d[3]))
      shape = _SHAPE[category['name']]
      size = _sample_object_size(rng, min(h, w))
    else:
      category = None
      photo = all_photos[distractor_photos[int(rng.integers(
          len(distractor_photos)))]]
      crop = free_window(rng, photo, 24, 0.7 * min(photo.image.size),
                          loguniform(rng, 0.5, 2.0))
      if crop is None:
        continue
      shape = 'ellipse' if rng.random() < DISTRACTOR_ELLIPSE_PROB else 'rect'
      size = loguniform(rng, MIN_OBJECT_SIZE,
                         MAX_DISTRACTOR_FRACTION * min(h, w))
    if category is not None and shape != 'alpha' and rng.random() < RECT_PROB:
      shape = 'rect' if shape == 'ellipse' else 'ellipse'
    aspect = (crop[2] - crop[0]) / (crop[3] - crop[1]) * loguniform(rng, 0.8, 1.25)
    th, tw = patch_size(rng, size, aspect, h, w)
    for _ in range(10):
      y0, x0 = place(rng, th, tw, h, w)
      if not covers_too_much(y0, x0, th, tw, pasted):
        break
    else:
      continue
    rgb, alpha = cut(rng, photo, crop, shape, th, tw,
                      0.25 if category else 0.3)
    paste_and_record(img, rgb, alpha, y0, x0, pasted,
                     None if category is None else category['id'], uncovered)
  return finish(rng, img, pasted, MIN_VISIBLE, MIN_BOX_SIDE, bg_layer, uncovered)


def labels(pasted: Sequence[Pasted], h: int, w: int, min_visible: float,
           min_box_side: int, return_layers: bool = False
           ) -> dict[str, np.ndarray]:
  """The boxes of the pasted objects that stay labelled.

  An object is kept when at least `min_visible` of its alpha mass shows and
  both sides of its box (the extent of alpha >= 0.5 inside the image, end
  exclusive) are >= `min_box_side` px. Returns 'boxes' float32 [n, 4],
  'category_ids' int64 [n], 'areas' int64 [n] (pixels of alpha >= 0.5) and,
  with return_layers, 'masks' and 'visible' float32 [n, h, w].
  """
  boxes, cats, areas, masks, visible = [], [], [], [], []
  for p in pasted:
    if p.visible.sum() < min_visible * p.mass:
      continue
    solid = p.alpha >= 0.5
    rows, cols = np.flatnonzero(solid.any(1)), np.flatnonzero(solid.any(0))
    if rows.size == 0:
      continue
    y0, x0 = p.window[:2]
    box = [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1]
    if min(box[2] - box[0], box[3] - box[1]) < min_box_side:
      continue
    boxes.append(box)
    cats.append(p.category_id)
    areas.append(int(solid.sum()))
    if return_layers:
      for full, local in ((masks, p.alpha), (visible, p.visible)):
        m = np.zeros((h, w), np.float32)
        m[p.window[0]:p.window[2], p.window[1]:p.window[3]] = local
        full.append(m)
  out = {
      'boxes': np.array(boxes, np.float32).reshape(-1, 4),
      'category_ids': np.array(cats, np.int64),
      'areas': np.array(areas, np.int64),
  }
  if return_layers:
    out['masks'] = np.array(masks, np.float32).reshape(-1, h, w)
    out['visible'] = np.array(visible, np.float32).reshape(-1, h, w)
  return out


SET = generated.GeneratedSet(
    module='mimicdet_jax.data.photos', doc=__doc__, render=render_example,
    categories=CATEGORIES,
    description='mimicdet_jax real-image proxy (objects cut from packaged photographs)',
    min_size=192, max_size=384, smallest=64)
write_split, main = SET.write_split, SET.main


if __name__ == '__main__':
  errors.cli(main)(sys.argv[1:])
