"""Fixed-size proposals from the refinement module (SPEC 3, "Proposals").

Decode the refined box at every dense position, clip it to the image, keep
the top `proposals.pre_nms_topk` positions per level by objectness, run one
class-agnostic NMS (`proposals.nms_threshold`) over all levels and keep exactly
`proposals.num_proposals` per image, padded, with a validity mask and each
proposal's origin (its flat dense index; models.anchors.dense_anchors maps it
to level, y, x). Zero-area boxes (e.g. wholly outside the image before
clipping) are invalid. No gradient flows through the proposals.

With `proposals.inside_image` (default) only positions whose cell centre lies
inside the image compete in the top-k: cells of the canvas padding are never
proposals (SPEC 3). False restores the old behaviour, where a padding cell
with a high objectness could take a slot.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax.models import anchors
from mimicdet_jax.ops import boxes as box_ops
from mimicdet_jax.ops.nms import nms


def level_sizes(canvas_hw: Sequence[int], levels: Sequence[int]) -> tuple[int, ...]:
  """Number of dense positions per level, in flat order (static Python ints)."""
  return tuple(h * w for h, w in (anchors.level_shape(canvas_hw, l)
                                  for l in levels))


def cells_inside_image(anchor_boxes: jax.Array,
                       image_size: jax.Array) -> jax.Array:
  """Positions whose cell centre lies inside the image, [..., A] bool.

  Anchors are centred on their cell, so the anchor centre is the cell centre.
  anchor_boxes [A, 4] canvas pixels; image_size [..., 2] (h, w).
  """
  cx = 0.5 * (anchor_boxes[:, 0] + anchor_boxes[:, 2])
  cy = 0.5 * (anchor_boxes[:, 1] + anchor_boxes[:, 3])
  h = image_size[..., 0:1].astype(jnp.float32)
  w = image_size[..., 1:2].astype(jnp.float32)
  return (cx < w) & (cy < h)


def generate_proposals(refine_logits: jax.Array, refine_deltas: jax.Array,
                       anchor_boxes: jax.Array, image_size: jax.Array, *,
                       sizes: Sequence[int], stds, scale_clip: float,
                       pre_nms_topk: int, nms_threshold: float,
                       num_proposals: int,
                       inside_image: bool = True,
                       nms_tile_size: int = 512) -> dict[str, jax.Array]:
  """Proposals of one image.

  Args:
    refine_logits: [A] objectness logits.
    refine_deltas: [A, 4] deltas on the anchors (`refine.stds`).
    anchor_boxes: [A, 4].
    image_size: [2] int (h, w) of the image inside the canvas; boxes are
      clipped to it.
    sizes: static positions per level (level_sizes), summing to A.
    stds, scale_clip: `refine.stds`, `box.scale_clip`.
    pre_nms_topk, nms_threshold, num_proposals, inside_image, nms_tile_size:
      `proposals.*`.

  Returns:
    dict with `boxes` [P, 4] (zeros where invalid), `scores` [P] objectness
    logits (-inf where invalid), `valid` [P] bool, `origin` [P] int32 flat
    dense index (0 where invalid); P = num_proposals, sorted by score.
  """
  num_positions = refine_logits.shape[0]
  if sum(sizes) != num_positions:
    raise ValueError(f'level sizes {tuple(sizes)} do not sum to {num_positions}')
  refine_logits = jax.lax.stop_gradient(refine_logits).astype(jnp.float32)
  refine_deltas = jax.lax.stop_gradient(refine_deltas).astype(jnp.float32)
  boxes = box_ops.decode_deltas(refine_deltas, anchor_boxes, stds,
                                scale_clip=scale_clip)
  boxes = box_ops.clip_boxes(boxes, image_size)
  if inside_image:
    inside = cells_inside_image(anchor_boxes, image_size)
    refine_logits = jnp.where(inside, refine_logits, -jnp.inf)

  starts = np.cumsum((0,) + tuple(sizes))[:-1]
  candidates = []
  for start, size in zip(starts, sizes):
    _, idx = jax.lax.top_k(refine_logits[start:start + size],
                           min(pre_nms_topk, size))
    candidates.append(idx + int(start))
  cand = jnp.concatenate(candidates).astype(jnp.int32)
  if cand.shape[0] < num_proposals:
    # Too few positions for a full set: pad with a (to be masked) index.
    cand = jnp.concatenate(
        [cand, jnp.full((num_proposals - cand.shape[0],), -1, jnp.int32)])
  real = cand >= 0
  cand = jnp.maximum(cand, 0)
  c_boxes = boxes[cand]
  c_scores = refine_logits[cand]
  c_valid = (real & (c_boxes[:, 2] > c_boxes[:, 0]) &
             (c_boxes[:, 3] > c_boxes[:, 1]) & jnp.isfinite(c_scores) &
             jnp.all(jnp.isfinite(c_boxes), axis=1))
  c_scores = jnp.where(c_valid, c_scores, -jnp.inf)
  keep, keep_valid = nms(c_boxes, c_scores, nms_threshold, num_proposals,
                         valid=c_valid, tile_size=nms_tile_size)
  keep_valid = keep_valid & c_valid[keep]
  return dict(
      boxes=jnp.where(keep_valid[:, None], c_boxes[keep], 0.0),
      scores=jnp.where(keep_valid, c_scores[keep], -jnp.inf),
      valid=keep_valid,
      origin=jnp.where(keep_valid, cand[keep], 0).astype(jnp.int32))
