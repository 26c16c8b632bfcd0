"""Proposals against a NumPy decode + per-level top-k + greedy NMS loop."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.targets import proposals
from tests import np_refs

LEVELS = (3, 4, 5, 6, 7)
CANVAS = (128, 128)
CLIP = math.log(1000.0 / 16)


def _np_decode(d, a):
  w, h = a[2] - a[0], a[3] - a[1]
  cx, cy = a[0] + w / 2 + d[0] * w, a[1] + h / 2 + d[1] * h
  w2, h2 = w * math.exp(min(d[2], CLIP)), h * math.exp(min(d[3], CLIP))
  return np.array([cx - w2 / 2, cy - h2 / 2, cx + w2 / 2, cy + h2 / 2])


def _np_proposals(logits, deltas, anchor_boxes, image_hw, topk, thr, num,
                  inside_image=True):
  boxes = np.array([_np_decode(d, a) for d, a in zip(deltas, anchor_boxes)])
  boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image_hw[1])
  boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image_hw[0])
  cand, start = [], 0
  for l in LEVELS:
    rows, cols = CANVAS[0] // 2**l, CANVAS[1] // 2**l
    order = np.argsort(-logits[start:start + rows * cols], kind='stable')
    if inside_image:  # cell centre (x + 0.5) * stride inside the image
      y, x = order // cols, order % cols
      order = order[((y + 0.5) * 2**l < image_hw[0]) &
                    ((x + 0.5) * 2**l < image_hw[1])]
    cand += (order[:topk] + start).tolist()
    start += rows * cols
  cand = [i for i in cand
          if boxes[i, 2] > boxes[i, 0] and boxes[i, 3] > boxes[i, 1]]
  cand.sort(key=lambda i: -logits[i])
  kept = []
  for i in cand:
    if all(np_refs.iou(boxes[i], boxes[j]) <= thr for j in kept):
      kept.append(i)
  return kept[:num], boxes


def _run(seed, image_hw, topk, num, thr=0.5, inside_image=True,
         padding_boost=0.0, nms_tile_size=512):
  a = anchors_lib.dense_anchors(CANVAS, LEVELS, 4.0)
  rng = np.random.default_rng(seed)
  n = len(a['boxes'])
  logits = rng.normal(size=n).astype(np.float32)
  # Cells of the canvas padding (centre outside the image) made the most
  # confident: they must not win the top-k unless inside_image is off.
  centre = (a['boxes'][:, :2] + a['boxes'][:, 2:]) / 2
  padding = (centre[:, 0] >= image_hw[1]) | (centre[:, 1] >= image_hw[0])
  logits[padding] += padding_boost
  deltas = (0.3 * rng.normal(size=(n, 4))).astype(np.float32)
  deltas[:5, 0] = 40.0  # pushed far right: zero width after clipping
  fn = jax.jit(functools.partial(
      proposals.generate_proposals,
      sizes=proposals.level_sizes(CANVAS, LEVELS), stds=(1.0, 1.0, 1.0, 1.0),
      scale_clip=CLIP, pre_nms_topk=topk, nms_threshold=thr,
      num_proposals=num, inside_image=inside_image,
      nms_tile_size=nms_tile_size))
  out = {k: np.asarray(v) for k, v in
         fn(logits, deltas, a['boxes'], jnp.array(image_hw)).items()}
  kept, boxes = _np_proposals(logits, deltas, a['boxes'], image_hw, topk, thr,
                              num, inside_image)
  out['padding'] = padding
  return out, kept, boxes, logits


def test_level_sizes():
  assert proposals.level_sizes(CANVAS, LEVELS) == (256, 64, 16, 4, 1)
  assert proposals.level_sizes((256, 384), (3, 7)) == (32 * 48, 2 * 3)


@pytest.mark.parametrize('nms_tile_size', [512, 8])
def test_matches_numpy_reference_full_set(nms_tile_size):
  # 25 proposals out of 61 candidates (20 + 20 + 16 + 4 + 1): all filled,
  # the same with one NMS block or eight (proposals.nms_tile_size).
  out, kept, boxes, logits = _run(0, (100, 120), topk=20, num=25, thr=0.7,
                                  nms_tile_size=nms_tile_size)
  assert len(kept) == 25
  assert out['valid'].all()
  np.testing.assert_array_equal(out['origin'], kept)
  np.testing.assert_allclose(out['boxes'], boxes[kept], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(out['scores'], logits[kept], rtol=1e-6)
  assert (out['boxes'][:, 2] <= 120).all() and (out['boxes'][:, 3] <= 100).all()


def test_padding_cells_never_proposals():
  out, kept, _, _ = _run(2, (64, 100), topk=20, num=25, thr=0.7,
                         padding_boost=5.0)
  assert out['valid'].sum() == len(kept) > 0
  np.testing.assert_array_equal(out['origin'][:len(kept)], kept)
  assert not out['padding'][out['origin'][out['valid']]].any()
  # The old behaviour (proposals.inside_image=False): they win the top-k.
  old, kept_old, _, _ = _run(2, (64, 100), topk=20, num=25, thr=0.7,
                             padding_boost=5.0, inside_image=False)
  np.testing.assert_array_equal(old['origin'][:len(kept_old)], kept_old)
  assert old['padding'][old['origin'][old['valid']]].any()


def test_matches_numpy_reference_padded():
  # Strict NMS and a big budget: fewer survivors than slots -> padding.
  out, kept, boxes, _ = _run(1, (128, 96), topk=10, num=64, thr=0.3)
  assert len(kept) < 64
  assert out['valid'].sum() == len(kept)
  assert out['valid'][:len(kept)].all()
  np.testing.assert_array_equal(out['origin'][:len(kept)], kept)
  np.testing.assert_allclose(out['boxes'][:len(kept)], boxes[kept], rtol=1e-5,
                             atol=1e-3)
  np.testing.assert_array_equal(out['boxes'][len(kept):], 0.0)
  assert np.isneginf(out['scores'][len(kept):]).all()


def test_no_gradient_through_proposals():
  a = anchors_lib.dense_anchors(CANVAS, LEVELS, 4.0)
  n = len(a['boxes'])

  def f(logits, deltas):
    out = proposals.generate_proposals(
        logits, deltas, a['boxes'], jnp.array([128, 128]),
        sizes=proposals.level_sizes(CANVAS, LEVELS), stds=(1.0,) * 4,
        scale_clip=CLIP, pre_nms_topk=10, nms_threshold=0.7, num_proposals=20)
    return jnp.sum(jnp.where(out['valid'][:, None], out['boxes'], 0.0))

  g = jax.jit(jax.grad(f, argnums=(0, 1)))(
      jnp.linspace(0, 1, n), jnp.zeros((n, 4)))
  assert not np.asarray(g[0]).any() and not np.asarray(g[1]).any()
