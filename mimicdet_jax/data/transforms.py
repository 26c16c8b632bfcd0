"""Raw example -> fixed-shape model example, and batching onto canvases.

Steps (NumPy, run in grain workers):
1. Resize so the shorter side is S (train: one of `data.train_min_sizes`,
   drawn with the example's rng; eval: `data.min_size`) unless the longer side
   would exceed `data.max_size`; then the longer side is `data.max_size`.
   Training with `data.augment='lsj'` (large-scale jitter) instead: resize to
   fit `data.lsj_size` x f (f uniform in `data.lsj_scale`), then a random
   crop to at most lsj_size x lsj_size (`lsj_geometry`); boxes are shifted,
   clipped, and dropped when a clipped side is <= `data.lsj_min_box_side`
   (counted: `lsj_dropped_count`). Every training batch is then one
   lsj_size x lsj_size canvas.
2. Train only: horizontal flip with probability `data.hflip_prob`.
3. Normalise with `data.pixel_mean` / `data.pixel_std` (RGB, 0..255 scale),
   unless `normalize=False`: the training loader then ships the resized
   uint8 pixels (4x fewer bytes to copy, stack and transfer) and the jitted
   step normalises them with `normalize_on_device`, bit-identically
   (`data.device_normalize`).
4. Zero-pad to a canvas from `data.canvas_buckets` (see `choose_canvas`).
5. Boxes to canvas pixels, padded to `data.max_boxes` with `box_mask`.
   With more boxes than that, the largest (by area) are kept.

Canvas choice: an example alone is padded to the smallest bucket (by area)
that holds it; a batch is padded to the smallest bucket that holds all its
images (`collate`). Each bucket is one compiled shape. With several hosts
every batch uses the largest bucket (`fixed_canvas`), as all hosts must feed
the same shape to one jitted step.

Mapping boxes back to original pixels: x_orig = x * orig_w / image_size_w
(and y likewise); `scale` is the nominal factor (resized = original * scale,
up to rounding of the resized size to whole pixels).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mimicdet_jax.errors import ConfigError

logger = logging.getLogger(__name__)

Example = dict[str, Any]

# data.augment, the training resize: resize (shorter side from
# data.train_min_sizes, the paper) | lsj (large-scale jitter on one canvas).
AUGMENTS = ('resize', 'lsj')

# Counted per process; logged on the first truncation / the first drop.
_truncation_count = 0
_lsj_dropped_count = 0


def truncation_count() -> int:
  """How many examples of this process had more than data.max_boxes boxes."""
  return _truncation_count


def lsj_dropped_count() -> int:
  """How many boxes this process's LSJ crops left empty (dropped)."""
  return _lsj_dropped_count


def lsj_geometry(h: int, w: int, size: int, factor: float,
                 offset_fraction: tuple[float, float]
                 ) -> tuple[int, int, float, int, int]:
  """(new_h, new_w, scale, top, left) of one large-scale-jitter example.

  The image is resized by `scale` so that it fits size * factor on both
  sides (aspect kept, sides rounded; detectron2's ResizeScale), then the
  window [top, top + size) x [left, left + size) is cut from it; where the
  resized image is smaller than `size` on a side, that side's offset is 0
  and the canvas is zero-padded at the bottom/right (FixedSizeCrop).
  offset_fraction (u_y, u_x) in [0, 1): offset = round(u * (new - size)) on
  each side with room, drawn independently per axis (TF Model Garden's
  resize_and_crop_image; detectron2 uses one draw for both axes).
  """
  scale = min(size * factor / h, size * factor / w)
  new_h = max(1, int(round(h * scale)))
  new_w = max(1, int(round(w * scale)))
  top = int(round(offset_fraction[0] * max(new_h - size, 0)))
  left = int(round(offset_fraction[1] * max(new_w - size, 0)))
  return new_h, new_w, float(scale), top, left


def resized_size(h: int, w: int, short_side: int, max_size: int
                 ) -> tuple[int, int, float]:
  """(new_h, new_w, scale): shorter side -> short_side, longer <= max_size."""
  scale = min(short_side / min(h, w), max_size / max(h, w))
  new_h = max(1, min(int(round(h * scale)), max_size))
  new_w = max(1, min(int(round(w * scale)), max_size))
  return new_h, new_w, float(scale)


def _bucket_list(buckets: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
  out = [(int(b[0]), int(b[1])) for b in buckets]
  if not out:
    raise ValueError('data.canvas_buckets is empty')
  return out


def choose_canvas(image_sizes: Sequence[Sequence[int]] | np.ndarray,
                  buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """Smallest bucket (by area, then listed order) holding every (h, w) given.

  Raises:
    ValueError: naming data.canvas_buckets when no bucket holds them all.
  """
  sizes = np.asarray(image_sizes, np.int64).reshape(-1, 2)
  need_h, need_w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
  fits = [b for b in _bucket_list(buckets) if b[0] >= need_h and b[1] >= need_w]
  if not fits:
    raise ValueError(
        f'no canvas in data.canvas_buckets={tuple(buckets)} holds an image of '
        f'(h, w)=({need_h}, {need_w}); add a bucket or lower data.max_size')
  return min(fits, key=lambda b: b[0] * b[1])


def largest_canvas(buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The bucket that holds every other bucket (used when shapes must agree)."""
  bl = _bucket_list(buckets)
  big = (max(b[0] for b in bl), max(b[1] for b in bl))
  if big not in bl:
    raise ValueError(
        f'data.canvas_buckets={tuple(buckets)} has no bucket holding all the '
        f'others; add {big} (needed when several hosts must agree on a shape)')
  return big


def check_lsj_config(data) -> None:
  """ConfigError naming the key for bad data.lsj_* values (under lsj)."""
  if data.augment != 'lsj':
    return
  if data.lsj_size < 1 or data.lsj_size % data.size_divisor:
    raise ConfigError(f'data.lsj_size={data.lsj_size} must be a positive '
                      f'multiple of data.size_divisor={data.size_divisor}')
  lo, hi = (float(v) for v in data.lsj_scale)
  if not 0 < lo <= hi:
    raise ConfigError(f'data.lsj_scale={tuple(data.lsj_scale)}; expected '
                      '(low, high) with 0 < low <= high')


def check_data_config(data) -> None:
  """Static checks of the data.* keys the transforms read."""
  check_lsj_config(data)
  for b in _bucket_list(data.canvas_buckets):
    if b[0] % data.size_divisor or b[1] % data.size_divisor:
      raise ValueError(f'data.canvas_buckets entry {b} is not divisible by '
                       f'data.size_divisor={data.size_divisor}')
  if data.max_boxes < 1:
    raise ValueError(f'data.max_boxes must be >= 1, got {data.max_boxes}')
  # The training sizes only where training resizes (lsj crops to its canvas).
  sizes = ([] if data.augment == 'lsj' else list(data.train_min_sizes)) + [
      data.min_size]
  for s in sizes:
    # The largest resized image: shorter side s, longer side max_size.
    side = min(int(s), int(data.max_size))
    choose_canvas([(side, data.max_size)], data.canvas_buckets)
    choose_canvas([(data.max_size, side)], data.canvas_buckets)


def _truncate(boxes: np.ndarray, max_boxes: int, image_id: int) -> np.ndarray:
  """Indices of the boxes kept: all, or the `max_boxes` largest in file order."""
  global _truncation_count
  n = boxes.shape[0]
  if n <= max_boxes:
    return np.arange(n)
  if not _truncation_count:
    logger.warning(
        'image %d has %d boxes > data.max_boxes=%d; keeping the largest '
        '(further cases are only counted, see transforms.truncation_count())',
        image_id, n, max_boxes)
  _truncation_count += 1
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return np.sort(np.argsort(-area, kind='stable')[:max_boxes])


def transform_example(example: Example, data, *, train: bool,
                      rng: np.random.Generator | None = None,
                      canvas: tuple[int, int] | None = None,
                      normalize: bool = True, pad: bool = True) -> Example:
  """Raw example dict -> model example dict (docs/ARCHITECTURE.md).

  Args:
    example: raw dict from a source: image uint8 [H, W, 3], boxes float32
      [n, 4] x1y1x2y2 original pixels, classes int32 [n], is_crowd bool [n],
      image_id, orig_size int32 [2].
    data: the `config.data` ConfigDict.
    train: random scale choice and flip (needs `rng`) when True.
    rng: per-example generator (grain's RandomMapTransform supplies it).
    canvas: (Hc, Wc) to pad to; None = smallest bucket that holds the image.
    normalize: False keeps the pixels: image uint8 [Hc, Wc, 3], zero-padded,
      for `normalize_on_device`.
    pad: False returns the image at its resized size [h, w, 3], unpadded
      (`canvas` unused): `collate` writes it straight into the batch's
      canvas, so a training image is copied once instead of three times
      (pad to its own bucket, pad to the batch's, stack).

  Returns:
    image float32 [Hc, Wc, 3] normalised and zero-padded (uint8 pixels when
    not `normalize`), image_size int32
    [2], boxes float32 [max_boxes, 4] canvas pixels, classes int32
    [max_boxes], box_mask bool, is_crowd bool, image_id int64 [], orig_size
    int32 [2], scale float32 [].
  """
  image = np.asarray(example['image'])
  h, w = image.shape[:2]
  lsj = train and data.augment == 'lsj'
  top = left = 0
  if train:
    if rng is None:
      raise ValueError('train transforms need an rng')
    if lsj:  # draws: the factor, the two offset fractions, the flip
      size = int(data.lsj_size)
      factor = float(rng.uniform(*(float(v) for v in data.lsj_scale)))
      u_y, u_x = (float(v) for v in rng.uniform(size=2))
      new_h, new_w, scale, top, left = lsj_geometry(h, w, size, factor,
                                                    (u_y, u_x))
    else:
      sizes = tuple(data.train_min_sizes)
      short = int(sizes[int(rng.integers(len(sizes)))])
    flip = bool(rng.random() < data.hflip_prob)
  else:
    short, flip = int(data.min_size), False
  if not lsj:
    new_h, new_w, scale = resized_size(h, w, short, int(data.max_size))
  if (new_h, new_w) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                     Image.BILINEAR))
  boxes = np.asarray(example['boxes'], np.float32).reshape(-1, 4)
  # Per-axis factors keep boxes on the same pixels as the resized image.
  boxes = boxes * np.array([new_w / w, new_h / h] * 2, np.float32)
  keep = np.arange(boxes.shape[0])
  if lsj:
    image = image[top:top + size, left:left + size]
    new_h, new_w = image.shape[:2]
    boxes = boxes - np.array([left, top] * 2, np.float32)
  boxes = np.clip(boxes, 0, np.array([new_w, new_h] * 2, np.float32))
  if lsj:
    keep = _lsj_kept(boxes, float(data.lsj_min_box_side))
    boxes = boxes[keep]
  if flip:
    image = image[:, ::-1]
    boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0],
                      boxes[:, 3]], axis=1)

  if not pad:
    canvas = (new_h, new_w)
  elif canvas is None and lsj:
    canvas = (size, size)
  elif canvas is None:
    canvas = choose_canvas([(new_h, new_w)], data.canvas_buckets)
  hc, wc = canvas
  if new_h > hc or new_w > wc:
    raise ValueError(f'image of (h, w)=({new_h}, {new_w}) does not fit the '
                     f'canvas {canvas} (data.canvas_buckets)')
  if not pad and not normalize:
    padded = image  # collate copies it into the batch's canvas
  elif normalize:
    mean, inv_std = _mean_and_inv_std(data)
    padded = np.zeros((hc, wc, 3), np.float32)
    inside = padded[:new_h, :new_w]  # a view: normalise in place, pad stays 0
    inside[...] = image
    inside -= mean
    inside *= inv_std
  else:
    padded = np.zeros((hc, wc, 3), np.uint8)
    padded[:new_h, :new_w] = image

  max_boxes = int(data.max_boxes)
  image_id = int(example['image_id'])
  kept = _truncate(boxes, max_boxes, image_id)
  n = kept.size
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_boxes[:n] = boxes[kept]
  keep = keep[kept]  # indices into the example's boxes
  classes = np.zeros((max_boxes,), np.int32)
  classes[:n] = np.asarray(example['classes'], np.int32).reshape(-1)[keep]
  is_crowd = np.zeros((max_boxes,), bool)
  is_crowd[:n] = np.asarray(example['is_crowd'], bool).reshape(-1)[keep]
  box_mask = np.zeros((max_boxes,), bool)
  box_mask[:n] = True
  return {
      'image': padded,
      'image_size': np.array([new_h, new_w], np.int32),
      'boxes': out_boxes,
      'classes': classes,
      'box_mask': box_mask,
      'is_crowd': is_crowd,
      'image_id': np.int64(image_id),  # COCO-format ids may pass 2**31
      'orig_size': np.asarray(example['orig_size'], np.int32).reshape(2),
      'scale': np.float32(scale),
  }


def _lsj_kept(boxes: np.ndarray, min_side: float) -> np.ndarray:
  """Indices of the clipped boxes whose both sides exceed min_side; counts
  the others (detectron2's filter_empty_instances rule)."""
  global _lsj_dropped_count
  ok = ((boxes[:, 2] - boxes[:, 0] > min_side) &
        (boxes[:, 3] - boxes[:, 1] > min_side))
  dropped = int(np.sum(~ok))
  if dropped and not _lsj_dropped_count:
    logger.info('data.augment=lsj: boxes cropped to a side <= '
                'data.lsj_min_box_side=%g are dropped (counted, see '
                'transforms.lsj_dropped_count())', min_side)
  _lsj_dropped_count += dropped
  return np.flatnonzero(ok)


def _mean_and_inv_std(data) -> tuple[np.ndarray, np.ndarray]:
  """float32 [3] mean and 1 / std, the exact constants of both paths."""
  mean = np.asarray(data.pixel_mean, np.float32)
  return mean, np.float32(1.0) / np.asarray(data.pixel_std, np.float32)


def normalize_on_device(images, image_size, data):
  """uint8 canvases -> the float32 model input `transform_example` makes.

  Args:
    images: uint8 [..., Hc, Wc, 3] from `transform_example(normalize=False)`.
    image_size: int [..., 2] (h, w) of each image inside its canvas.
    data: the `config.data` ConfigDict (pixel_mean, pixel_std).
  Returns:
    float32 [..., Hc, Wc, 3]: (pixel - mean) * (1 / std) inside the image,
    0 in the padding; bit-identical to the host path (same float32 ops in
    the same order).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mean, inv_std = _mean_and_inv_std(data)
  hc, wc = images.shape[-3:-1]
  h = image_size[..., 0, None, None]
  w = image_size[..., 1, None, None]
  inside = ((jnp.arange(hc)[:, None] < h) &
            (jnp.arange(wc)[None, :] < w))[..., None]  # [..., Hc, Wc, 1]
  normalised = (images.astype(jnp.float32) - mean) * inv_std
  return jnp.where(inside, normalised, jnp.float32(0))


def collate(examples: Sequence[Example], buckets: Sequence[Sequence[int]],
            fixed_canvas: tuple[int, int] | None = None) -> Example:
  """Stacks model examples into a batch [B, ...] on one canvas.

  The canvas is `fixed_canvas`, else the smallest bucket holding every image.
  Examples may be padded (to any canvas) or not (`transform_example(...,
  pad=False)`): only the `image_size` corner of each image is copied, into
  one zero-initialised batch array, and the rest of the canvas is 0 either
  way.
  """
  canvas = fixed_canvas or choose_canvas(
      [e['image_size'] for e in examples], buckets)
  hc, wc = canvas
  first = examples[0]['image']
  images = np.zeros((len(examples), hc, wc) + first.shape[2:], first.dtype)
  for i, e in enumerate(examples):
    h, w = (int(v) for v in e['image_size'])
    if h > hc or w > wc:
      raise ValueError(f'image of (h, w)=({h}, {w}) does not fit canvas '
                       f'{canvas}')
    images[i, :h, :w] = e['image'][:h, :w]
  batch = {k: np.stack([e[k] for e in examples])
           for k in examples[0] if k != 'image'}
  batch['image'] = images
  return {k: batch[k] for k in examples[0]}
