"""Box labelling by IoU and balanced sampling for the T-head and the S-head.

All functions work on one image with padded arrays and masks; vmap them over
the batch. Boxes are (x1, y1, x2, y2) in canvas pixels.

T-head (SPEC 3): proposals, plus the gt boxes when `t_head.append_gt`, are
labelled by IoU with the gt (>= `t_head.fg_iou`: the matched gt's class, else
background 0), and `t_head.num_samples` of them are drawn with at most
`t_head.fg_fraction` foreground. S-head: every valid proposal is labelled the
same way (`s_head.fg_iou`); hard-example mining happens in the loss.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mimicdet_jax.ops import boxes as box_ops

def balanced_sample(key: jax.Array, positive: jax.Array, negative: jax.Array,
                    num_samples: int, pos_fraction: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws up to `num_samples` items, at most `pos_fraction` of them positive.

  detectron2's sampler with static shapes: every candidate gets a uniform
  random score; the top `int(num_samples * pos_fraction)` positives are kept,
  then negatives fill the rest. Without enough negatives fewer items come
  back (the `valid` mask says which). Deterministic given `key`.

  Args:
    key: a PRNG key.
    positive: [N] bool, positive candidates.
    negative: [N] bool, negative candidates (disjoint from `positive`).
    num_samples: static number of draws.
    pos_fraction: upper bound on the positive share.

  Returns:
    indices [num_samples] int32 into [0, N) (positives first, then
    negatives, then padding pointing at 0), is_positive [num_samples] bool,
    valid [num_samples] bool.
  """
  n = positive.shape[0]
  max_pos = int(num_samples * pos_fraction)
  # Scores in [1, 2) for candidates, 0 for the rest: top_k picks random
  # candidates first and a candidate always beats a non-candidate.
  score = 1.0 + jax.random.uniform(key, (n,))
  k_pos = min(max_pos, n)
  k_neg = min(num_samples, n)
  pos_val, pos_idx = jax.lax.top_k(jnp.where(positive, score, 0.0), k_pos)
  pos_ok = pos_val > 0
  num_pos = jnp.sum(pos_ok)
  neg_val, neg_idx = jax.lax.top_k(jnp.where(negative, score, 0.0), k_neg)
  neg_ok = (neg_val > 0) & (jnp.arange(k_neg) < num_samples - num_pos)
  idx = jnp.concatenate([pos_idx, neg_idx]).astype(jnp.int32)
  ok = jnp.concatenate([pos_ok, neg_ok])
  is_pos = jnp.concatenate(
      [jnp.ones((k_pos,), bool), jnp.zeros((k_neg,), bool)])
  # Compact the kept items to the front (stable, so positives stay first).
  order = jnp.argsort(~ok, stable=True)
  size = k_pos + k_neg
  if size < num_samples:
    order = jnp.concatenate(
        [order, jnp.full((num_samples - size,), size, jnp.int32)])
    idx = jnp.concatenate([idx, jnp.zeros((1,), jnp.int32)])
    ok = jnp.concatenate([ok, jnp.zeros((1,), bool)])
    is_pos = jnp.concatenate([is_pos, jnp.zeros((1,), bool)])
  order = order[:num_samples]
  valid = ok[order]
  return (jnp.where(valid, idx[order], 0), is_pos[order] & valid, valid)


def label_boxes(boxes: jax.Array, box_valid: jax.Array, gt_boxes: jax.Array,
                gt_classes: jax.Array, gt_mask: jax.Array, fg_iou: float
                ) -> dict[str, jax.Array]:
  """Labels boxes by their best IoU with the gt boxes.

  Args:
    boxes: [N, 4] boxes to label.
    box_valid: [N] bool.
    gt_boxes: [G, 4]; gt_classes: [G] int in 1..K; gt_mask: [G] bool (real,
      non-crowd boxes).
    fg_iou: IoU threshold for foreground (>=); everything else is background.

  Returns:
    dict with `labels` [N] int32 (matched class for foreground, 0 for
    background and for invalid boxes), `matched` [N] int32 gt index,
    `iou` [N] float32 best IoU (0 without gt), `foreground` [N] bool.
  """
  iou = box_ops.box_iou(boxes, gt_boxes)  # [N, G]
  iou = jnp.where(gt_mask[None, :], iou, -1.0)
  matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
  best = jnp.max(iou, axis=1)
  foreground = box_valid & (best >= fg_iou)
  labels = jnp.where(foreground, gt_classes[matched], 0).astype(jnp.int32)
  return dict(labels=labels, matched=matched, iou=jnp.maximum(best, 0.0),
              foreground=foreground)


def _delta_targets(boxes, gt_boxes, matched, foreground, stds):
  """Deltas from `boxes` to their matched gt; zeros where not foreground."""
  # Background and padding rows are encoded on a unit box so that no
  # log(0) / 0 appears (a NaN there would poison the gradient under where).
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  fg = foreground[:, None]
  ref = jnp.where(fg, boxes.astype(jnp.float32), unit)
  target = jnp.where(fg, gt_boxes[matched].astype(jnp.float32), unit)
  return jnp.where(fg, box_ops.encode_deltas(target, ref, stds), 0.0)


def t_head_targets(key: jax.Array, proposal_boxes: jax.Array,
                   proposal_valid: jax.Array, proposal_origin: jax.Array,
                   gt_boxes: jax.Array, gt_classes: jax.Array,
                   gt_mask: jax.Array, gt_origin: jax.Array, *,
                   fg_iou: float, num_samples: int, fg_fraction: float,
                   append_gt: bool, stds) -> dict[str, jax.Array]:
  """Samples the T-head's training boxes of one image and their targets.

  Args:
    key: PRNG key for the sampler.
    proposal_boxes: [P, 4] refined boxes (no gradient).
    proposal_valid: [P] bool.
    proposal_origin: [P] int32 flat dense index each proposal came from.
    gt_boxes, gt_classes, gt_mask: [G, 4], [G], [G] (gt_mask excludes crowd).
    gt_origin: [G] int32 dense index standing for each gt when it is appended
      as a proposal (see targets.refine: the position of the gt's level nearest
      its centre), used by the mimic loss to read the S-head there.
    fg_iou, num_samples, fg_fraction, append_gt, stds: `t_head.*` config.

  Returns:
    dict of [S] arrays (S = num_samples): `boxes` [S, 4], `origin`, `labels`
    (0 = background), `delta_targets` [S, 4] (zero for background), `valid`,
    `foreground`, `iou` (best IoU with any gt), `is_proposal` (the sample is
    a proposal, i.e. has a real anchor origin; False for appended gts and
    padding).
  """
  boxes, valid, origin = proposal_boxes, proposal_valid, proposal_origin
  num_proposals = proposal_boxes.shape[0]
  if append_gt:
    boxes = jnp.concatenate([boxes, gt_boxes.astype(boxes.dtype)])
    valid = jnp.concatenate([valid, gt_mask])
    origin = jnp.concatenate([origin, gt_origin.astype(origin.dtype)])
  lab = label_boxes(boxes, valid, gt_boxes, gt_classes, gt_mask, fg_iou)
  idx, _, s_valid = balanced_sample(key, lab['foreground'],
                                    valid & ~lab['foreground'], num_samples,
                                    fg_fraction)
  s_boxes = jnp.where(s_valid[:, None], boxes[idx], 0.0)
  fg = lab['foreground'][idx] & s_valid
  return dict(
      boxes=jax.lax.stop_gradient(s_boxes),
      origin=jnp.where(s_valid, origin[idx], 0).astype(jnp.int32),
      labels=jnp.where(s_valid, lab['labels'][idx], 0),
      delta_targets=_delta_targets(s_boxes, gt_boxes, lab['matched'][idx], fg,
                                   stds),
      valid=s_valid,
      foreground=fg,
      iou=jnp.where(s_valid, lab['iou'][idx], 0.0),
      is_proposal=s_valid & (idx < num_proposals))


def s_head_targets(proposal_boxes: jax.Array, proposal_valid: jax.Array,
                   gt_boxes: jax.Array, gt_classes: jax.Array,
                   gt_mask: jax.Array, *, fg_iou: float, stds
                   ) -> dict[str, jax.Array]:
  """Labels every proposal of one image for the S-head read at its origin.

  Returns:
    dict of [P] arrays: `labels` (0 = background and invalid),
    `delta_targets` [P, 4] from the proposal (refined) box to its gt, zero for
    background, `foreground`, `iou`.
  """
  lab = label_boxes(proposal_boxes, proposal_valid, gt_boxes, gt_classes,
                    gt_mask, fg_iou)
  return dict(
      labels=lab['labels'],
      delta_targets=_delta_targets(proposal_boxes, gt_boxes, lab['matched'],
                                   lab['foreground'], stds),
      foreground=lab['foreground'],
      iou=lab['iou'])


# ---------------------------------------------------------- S-head samplers
# s_head.sampling: which proposals of an image the S-head loss takes. A
# sampler gets one image's labelled proposals and returns the [P] bool mask
# of those the loss averages over, or None for "mine them in the loss" (the
# paper's OHEM: the s_head.ohem_samples largest losses, losses/detection.py
# `s_head_loss`). A new sampler is one function with this signature plus one
# entry in S_HEAD_SAMPLERS: config_lib accepts its name, and
# tests/test_targets_roi_sampling.py checks every entry's mask (valid proposals
# only, at most s_head.ohem_samples, at most s_head.fg_fraction foreground).
SHeadSampler = Callable[..., Optional[jax.Array]]


def s_head_ohem(key: jax.Array, foreground: jax.Array, background: jax.Array,
                *, num_samples: int, fg_fraction: float) -> None:
  """The paper: no draw; the loss keeps the `num_samples` hardest."""
  del key, foreground, background, num_samples, fg_fraction
  return None


def s_head_balanced(key: jax.Array, foreground: jax.Array,
                    background: jax.Array, *, num_samples: int,
                    fg_fraction: float) -> jax.Array:
  """The T-head's draw (`balanced_sample`): up to `num_samples` proposals,
  at most `fg_fraction` of them foreground; [P] bool."""
  idx, _, ok = balanced_sample(key, foreground, background, num_samples,
                               fg_fraction)
  return jnp.zeros(foreground.shape, bool).at[idx].max(ok)


S_HEAD_SAMPLERS: dict[str, SHeadSampler] = {
    'ohem': s_head_ohem,
    'balanced': s_head_balanced,
}
S_HEAD_SAMPLINGS = tuple(S_HEAD_SAMPLERS)
