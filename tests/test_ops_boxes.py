"""Box coder, IoU and helpers against NumPy loops of the published formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax import ops


def _random_boxes(rng, n, size=100.0, degenerate=0):
  xy = rng.uniform(-10, size, (n, 2))
  wh = rng.uniform(0.5, size / 2, (n, 2))
  boxes = np.concatenate([xy, xy + wh], axis=1)
  boxes[:degenerate, 2:] = boxes[:degenerate, :2]  # zero-area boxes
  return boxes.astype(np.float32)


def _iou_ref(a, b):
  out = np.zeros((len(a), len(b)))
  for i, (ax1, ay1, ax2, ay2) in enumerate(a.astype(np.float64)):
    for j, (bx1, by1, bx2, by2) in enumerate(b.astype(np.float64)):
      iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
      ih = max(0.0, min(ay2, by2) - max(ay1, by1))
      inter = iw * ih
      union = (max(ax2 - ax1, 0) * max(ay2 - ay1, 0) +
               max(bx2 - bx1, 0) * max(by2 - by1, 0) - inter)
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def test_box_iou_matches_loop_and_handles_degenerate():
  rng = np.random.default_rng(0)
  a = _random_boxes(rng, 13, degenerate=3)
  b = np.concatenate([_random_boxes(rng, 9), a[:4], np.zeros((2, 4))]).astype(
      np.float32)
  got = np.asarray(ops.box_iou(a, b))
  assert got.shape == (13, 15)
  np.testing.assert_allclose(got, _iou_ref(a, b), atol=1e-6)
  assert np.all(np.isfinite(got))
  # Degenerate boxes have IoU 0 with everything, including themselves.
  assert np.all(got[:3] == 0)
  np.testing.assert_allclose(got[3, 12], 1.0, atol=1e-6)  # a[3] with itself
  # Gradients stay finite at all-zero padding boxes.
  g = jax.grad(lambda x: ops.box_iou(x, jnp.zeros((2, 4))).sum())(jnp.asarray(a))
  assert np.all(np.isfinite(np.asarray(g)))


def test_box_iou_masks_padding():
  rng = np.random.default_rng(3)
  a, b = _random_boxes(rng, 6), _random_boxes(rng, 5)
  b[0] = a[0]
  mask_a = np.array([True, True, False, True, True, True])
  mask_b = np.array([True, False, True, True, True])
  got = np.asarray(ops.box_iou(a, b, mask_a, mask_b))
  ref = _iou_ref(a, b) * mask_a[:, None] * mask_b[None, :]
  np.testing.assert_allclose(got, ref, atol=1e-6)
  assert got[0, 0] > 0.99


def test_box_iou_broadcasts_leading_dims():
  rng = np.random.default_rng(1)
  a = np.stack([_random_boxes(rng, 5), _random_boxes(rng, 5)])
  b = np.stack([_random_boxes(rng, 4), _random_boxes(rng, 4)])
  got = np.asarray(ops.box_iou(a, b))
  assert got.shape == (2, 5, 4)
  for k in range(2):
    np.testing.assert_allclose(got[k], _iou_ref(a[k], b[k]), atol=1e-6)


def test_box_area_and_conversions():
  boxes = np.array([[1., 2., 4., 8.], [5., 5., 3., 9.]], np.float32)
  np.testing.assert_allclose(ops.box_area(boxes), [18., 0.])
  xywh = np.asarray(ops.xyxy_to_xywh(boxes))
  np.testing.assert_allclose(xywh[0], [1., 2., 3., 6.])
  np.testing.assert_allclose(ops.xywh_to_xyxy(xywh), boxes)


def test_clip_boxes_per_image_sizes():
  boxes = np.array([[[-5., -3., 50., 70.], [10., 10., 20., 20.]],
                    [[-5., -3., 50., 70.], [90., 1., 120., 2.]]], np.float32)
  hw = np.array([[60, 40], [100, 100]], np.int32)
  got = np.asarray(ops.clip_boxes(boxes, hw))
  expected = np.array([[[0., 0., 40., 60.], [10., 10., 20., 20.]],
                       [[0., 0., 50., 70.], [90., 1., 100., 2.]]])
  np.testing.assert_allclose(got, expected)
  # A single (h, w) for all boxes.
  np.testing.assert_allclose(ops.clip_boxes(boxes[0], (60, 40)), expected[0])


def _encode_ref(box, ref, stds, means):
  w, h = box[2] - box[0], box[3] - box[1]
  rw, rh = ref[2] - ref[0], ref[3] - ref[1]
  cx, cy = box[0] + w / 2, box[1] + h / 2
  rcx, rcy = ref[0] + rw / 2, ref[1] + rh / 2
  raw = [(cx - rcx) / rw, (cy - rcy) / rh, math.log(w / rw), math.log(h / rh)]
  return [(raw[i] - means[i]) / stds[i] for i in range(4)]


def _decode_ref(d, ref, stds, means, clip):
  d = [d[i] * stds[i] + means[i] for i in range(4)]
  rw, rh = ref[2] - ref[0], ref[3] - ref[1]
  rcx, rcy = ref[0] + rw / 2, ref[1] + rh / 2
  cx, cy = d[0] * rw + rcx, d[1] * rh + rcy
  w, h = math.exp(min(d[2], clip)) * rw, math.exp(min(d[3], clip)) * rh
  return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_encode_decode_match_loops_and_round_trip():
  rng = np.random.default_rng(2)
  boxes = _random_boxes(rng, 20)
  refs = _random_boxes(rng, 20)
  stds, means = (0.1, 0.1, 0.2, 0.2), (0.01, -0.02, 0.0, 0.03)
  deltas = np.asarray(ops.encode_deltas(boxes, refs, stds, means))
  ref = np.array([_encode_ref(b, r, stds, means) for b, r in zip(
      boxes.astype(np.float64), refs.astype(np.float64))])
  np.testing.assert_allclose(deltas, ref, rtol=1e-5, atol=1e-4)
  clip = math.log(1000.0 / 16)
  back = np.asarray(ops.decode_deltas(deltas, refs, stds, means,
                                      scale_clip=clip))
  np.testing.assert_allclose(back, boxes, atol=1e-3)
  # Decoding of arbitrary deltas, some past the clip.
  d = rng.normal(0, 3, (20, 4)).astype(np.float32)
  d[:3, 2:] = 100.0
  got = np.asarray(ops.decode_deltas(d, refs, stds, means, scale_clip=clip))
  ref = np.array([_decode_ref(a, r, stds, means, clip) for a, r in zip(
      d.astype(np.float64), refs.astype(np.float64))])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
  assert np.all(np.isfinite(got))
  # Clipped boxes grow exactly 1000/16 times.
  np.testing.assert_allclose((got[:3, 2] - got[:3, 0]) / (refs[:3, 2] - refs[:3, 0]),
                             1000.0 / 16, rtol=1e-5)
