"""Greedy non-maximum suppression on fixed-size inputs (jit / vmap friendly).

Semantics are torchvision.ops.nms: boxes are visited in descending score order
(a stable sort, so equal scores keep the lower index first); a box is kept
unless a kept box visited earlier has IoU strictly greater than the threshold
with it. The result is the kept indices in visiting order, padded to a fixed
`max_output_size` with a validity mask.

Algorithm (blocked suppression, as TF's `non_max_suppression_padded`): the
sorted boxes are cut into tiles of `tile_size`. For each tile, one [T, N] IoU
block against all boxes removes the tile's boxes overlapping boxes kept in
earlier tiles; the greedy order inside the tile is then resolved by a
fixed-point iteration `keep_j = cand_j & ~any_{i<j}(keep_i & iou_ij > t)`,
which equals the sequential greedy result after at most T rounds and usually
after a handful. Tiles stop as soon as `max_output_size` boxes are kept. Work
is O(N^2) in big vectorised blocks and memory O(N T); there are no per-box
sequential steps.
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from mimicdet_jax.ops.boxes import box_iou

Array = jnp.ndarray


def _sort_order(scores: Array, valid: Array) -> Array:
  """Descending score, ties by lower index, invalid entries last."""
  order = jnp.argsort(-scores, stable=True)
  # A second stable sort moves the invalid entries to the back and keeps the
  # score order among valid ones (and does not depend on what invalid entries
  # hold: -inf, NaN or anything).
  order = order[jnp.argsort(~valid[order], stable=True)]
  return order


def _nms_sorted(boxes: Array, valid: Array, classes: Optional[Array],
                iou_threshold, max_output_size: int, tile_size: int) -> Array:
  """Keep mask [N] over boxes already sorted in visiting order."""
  n = boxes.shape[0]
  t = max(1, min(tile_size, n))
  num_tiles = -(-n // t)
  n_pad = num_tiles * t
  pad = n_pad - n
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  if classes is not None:
    classes = jnp.pad(classes, (0, pad))
  upper = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # i before j

  def tile_body(state):
    tile, keep, _ = state
    start = tile * t
    tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, t)
    overlap = box_iou(tile_boxes, boxes) > iou_threshold  # [T, N_pad]
    if classes is not None:
      tile_classes = jax.lax.dynamic_slice_in_dim(classes, start, t)
      overlap &= tile_classes[:, None] == classes[None, :]
    # keep[] is still False from `start` on, so this only sees earlier tiles.
    suppressed = jnp.any(overlap & keep[None, :], axis=1)
    cand = jax.lax.dynamic_slice_in_dim(valid, start, t) & ~suppressed
    # [i, j]: i (earlier in the tile) would suppress j.
    inner = jax.lax.dynamic_slice_in_dim(overlap, start, t, axis=1) & upper

    def fix_body(s):
      k, _ = s
      new = cand & ~jnp.any(inner & k[:, None], axis=0)
      return new, jnp.any(new != k)

    tile_keep, _ = jax.lax.while_loop(lambda s: s[1], fix_body,
                                      (cand, jnp.array(True)))
    keep = jax.lax.dynamic_update_slice_in_dim(keep, tile_keep, start, 0)
    return tile + 1, keep, jnp.sum(keep)

  def tile_cond(state):
    tile, _, count = state
    return (tile < num_tiles) & (count < max_output_size)

  _, keep, _ = jax.lax.while_loop(
      tile_cond, tile_body,
      (jnp.array(0), jnp.zeros(n_pad, bool), jnp.array(0)))
  return keep[:n]


def _nms_impl(boxes, scores, classes, iou_threshold, max_output_size, valid,
              tile_size):
  n = boxes.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  order = _sort_order(scores, valid)
  keep = _nms_sorted(boxes[order], valid[order],
                     None if classes is None else classes[order],
                     iou_threshold, max_output_size, tile_size)
  # Positions (in visiting order) of the first max_output_size kept boxes.
  pos = jnp.nonzero(keep, size=max_output_size, fill_value=0)[0]
  out_valid = jnp.arange(max_output_size) < jnp.sum(keep)
  indices = jnp.where(out_valid, order[pos], 0).astype(jnp.int32)
  return indices, out_valid


@functools.partial(jax.jit, static_argnames=('max_output_size', 'tile_size'))
def nms(boxes: Array, scores: Array, iou_threshold, max_output_size: int,
        valid: Optional[Array] = None,
        tile_size: int = 512) -> Tuple[Array, Array]:
  """Greedy NMS with torchvision.ops.nms's kept set and order.

  Args:
    boxes: [N, 4] x1y1x2y2.
    scores: [N].
    iou_threshold: a box is suppressed by a kept box with IoU > threshold
      (strictly, as torchvision). May be a traced scalar.
    max_output_size: static output length.
    valid: optional bool [N]; invalid entries are never kept and never
      suppress anything (whatever their score).
    tile_size: static block size of the suppression (speed only).
  Returns:
    indices: int32 [max_output_size], kept indices into `boxes` in descending
      score order; entries past the kept count are 0.
    valid: bool [max_output_size], True for the real entries.
  Use `jax.vmap` for a batch.
  """
  return _nms_impl(boxes, scores, None, iou_threshold, max_output_size, valid,
                   tile_size)


@functools.partial(jax.jit, static_argnames=('max_output_size', 'tile_size'))
def batched_nms(boxes: Array, scores: Array, classes: Array, iou_threshold,
                max_output_size: int, valid: Optional[Array] = None,
                tile_size: int = 512) -> Tuple[Array, Array]:
  """Per-class NMS (torchvision.ops.batched_nms), one call for all classes.

  Boxes only suppress boxes of the same class. torchvision gets this with the
  coordinate-offset trick (each class shifted by `class * (max_coord + 1)`);
  here the IoU block is masked by class equality, which keeps exactly the
  same set (offset boxes of different classes never overlap) without the
  float32 rounding that large offsets cause. The output order is descending
  score over all classes, as torchvision's.

  Args:
    boxes: [N, 4]; scores: [N]; classes: int [N].
    iou_threshold, max_output_size, valid, tile_size: as `nms`.
  Returns:
    (indices int32 [max_output_size], valid bool [max_output_size]).
  """
  return _nms_impl(boxes, scores, classes, iou_threshold, max_output_size,
                   valid, tile_size)
