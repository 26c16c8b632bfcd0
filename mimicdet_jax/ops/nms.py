"""Greedy non-maximum suppression on fixed-size inputs (jit / vmap friendly).

Semantics are torchvision.ops.nms: boxes are visited in descending score order
(a stable sort, so equal scores keep the lower index first); a box is kept
unless a kept box visited earlier has IoU strictly greater than the threshold
with it. The result is the kept indices in visiting order, padded to a fixed
`max_output_size` with a validity mask.

Algorithm (blocked suppression, like TF's `non_max_suppression_padded`): the
sorted boxes are cut into tiles of `tile_size` T. For each tile, one
[T, max_output_size] IoU block against the boxes kept so far removes the
tile's boxes they suppress; the greedy order inside the tile is then resolved
by a fixed-point iteration `keep_j = cand_j & ~any_{i<j}(keep_i & iou_ij > t)`,
which equals the sequential greedy result after at most T rounds and usually
after a handful; the tile's kept boxes are appended to the kept list. Tiles
stop once `max_output_size` boxes are kept or the valid boxes are used up.
Work is O(N * max_output_size) in big vectorised blocks, memory
O(T * (T + max_output_size)); there are no per-box sequential steps. (E.g.
per-class NMS of 1000 boxes x 80 classes -> 100 touches a few [T, 100]
blocks, not an 80000^2 matrix.)

`soft_nms` is the Gaussian soft-NMS of Bodla et al. 2017 ("Soft-NMS --
Improving Object Detection With One Line of Code"): instead of removing the
boxes a kept box overlaps, it multiplies their scores by exp(-IoU^2 / sigma)
and drops a box only once its decayed score falls below a threshold
(docs/EVAL.md says which anchors it follows).
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from mimicdet_jax.ops.boxes import box_iou

Array = jnp.ndarray

# eval.nms: greedy NMS (`batched_nms`) or Gaussian soft-NMS (`soft_nms`);
# config_lib.resolve checks the key against this tuple.
NMS_KINDS = ('hard', 'soft')


def _sort_order(scores: Array, valid: Array) -> Array:
  """Descending score, ties by lower index, invalid entries last."""
  order = jnp.argsort(-scores, stable=True)
  # A second stable sort moves the invalid entries to the back and keeps the
  # score order among valid ones (and does not depend on what invalid entries
  # hold: -inf, NaN or anything).
  order = order[jnp.argsort(~valid[order], stable=True)]
  return order


def _nms_sorted(boxes: Array, valid: Array, classes: Optional[Array],
                iou_threshold, max_output_size: int,
                tile_size: int) -> Tuple[Array, Array]:
  """Greedy NMS over boxes already sorted in visiting order (valid first).

  Returns:
    positions int32 [max_output_size] of the kept boxes in visiting order
    (entries past `count` are 0) and count, the number kept.
  """
  n = boxes.shape[0]
  t = max(1, min(tile_size, n))
  num_tiles = -(-n // t)
  pad = num_tiles * t - n
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  if classes is not None:
    classes = jnp.pad(classes, (0, pad))
  num_valid = jnp.sum(valid)
  upper = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # i before j
  slots = jnp.arange(max_output_size)

  def tile_body(state):
    tile, kept_boxes, kept_classes, kept_pos, count = state
    start = tile * t
    tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, t)
    tile_valid = jax.lax.dynamic_slice_in_dim(valid, start, t)
    # Boxes kept in earlier tiles (at most max_output_size of them).
    overlap = ((box_iou(tile_boxes, kept_boxes) > iou_threshold) &
               (slots < count)[None, :])  # [T, max_output_size]
    inner = (box_iou(tile_boxes, tile_boxes) > iou_threshold) & upper
    if classes is not None:
      tile_classes = jax.lax.dynamic_slice_in_dim(classes, start, t)
      overlap &= tile_classes[:, None] == kept_classes[None, :]
      inner &= tile_classes[:, None] == tile_classes[None, :]
    cand = tile_valid & ~jnp.any(overlap, axis=1)

    # Greedy order inside the tile: inner[i, j] = earlier i would suppress j.
    def fix_body(s):
      k, _ = s
      new = cand & ~jnp.any(inner & k[:, None], axis=0)
      return new, jnp.any(new != k)

    tile_keep, _ = jax.lax.while_loop(lambda s: s[1], fix_body,
                                      (cand, jnp.array(True)))
    # Append the tile's kept boxes; slots past the end are dropped.
    slot = jnp.where(tile_keep, count + jnp.cumsum(tile_keep) - 1,
                     max_output_size)
    kept_boxes = kept_boxes.at[slot].set(tile_boxes, mode='drop')
    kept_pos = kept_pos.at[slot].set(start + jnp.arange(t, dtype=jnp.int32),
                                     mode='drop')
    if classes is not None:
      kept_classes = kept_classes.at[slot].set(tile_classes, mode='drop')
    count = jnp.minimum(count + jnp.sum(tile_keep), max_output_size)
    return tile + 1, kept_boxes, kept_classes, kept_pos, count

  def tile_cond(state):
    tile, _, _, _, count = state
    return ((tile < num_tiles) & (count < max_output_size) &
            (tile * t < num_valid))

  init = (jnp.array(0), jnp.zeros((max_output_size, 4), boxes.dtype),
          jnp.zeros((max_output_size,),
                    jnp.int32 if classes is None else classes.dtype),
          jnp.zeros((max_output_size,), jnp.int32), jnp.array(0))
  _, _, _, kept_pos, count = jax.lax.while_loop(tile_cond, tile_body, init)
  return kept_pos, count


def _nms_impl(boxes, scores, classes, iou_threshold, max_output_size, valid,
              tile_size):
  n = boxes.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  order = _sort_order(scores, valid)
  kept_pos, count = _nms_sorted(
      boxes[order], valid[order], None if classes is None else classes[order],
      iou_threshold, max_output_size, tile_size)
  out_valid = jnp.arange(max_output_size) < count
  indices = jnp.where(out_valid, order[kept_pos], 0).astype(jnp.int32)
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


@functools.partial(jax.jit, static_argnames=('max_output_size',))
def soft_nms(boxes: Array, scores: Array, classes: Optional[Array], sigma,
             score_threshold, max_output_size: int,
             valid: Optional[Array] = None) -> Tuple[Array, Array, Array]:
  """Per-class Gaussian soft-NMS (Bodla et al. 2017), static shapes.

  The published loop: among the remaining boxes pick the one of highest
  current score (ties: the lower index), keep it with that score, multiply
  the score of every remaining box of its class by exp(-IoU^2 / sigma),
  and drop the remaining boxes whose score is now below `score_threshold`;
  repeat. Scores only fall, so each pick scores at most the one before: the
  first `max_output_size` picks are the top `max_output_size` of the whole
  run, and the loop (a `lax.while_loop`, one pick and one [N] IoU row per
  iteration) stops after them, or once no box remains. Work is
  O(max_output_size * N), memory O(N).

  Args:
    boxes: [N, 4] x1y1x2y2.
    scores: [N].
    classes: int [N] (boxes decay only boxes of their own class), or None
      for one class.
    sigma: the Gaussian's width (> 0); may be a traced scalar.
    score_threshold: boxes scoring below it, at the start or after a decay,
      are dropped; may be a traced scalar.
    max_output_size: static output length.
    valid: optional bool [N]; invalid entries are never kept and never
      decay anything.
  Returns:
    indices int32 [max_output_size] into `boxes`, in pick order (descending
    decayed score; 0 past the kept count); scores float32 [max_output_size],
    the decayed scores (0 past the count); valid bool [max_output_size].
  """
  n = boxes.shape[0]
  boxes = boxes.astype(jnp.float32)
  scores = scores.astype(jnp.float32)
  alive = jnp.ones((n,), bool) if valid is None else valid
  alive &= scores >= score_threshold
  current = jnp.where(alive, scores, -jnp.inf)
  out_idx = jnp.zeros((max_output_size,), jnp.int32)
  out_scores = jnp.zeros((max_output_size,), jnp.float32)

  def body(state):
    i, current, alive, out_idx, out_scores = state
    j = jnp.argmax(current).astype(jnp.int32)  # first maximum: lower index
    iou = box_iou(boxes[j][None], boxes)[0]  # [N]
    decay = jnp.exp(-iou * iou / sigma)
    if classes is not None:
      decay = jnp.where(classes == classes[j], decay, 1.0)
    decayed = current * decay
    out_idx = out_idx.at[i].set(j)
    out_scores = out_scores.at[i].set(current[j])
    alive = alive & (decayed >= score_threshold) & (jnp.arange(n) != j)
    current = jnp.where(alive, decayed, -jnp.inf)
    return i + 1, current, alive, out_idx, out_scores

  def cond(state):
    i, _, alive, _, _ = state
    return (i < max_output_size) & jnp.any(alive)

  count, _, _, out_idx, out_scores = jax.lax.while_loop(
      cond, body, (jnp.array(0, jnp.int32), current, alive, out_idx,
                   out_scores))
  return out_idx, out_scores, jnp.arange(max_output_size) < count
