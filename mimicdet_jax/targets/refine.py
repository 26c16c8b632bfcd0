"""Refinement-module targets: which dense positions are positive, for which gt.

SPEC 3 (L_R): each gt box goes to one S-level by scale,
  l = clamp(round(log2(sqrt(w h) / model.anchor_scale)), min(s_levels), max(s_levels)),
the level whose square anchor (anchor_scale * 2^l) is closest in log scale. A
position of that level is positive when its centre lies inside the gt shrunk
about its centre to `refine.pos_shrink` of its width and height (closed
interval); a position claimed by several gts goes to the smallest (area).
Every other position is negative.

Choice the SPEC leaves open (docs/LOSSES.md): a gt whose shrunk box holds no
cell centre (small or thin boxes) takes the one position of its level whose
centre is nearest the gt centre, as FCOS-style centre sampling does, so every
gt has a positive unless a smaller gt claims that same position.

One image at a time; vmap over the batch. Boxes: (x1, y1, x2, y2) canvas pixels.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from mimicdet_jax.ops import boxes as box_ops
from mimicdet_jax.targets import roi_sampling


def gt_levels(gt_boxes: jax.Array, levels: Sequence[int],
              anchor_scale: float) -> jax.Array:
  """Pyramid level (e.g. 3..7) of each gt box, [G, 4] -> [G] int32.

  Rounds half up (floor(x + 0.5)) rather than numpy's half-to-even, so a box
  exactly between two anchor sizes goes to the coarser level.
  """
  w = gt_boxes[:, 2] - gt_boxes[:, 0]
  h = gt_boxes[:, 3] - gt_boxes[:, 1]
  size = jnp.sqrt(jnp.maximum(w * h, 1e-6))
  level = jnp.floor(jnp.log2(size / anchor_scale) + 0.5)
  return jnp.clip(level, min(levels), max(levels)).astype(jnp.int32)


def refine_targets(anchor_boxes: jax.Array, anchor_level: jax.Array,
                   gt_boxes: jax.Array, gt_mask: jax.Array, *,
                   levels: Sequence[int], anchor_scale: float,
                   pos_shrink: float, stds) -> dict[str, jax.Array]:
  """Assigns gts to the dense positions of one image.

  Args:
    anchor_boxes: [A, 4] the square anchor of every position (flat order of
      models.anchors.dense_anchors); its centre is the cell centre.
    anchor_level: [A] int pyramid level of each position (e.g. 3..7).
    gt_boxes: [G, 4].
    gt_mask: [G] bool, real non-crowd boxes with positive area.
    levels, anchor_scale: `model.s_levels`, `model.anchor_scale`.
    pos_shrink: `refine.pos_shrink`.
    stds: `refine.stds`, delta normalisation.

  Returns:
    dict with `positive` [A] bool, `matched` [A] int32 (gt index, 0 where
    negative), `delta_targets` [A, 4] (anchor -> matched gt, zeros where
    negative), `gt_level` [G] int32, `gt_origin` [G] int32 (the position of
    the gt's level nearest its centre; stands for the gt as a proposal).
  """
  a_level = jnp.asarray(anchor_level, jnp.int32)
  a_cx = 0.5 * (anchor_boxes[:, 0] + anchor_boxes[:, 2])
  a_cy = 0.5 * (anchor_boxes[:, 1] + anchor_boxes[:, 3])
  g_level = gt_levels(gt_boxes, levels, anchor_scale)
  g_cx = 0.5 * (gt_boxes[:, 0] + gt_boxes[:, 2])
  g_cy = 0.5 * (gt_boxes[:, 1] + gt_boxes[:, 3])
  g_w = gt_boxes[:, 2] - gt_boxes[:, 0]
  g_h = gt_boxes[:, 3] - gt_boxes[:, 1]
  g_area = g_w * g_h

  same_level = a_level[:, None] == g_level[None, :]  # [A, G]
  dx = a_cx[:, None] - g_cx[None, :]
  dy = a_cy[:, None] - g_cy[None, :]
  inside = ((jnp.abs(dx) <= 0.5 * pos_shrink * g_w[None, :]) &
            (jnp.abs(dy) <= 0.5 * pos_shrink * g_h[None, :]))
  candidate = inside & same_level & gt_mask[None, :]

  # Nearest position of the gt's level (first one on exact ties).
  dist2 = jnp.where(same_level, dx * dx + dy * dy, jnp.inf)
  nearest = jnp.argmin(dist2, axis=0).astype(jnp.int32)  # [G]
  orphan = gt_mask & ~jnp.any(candidate, axis=0)
  position = jnp.arange(anchor_boxes.shape[0], dtype=jnp.int32)
  candidate = candidate | ((position[:, None] == nearest[None, :]) &
                           orphan[None, :])

  cost = jnp.where(candidate, g_area[None, :], jnp.inf)
  matched = jnp.argmin(cost, axis=1).astype(jnp.int32)
  positive = jnp.any(candidate, axis=1)
  matched = jnp.where(positive, matched, 0)

  # Negatives are encoded on a unit box so no log(0) reaches the gradient.
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  ref = jnp.where(positive[:, None], anchor_boxes.astype(jnp.float32), unit)
  target = jnp.where(positive[:, None], gt_boxes[matched].astype(jnp.float32),
                     unit)
  deltas = jnp.where(positive[:, None],
                     box_ops.encode_deltas(target, ref, stds), 0.0)
  return dict(positive=positive, matched=matched, delta_targets=deltas,
              gt_level=g_level, gt_origin=nearest)


def sample_positions(key: jax.Array, positive: jax.Array, num_samples: int,
                     pos_fraction: float) -> jax.Array:
  """The BCE's sampled positions of one image as an [A] bool mask.

  `num_samples` positions with at most `pos_fraction` of them positive, drawn
  uniformly (roi_sampling.balanced_sample); all non-positive positions are
  negative candidates.
  """
  idx, _, valid = roi_sampling.balanced_sample(key, positive, ~positive,
                                               num_samples, pos_fraction)
  return jnp.zeros(positive.shape, bool).at[idx].max(valid)
