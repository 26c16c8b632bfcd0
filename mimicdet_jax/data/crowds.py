"""Real-image set of crowds: many tiny grey-textured objects of 4 classes, clustered.

    python -m mimicdet_jax.data.crowds OUT --num-train 1500 --num-val 300 \
        --seed 0 [--min-size 224 --max-size 288] [--format jpg|png] [--viz 4]

writes OUT/annotations/{train,val}.json, OUT/train/*.jpg, OUT/val/*.jpg and,
with --viz K, OUT/viz/*.png, as `python -m mimicdet_jax.data.photos` does.

Where the real-image proxy (data/photos.py) has 1..8 mostly medium objects
of 12 classes and data/glyphs.py small ones of 24 classes told apart by
their outline, this set has `MIN_OBJECTS`..`MAX_OBJECTS` (10..40) tiny
objects (sqrt(w h) `MIN_SIZE`..`MAX_SIZE` = 10..28 px) of 4 classes told
apart only by their texture, every one cut with the same outlines (ellipse
or rectangle) from grey sources that scikit-image ships:

- face: the 100 faces of `lfw_subset.npy` (Labeled Faces in the Wild,
  25 x 25 px);
- coin: the 24 coins of coins.png (photos.OBJECTS);
- gravel / grass: windows of gravel.png / grass.png (texture photographs).

Most objects gather around 1..3 centres (`CLUSTER_PROB`), so they touch and
overlap; a later paste may cover up to `MAX_COVER` of an earlier object's
box. Grey sources get a colour cast (photos.jitter). Distractors of the same
sizes and outlines: LFW's 100 non-faces (background crops of the same
photographs), brick.png windows and patches of the other photographs.
The background is a crop of a packaged photograph that is none of the
classes' sources (photos.background keeps out the heads it holds).

A box is the extent of the pixels with alpha >= 0.5, clipped to the image;
an object with less than `MIN_VISIBLE` of its alpha mass visible, or a side
under `MIN_BOX_SIDE` px, is dropped from the labels (photos.labels). Every
image is a pure function of (seed, split, index).
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
from PIL import Image

from mimicdet_jax import errors
from mimicdet_jax.data import generated
from mimicdet_jax.data import photos

CATEGORIES = tuple({'id': i + 1, 'name': n} for i, n in enumerate((
    'face', 'coin', 'gravel', 'grass')))
LFW_FILE = ('skimage', 'data/lfw_subset.npy')  # 100 faces, then 100 non-faces
_TEXTURES = {'gravel': 'gravel', 'grass': 'grass'}  # class: photo
# Never a background: the classes' own sources (a background of gravel
# would hold unlabelled gravel) and the clip art.
_NOT_BACKGROUND = ('coins', 'gravel', 'grass', 'present')
_DISTRACTOR_PHOTOS = tuple(n for n in photos.PHOTO_FILES
                           if n not in _NOT_BACKGROUND)
_SPLIT_CODES = {'train': 0, 'val': 1}

MIN_SIZE, MAX_SIZE = 10.0, 28.0  # px, sqrt(w * h) of an object, log-uniform
TEXTURE_WINDOW = (24.0, 96.0)  # px of the 512 px texture photos per object
MIN_OBJECTS, MAX_OBJECTS = 10, 40
MIN_DISTRACTORS, MAX_DISTRACTORS = 5, 20
MAX_CLUSTERS = 3
CLUSTER_PROB = 0.7  # of objects placed around a cluster centre, else anywhere
CLUSTER_SPREAD = 0.12  # Gaussian sigma of a cluster, of the shorter side
ELLIPSE_PROB = 0.5  # every class and distractor: ellipse, else rectangle
MAX_COVER = 0.5
MIN_VISIBLE = 0.4
MIN_BOX_SIDE = 4


@functools.cache
def lfw() -> tuple[np.ndarray, np.ndarray]:
  """(faces, non-faces): uint8 [100, 25, 25] each, grey."""
  package, rel = LFW_FILE
  data = np.load(os.path.join(photos.package_dir(package), rel))
  data = np.clip(np.rint(data * 255), 0, 255).astype(np.uint8)
  return data[:100], data[100:]


def _grey_patch(rng: np.random.Generator, grey: np.ndarray, shape: str,
                th: int, tw: int) -> tuple[np.ndarray, np.ndarray]:
  """A grey uint8 [H, W] array cut at (th, tw) like photos.cut: (rgb, alpha)."""
  photo = photos.Photo(Image.fromarray(grey).convert('RGB'), None, True, ())
  return photos.cut(rng, photo, (0, 0) + photo.image.size, shape, th, tw, 0.25)


def _crowd_place(rng: np.random.Generator, th: int, tw: int, h: int, w: int,
                 centres: np.ndarray) -> tuple[int, int]:
  """Top-left (y0, x0): near one of `centres` [k, 2] (y, x) or anywhere."""
  if rng.random() < CLUSTER_PROB:
    cy, cx = centres[int(rng.integers(len(centres)))] + rng.normal(
        0, CLUSTER_SPREAD * min(h, w), 2)
    cy, cx = min(max(cy, 0.0), h - 1.0), min(max(cx, 0.0), w - 1.0)
    return int(round(cy - th / 2)), int(round(cx - tw / 2))
  return photos.place(rng, th, tw, h, w)


def _source(rng: np.random.Generator, category: str | None):
  """What to cut: ('photo', Photo, box) or ('grey', uint8 [H, W]); aspect."""
  all_photos = photos.photos()
  if category == 'face':
    return ('grey', lfw()[0][int(rng.integers(100))]), rng.uniform(0.85, 1.05)
  if category == 'coin':
    coins = [o[2] for o in photos.OBJECTS if o[0] == 'coin']
    box = coins[int(rng.integers(len(coins)))]
    aspect = (box[2] - box[0]) / (box[3] - box[1]) * rng.uniform(0.9, 1.1)
    return ('photo', all_photos['coins'], box), aspect
  aspect = photos.loguniform(rng, 0.6, 1.6)
  if category in _TEXTURES:
    photo = all_photos[_TEXTURES[category]]
    return ('photo', photo, photos.free_window(
        rng, photo, *TEXTURE_WINDOW, aspect)), aspect
  # A distractor: a non-face, a brick window or a patch of another photo.
  pick = rng.random()
  if pick < 1 / 3:
    return ('grey', lfw()[1][int(rng.integers(100))]), rng.uniform(0.85, 1.05)
  name = 'brick' if pick < 2 / 3 else _DISTRACTOR_PHOTOS[
      int(rng.integers(len(_DISTRACTOR_PHOTOS)))]
  photo = all_photos[name]
  window = photos.free_window(rng, photo, TEXTURE_WINDOW[0],
                              max(TEXTURE_WINDOW[1], 0.3 * min(photo.image.size)),
                              aspect)
  return ('photo', photo, window), aspect


def render_example(seed: int, split: str, index: int, min_size: int = 224,
                   max_size: int = 288, return_layers: bool = False
                   ) -> dict[str, np.ndarray]:
  """Draws image `index` of `split`; a pure function of its arguments.

  Returns photos.render_example's dict: 'image' uint8 [h, w, 3], 'boxes'
  float32 [n, 4] (x1, y1, x2, y2, end exclusive), 'category_ids' int64 [n],
  'areas' int64 [n] (pixels of alpha >= 0.5); with return_layers also
  'background', 'masks', 'visible' and 'pasted'.
  """
  rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
  names = [n for n in photos.PHOTO_FILES if n not in _NOT_BACKGROUND]
  img = photos.background(rng, h, w, names)
  bg_layer = img.copy() if return_layers else None
  uncovered = np.ones((h, w), np.float32) if return_layers else None
  centres = rng.uniform((0, 0), (h, w), (int(rng.integers(1, MAX_CLUSTERS + 1)), 2))
  num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  num_distractors = int(rng.integers(MIN_DISTRACTORS, MAX_DISTRACTORS + 1))
  kinds = rng.permutation([1] * num_objects + [0] * num_distractors)
  pasted: list[photos.Pasted] = []
  for is_object in kinds.tolist():
    category_id = int(rng.integers(len(CATEGORIES))) + 1 if is_object else None
    source, aspect = _source(
        rng, CATEGORIES[category_id - 1]['name'] if is_object else None)
    if source[0] == 'photo' and source[2] is None:
      continue  # no free window found
    size = photos.loguniform(rng, MIN_SIZE, MAX_SIZE)
    th, tw = photos.patch_size(rng, size, aspect, h, w)
    shape = 'ellipse' if rng.random() < ELLIPSE_PROB else 'rect'
    for _ in range(10):
      y0, x0 = _crowd_place(rng, th, tw, h, w, centres)
      if not photos.covers_too_much(y0, x0, th, tw, pasted, MAX_COVER):
        break
    else:
      continue
    if source[0] == 'grey':
      rgb, alpha = _grey_patch(rng, source[1], shape, th, tw)
    else:
      rgb, alpha = photos.cut(rng, source[1], source[2], shape, th, tw, 0.25)
    photos.paste_and_record(img, rgb, alpha, y0, x0, pasted, category_id,
                            uncovered)
  return photos.finish(rng, img, pasted, MIN_VISIBLE, MIN_BOX_SIDE, bg_layer,
                       uncovered)


SET = generated.GeneratedSet(
    module='mimicdet_jax.data.crowds', doc=__doc__, render=render_example,
    categories=CATEGORIES,
    description='mimicdet_jax crowds (tiny faces, coins and textures from packaged photographs)',
    min_size=224, max_size=288, smallest=64)
write_split, main = SET.write_split, SET.main


if __name__ == '__main__':
  errors.cli(main)(sys.argv[1:])
