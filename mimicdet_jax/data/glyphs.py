"""Real-image set of glyphs: characters from installed fonts on real photographs.

    python -m mimicdet_jax.data.glyphs OUT --num-train 1500 --num-val 300 \
        --seed 0 [--min-size 192 --max-size 384] [--format jpg|png] [--viz 4]

writes OUT/annotations/{train,val}.json, OUT/train/*.jpg, OUT/val/*.jpg and,
with --viz K, OUT/viz/*.png, as `python -m mimicdet_jax.data.photos` does.

Where the real-image proxy (data/photos.py) has 12 classes of mostly medium
objects told apart by their photographed appearance, this set has
`len(CHARACTERS)` = 24 classes of small objects told apart by their
outline: the digits and capitals of `CHARACTERS`, rendered from 16 fonts
that matplotlib ships (`FONT_FILES`: DejaVu, STIX, Computer Modern; upright,
bold, italic, monospace) at 12..60 px, stretched, rotated, in a flat colour
or filled with a photograph's texture, sometimes outlined, on a crop of one
of the packaged photographs (photos.background). Unlabelled glyphs
(`DISTRACTOR_CHARACTERS`: symbols, Greek letters) and photograph patches
lie between them, so neither a glyph's strokes nor its colour names a class.
Characters that a font makes ambiguous with another (0 / O / Q, 1 / I,
5 / S, 2 / Z) are left out of the classes; 6 and 9 stay apart because
rotations stay within `MAX_ROTATION`.

A box is the extent of the glyph's pixels with alpha >= 0.5 (its outline
included), clipped to the image; an object with less than `MIN_VISIBLE` of
its alpha mass visible is dropped from the labels (photos.labels). Every
image is a pure function of (seed, split, index).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from mimicdet_jax import errors
from mimicdet_jax.data import generated
from mimicdet_jax.data import photos

CHARACTERS = '23456789ABCDEFGHJKLMNPRT'
CATEGORIES = tuple({'id': i + 1, 'name': ch} for i, ch in enumerate(CHARACTERS))
# Unlabelled glyphs: symbols in every font, Greek letters where the font has them.
DISTRACTOR_CHARACTERS = '&%@#?+=*'
GREEK_CHARACTERS = '\u03b1\u03b2\u03bb\u03c0\u03c9\u03a9\u03a6\u03a8'  # αβλπωΩΦΨ

_TTF = 'mpl-data/fonts/ttf/'
FONT_FILES = {name: ('matplotlib', _TTF + name + '.ttf') for name in (
    'DejaVuSans', 'DejaVuSans-Bold', 'DejaVuSans-Oblique', 'DejaVuSerif',
    'DejaVuSerif-Bold', 'DejaVuSerif-Italic', 'DejaVuSansMono',
    'DejaVuSansMono-Bold', 'STIXGeneral', 'STIXGeneralBol',
    'STIXGeneralItalic', 'cmr10', 'cmss10', 'cmtt10', 'cmb10', 'cmti10')}
_GREEK_FONTS = tuple(n for n in FONT_FILES if not n.startswith('cm'))

MIN_FONT_SIZE, MAX_FONT_SIZE = 12, 60  # px, the em; a capital is ~0.7 em high
STRETCH = 1.25  # width x 1/STRETCH..STRETCH
MAX_ROTATION = 25.0  # degrees either way
OUTLINE_PROB = 0.3  # an outline of 1..size/12 px in another colour
TEXTURE_PROB = 0.35  # the fill is a photograph's texture, not a flat colour
MIN_CONTRAST = 50.0  # grey levels between the fill's mean and the background's
MIN_OBJECTS, MAX_OBJECTS = 3, 14
MIN_GLYPH_DISTRACTORS, MAX_GLYPH_DISTRACTORS = 2, 8
MAX_PATCH_DISTRACTORS = 3  # photograph patches, 0..3
MAX_COVER = 0.25  # a later paste covers at most this share of an object's box
BORDER_CUT = 0.1  # a cut-off glyph soon reads as another one
MIN_VISIBLE = 0.6  # of an object's alpha mass, else it is dropped
MIN_BOX_SIDE = 4  # px
_SPLIT_CODES = {'train': 0, 'val': 1}


@functools.cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
  package, rel = FONT_FILES[name]
  return ImageFont.truetype(os.path.join(photos.package_dir(package), rel), size)


def _glyph_masks(rng: np.random.Generator, character: str, font_name: str,
                 size: int, outline: int) -> tuple[np.ndarray, np.ndarray]:
  """(fill, shape) float32 [th, tw] in 0..1: the glyph's strokes and, with an
  outline, the strokes grown by it; stretched and rotated alike."""
  font = _font(font_name, size)
  x1, y1, x2, y2 = font.getbbox(character, stroke_width=outline)
  pad = 2
  canvas = (x2 - x1 + 2 * pad, y2 - y1 + 2 * pad)
  origin = (pad - x1, pad - y1)
  masks = []
  for stroke in (0, outline):
    m = Image.new('L', canvas, 0)
    ImageDraw.Draw(m).text(origin, character, font=font, fill=255,
                           stroke_width=stroke, stroke_fill=255)
    masks.append(m)
  stretch = photos.loguniform(rng, 1 / STRETCH, STRETCH)
  angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
  size_wh = (max(1, round(canvas[0] * stretch)), canvas[1])
  out = []
  for m in masks:
    m = m.resize(size_wh, Image.BILINEAR).rotate(angle, Image.BICUBIC,
                                                   expand=True)
    out.append(np.asarray(m, np.float32) * np.float32(1 / 255))
  fill, shape = out[0], np.maximum(out[0], out[1])  # resampling may differ at edges
  rows = np.flatnonzero(shape.max(1) > 0)
  cols = np.flatnonzero(shape.max(0) > 0)
  crop = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  return fill[crop], shape[crop]


def _colour_against(rng: np.random.Generator, backdrop_grey: float,
                    rgb: np.ndarray) -> np.ndarray:
  """`rgb` (a colour [3] or texture [..., 3]) shifted so that its mean grey
  level is >= MIN_CONTRAST from `backdrop_grey`, on the side with room."""
  if backdrop_grey >= 128:
    target = rng.uniform(0, backdrop_grey - MIN_CONTRAST)
  else:
    target = rng.uniform(backdrop_grey + MIN_CONTRAST, 255)
  return np.clip(rgb + (target - rgb.mean()), 0, 255).astype(np.float32)


def _glyph(rng: np.random.Generator, img: np.ndarray, character: str,
           fonts: Sequence[str], h: int, w: int):
  """A coloured glyph and where it goes: (rgb [th, tw, 3], alpha [th, tw], y0, x0)."""
  size = int(round(photos.loguniform(rng, MIN_FONT_SIZE, MAX_FONT_SIZE)))
  font_name = fonts[int(rng.integers(len(fonts)))]
  outline = (int(rng.integers(1, max(1, size // 12) + 1))
             if rng.random() < OUTLINE_PROB else 0)
  fill, shape = _glyph_masks(rng, character, font_name, size, outline)
  th, tw = shape.shape
  if th > h or tw > w:
    return None
  y0, x0 = photos.place(rng, th, tw, h, w, BORDER_CUT)
  under = img[max(0, y0):y0 + th, max(0, x0):x0 + tw]
  backdrop = float(under.mean()) if under.size else 128.0
  if rng.random() < TEXTURE_PROB:
    all_photos = photos.photos()
    names = [n for n in photos.PHOTO_FILES if n != 'present']
    photo = all_photos[names[int(rng.integers(len(names)))]]
    window = photos.free_window(rng, photo, 2 * max(th, tw),
                                0.5 * min(photo.image.size), tw / th)
    if window is None:
      window = (0, 0) + photo.image.size
    tex = np.asarray(photo.image.resize((tw, th), Image.BILINEAR, box=window),
                     np.float32)
    fill_rgb = _colour_against(rng, backdrop,
                               photos.jitter(rng, tex, photo.grey, 0.3))
  else:
    fill_rgb = np.broadcast_to(
        _colour_against(rng, backdrop, rng.uniform(0, 255, 3)), (th, tw, 3))
  if outline:
    edge_rgb = rng.uniform(0, 255, 3).astype(np.float32)
    share = np.clip(fill / np.maximum(shape, 1e-6), 0, 1)[..., None]
    rgb = edge_rgb + (fill_rgb - edge_rgb) * share
  else:
    rgb = fill_rgb
  return np.ascontiguousarray(rgb, np.float32), shape, y0, x0


def render_example(seed: int, split: str, index: int, min_size: int = 192,
                   max_size: int = 384, return_layers: bool = False
                   ) -> dict[str, np.ndarray]:
  """Draws image `index` of `split`; a pure function of its arguments.

  Returns photos.render_example's dict: 'image' uint8 [h, w, 3], 'boxes'
  float32 [n, 4] (x1, y1, x2, y2, end exclusive), 'category_ids' int64 [n],
  'areas' int64 [n] (pixels of alpha >= 0.5: the glyph's strokes); with
  return_layers also 'background', 'masks', 'visible' and 'pasted'.
  """
  rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
  img = photos.background(rng, h, w)
  bg_layer = img.copy() if return_layers else None
  uncovered = np.ones((h, w), np.float32) if return_layers else None
  num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  num_glyphs = int(rng.integers(MIN_GLYPH_DISTRACTORS, MAX_GLYPH_DISTRACTORS + 1))
  num_patches = int(rng.integers(0, MAX_PATCH_DISTRACTORS + 1))
  kinds = rng.permutation([2] * num_objects + [1] * num_glyphs + [0] * num_patches)
  fonts = tuple(FONT_FILES)
  all_photos = photos.photos()
  patch_photos = [n for n in photos.PHOTO_FILES if n != 'present']
  pasted: list[photos.Pasted] = []
  for kind in kinds.tolist():
    category_id = None
    if kind == 2:
      category_id = int(rng.integers(len(CATEGORIES))) + 1
      made = _glyph(rng, img, CHARACTERS[category_id - 1], fonts, h, w)
    elif kind == 1:
      k = int(rng.integers(len(DISTRACTOR_CHARACTERS) + len(GREEK_CHARACTERS)))
      if k < len(DISTRACTOR_CHARACTERS):
        made = _glyph(rng, img, DISTRACTOR_CHARACTERS[k], fonts, h, w)
      else:
        made = _glyph(rng, img, GREEK_CHARACTERS[k - len(DISTRACTOR_CHARACTERS)],
                      _GREEK_FONTS, h, w)
    else:
      photo = all_photos[patch_photos[int(rng.integers(len(patch_photos)))]]
      crop = photos.free_window(rng, photo, 24, 0.7 * min(photo.image.size),
                                photos.loguniform(rng, 0.5, 2.0))
      made = None
      if crop is not None:
        size = photos.loguniform(rng, MIN_FONT_SIZE, 2 * MAX_FONT_SIZE)
        th, tw = photos.patch_size(rng, size, (crop[2] - crop[0]) / (crop[3] - crop[1]), h, w)
        shape = 'ellipse' if rng.random() < 0.5 else 'rect'
        rgb, alpha = photos.cut(rng, photo, crop, shape, th, tw, 0.3)
        made = (rgb, alpha) + photos.place(rng, th, tw, h, w)
    if made is None:
      continue
    rgb, alpha, y0, x0 = made
    if photos.covers_too_much(y0, x0, *alpha.shape, pasted, MAX_COVER):
      continue
    photos.paste_and_record(img, rgb, alpha, y0, x0, pasted, category_id,
                            uncovered)
  return photos.finish(rng, img, pasted, MIN_VISIBLE, MIN_BOX_SIDE, bg_layer,
                       uncovered)


SET = generated.GeneratedSet(
    module='mimicdet_jax.data.glyphs', doc=__doc__, render=render_example,
    categories=CATEGORIES,
    description='mimicdet_jax glyphs (characters from packaged fonts on packaged photographs)',
    min_size=192, max_size=384, smallest=2 * MAX_FONT_SIZE)
write_split, main = SET.write_split, SET.main


if __name__ == '__main__':
  errors.cli(main)(sys.argv[1:])
