"""Box maths: the one box coder and the one IoU function of the project.

Conventions (used by every function here):
  * boxes are `(x1, y1, x2, y2)` in pixels, end exclusive, along the last axis;
  * width = x2 - x1, height = y2 - y1 (no "+1", as in detectron2 and
    torchvision); centre = ((x1 + x2) / 2, (y1 + y2) / 2);
  * degenerate boxes (x2 <= x1 or y2 <= y1) have area 0 and IoU 0 with
    everything; no function here returns NaN for them.

The delta parameterisation is Faster R-CNN's (detectron2 `Box2BoxTransform`),
written with mmdetection-style means/stds: detectron2's weights (wx, wy, ww,
wh) are 1 / stds with zero means.
"""
from typing import Optional, Sequence

import jax.numpy as jnp

Array = jnp.ndarray


def box_area(boxes: Array) -> Array:
  """Area of boxes [..., 4] -> [...]; negative widths/heights count as 0."""
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def box_iou(boxes_a: Array, boxes_b: Array,
            mask_a: Optional[Array] = None,
            mask_b: Optional[Array] = None) -> Array:
  """Pairwise IoU of boxes_a [..., N, 4] and boxes_b [..., M, 4] -> [..., N, M].

  Leading dimensions broadcast. Pairs whose union is 0 (both boxes degenerate)
  get IoU 0, so padded all-zero boxes never match anything.

  Args:
    boxes_a, boxes_b: x1y1x2y2 boxes.
    mask_a, mask_b: optional bool [..., N] / [..., M]; pairs with a masked-out
      (padding) box get IoU 0 whatever the boxes hold.
  """
  area_a = box_area(boxes_a)[..., :, None]
  area_b = box_area(boxes_b)[..., None, :]
  a = boxes_a[..., :, None, :]
  b = boxes_b[..., None, :, :]
  iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) -
                   jnp.maximum(a[..., 0], b[..., 0]), 0.0)
  ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) -
                   jnp.maximum(a[..., 1], b[..., 1]), 0.0)
  inter = iw * ih
  union = area_a + area_b - inter
  positive = union > 0
  # The inner where keeps the gradient finite where union == 0.
  if mask_a is not None:
    positive &= mask_a[..., :, None]
  if mask_b is not None:
    positive &= mask_b[..., None, :]
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def clip_boxes(boxes: Array, hw) -> Array:
  """Clips boxes [..., N, 4] to the image [0, w] x [0, h].

  Args:
    boxes: [..., N, 4] x1y1x2y2 pixels.
    hw: (h, w) as a tuple or an array [2], or an array [..., 2] whose leading
      dimensions are those of `boxes` without the box axis N (e.g. the
      per-image `image_size` [B, 2] for boxes [B, N, 4]).
  Returns:
    [..., N, 4], same dtype as boxes.
  """
  hw = jnp.asarray(hw, dtype=boxes.dtype)
  if hw.ndim > 1:
    hw = hw[..., None, :]
  h, w = hw[..., 0], hw[..., 1]
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def xyxy_to_xywh(boxes: Array) -> Array:
  """(x1, y1, x2, y2) -> (x1, y1, w, h) (COCO results format), [..., 4]."""
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]],
                         axis=-1)


def xywh_to_xyxy(boxes: Array) -> Array:
  """(x1, y1, w, h) (COCO annotation format) -> (x1, y1, x2, y2), [..., 4]."""
  return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]],
                         axis=-1)


def _centre_size(boxes: Array):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  cx = boxes[..., 0] + 0.5 * w
  cy = boxes[..., 1] + 0.5 * h
  return cx, cy, w, h


def encode_deltas(boxes: Array, ref_boxes: Array, stds: Sequence[float],
                  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> Array:
  """Deltas [..., 4] = (dx, dy, dw, dh) that turn ref_boxes into boxes.

  dx = ((cx - ref_cx) / ref_w - means[0]) / stds[0], dw = (log(w / ref_w) -
  means[2]) / stds[2], likewise for y/h. Reference boxes must have positive
  width and height (anchors and proposals do); `boxes` with a non-positive
  side give -inf/NaN in dw/dh, so mask such targets (padding) before use.

  Args:
    boxes: target boxes [..., 4] x1y1x2y2.
    ref_boxes: reference (anchor / proposal) boxes broadcastable to boxes.
    stds, means: 4 numbers each (dx, dy, dw, dh).
  """
  cx, cy, w, h = _centre_size(boxes)
  rcx, rcy, rw, rh = _centre_size(ref_boxes)
  deltas = jnp.stack([(cx - rcx) / rw, (cy - rcy) / rh,
                      jnp.log(w / rw), jnp.log(h / rh)], axis=-1)
  means = jnp.asarray(means, deltas.dtype)
  stds = jnp.asarray(stds, deltas.dtype)
  return (deltas - means) / stds


def decode_deltas(deltas: Array, ref_boxes: Array, stds: Sequence[float],
                  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), *,
                  scale_clip: float) -> Array:
  """Inverse of `encode_deltas`: applies deltas [..., 4] to ref_boxes [..., 4].

  dw and dh (after de-normalising) are clipped from above at `scale_clip`
  (`box.scale_clip`, SPEC 2: log(1000 / 16), a box grows at most 1000/16
  times per side) before exp.
  Returns boxes [..., 4] x1y1x2y2, unclipped to the image.
  """
  means = jnp.asarray(means, deltas.dtype)
  stds = jnp.asarray(stds, deltas.dtype)
  d = deltas * stds + means
  dx, dy = d[..., 0], d[..., 1]
  dw = jnp.minimum(d[..., 2], scale_clip)
  dh = jnp.minimum(d[..., 3], scale_clip)
  rcx, rcy, rw, rh = _centre_size(ref_boxes)
  cx = dx * rw + rcx
  cy = dy * rh + rcy
  w = jnp.exp(dw) * rw
  h = jnp.exp(dh) * rh
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)
