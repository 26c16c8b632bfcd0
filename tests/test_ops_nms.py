"""NMS against a sequential NumPy greedy loop and torchvision's outputs."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax import ops
from tests import np_refs

_REFS = os.path.join(os.path.dirname(__file__), 'data', 'torchvision_ops.npz')


def _nms_ref(boxes, scores, thr, valid=None, classes=None):
  """torchvision's CPU kernel: stable descending sort, then greedy."""
  boxes = boxes.astype(np.float64)
  n = len(boxes)
  valid = np.ones(n, bool) if valid is None else valid
  order = [i for i in sorted(range(n), key=lambda i: -scores[i]) if valid[i]]
  suppressed = set()
  keep = []
  for pos, i in enumerate(order):
    if i in suppressed:
      continue
    keep.append(i)
    for j in order[pos + 1:]:
      same = classes is None or classes[i] == classes[j]
      if same and np_refs.iou(boxes[i], boxes[j]) > thr:
        suppressed.add(j)
  return keep


def _clustered_boxes(rng, n, clusters=6, tie_levels=7):
  """Boxes jittered around a few centres (many overlaps), quantised scores
  (many ties) and a few exact duplicates."""
  centres = rng.uniform(20, 80, (clusters, 2))
  c = centres[rng.integers(0, clusters, n)] + rng.normal(0, 4, (n, 2))
  wh = rng.uniform(8, 30, (n, 2))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
  boxes[n // 2:n // 2 + 5] = boxes[:5]
  scores = rng.integers(0, tie_levels, n) / tie_levels
  return boxes.astype(np.float32), scores.astype(np.float32)


def _kept(indices, valid):
  return list(np.asarray(indices)[np.asarray(valid)])


@pytest.mark.parametrize('seed,n,thr,tile', [
    (0, 60, 0.5, 512), (1, 200, 0.3, 16), (2, 37, 0.0, 8)])
def test_nms_matches_greedy_loop(seed, n, thr, tile):
  rng = np.random.default_rng(seed)
  boxes, scores = _clustered_boxes(rng, n)
  expected = _nms_ref(boxes, scores, thr)
  indices, valid = ops.nms(boxes, scores, thr, n, tile_size=tile)
  assert indices.dtype == jnp.int32 and indices.shape == (n,)
  assert _kept(indices, valid) == expected
  assert np.all(np.asarray(indices)[~np.asarray(valid)] == 0)
  # A shorter output is the prefix.
  k = max(1, len(expected) // 2)
  indices, valid = ops.nms(boxes, scores, thr, k, tile_size=tile)
  assert _kept(indices, valid) == expected[:k]


def test_nms_valid_mask_excludes_entries():
  rng = np.random.default_rng(5)
  boxes, scores = _clustered_boxes(rng, 80)
  valid = rng.random(80) < 0.6
  masked_scores = np.where(valid, scores, np.float32(1e9))  # would win if used
  indices, out_valid = ops.nms(boxes, masked_scores, 0.5, 80, valid=valid,
                               tile_size=16)
  expected = _nms_ref(boxes, scores, 0.5, valid=valid)
  assert _kept(indices, out_valid) == expected
  assert all(valid[i] for i in expected)


def test_nms_matches_torchvision_cases():
  refs = np.load(_REFS)
  for j in (0, 1):
    boxes = refs[f'nms{j}_boxes'].astype(np.float32)
    scores = refs[f'nms{j}_scores'].astype(np.float32)
    for thr, key in ((0.5, '5'), (0.8, '8')):
      expected = list(refs[f'nms{j}_keep_{key}'])
      indices, valid = ops.nms(boxes, scores, thr, len(boxes))
      assert _kept(indices, valid) == expected


def test_nms_jit_and_vmap_over_batch():
  rng = np.random.default_rng(6)
  data = [_clustered_boxes(rng, 90) for _ in range(3)]
  boxes = np.stack([d[0] for d in data])
  scores = np.stack([d[1] for d in data])
  thr = np.array([0.4, 0.5, 0.6], np.float32)
  fn = jax.jit(jax.vmap(lambda b, s, t: ops.nms(b, s, t, 50, tile_size=32)))
  indices, valid = fn(boxes, scores, thr)
  assert indices.shape == (3, 50) and valid.shape == (3, 50)
  for k in range(3):
    assert _kept(indices[k], valid[k]) == _nms_ref(boxes[k], scores[k],
                                                   thr[k])[:50]


def test_batched_nms_is_per_class():
  rng = np.random.default_rng(7)
  boxes, scores = _clustered_boxes(rng, 120)
  classes = rng.integers(0, 4, 120).astype(np.int32)
  valid = rng.random(120) < 0.9
  indices, out_valid = ops.batched_nms(boxes, scores, classes, 0.5, 120,
                                       valid=valid, tile_size=32)
  expected = _nms_ref(boxes, scores, 0.5, valid=valid, classes=classes)
  assert _kept(indices, out_valid) == expected
  # Some boxes survive only because their overlapping neighbour has another
  # class; plain NMS keeps fewer.
  plain = _nms_ref(boxes, scores, 0.5, valid=valid)
  assert len(expected) > len(plain)


def test_batched_nms_many_candidates_few_outputs():
  """The inference shape: every (box, class) pair is a candidate, most are
  below the score threshold, and only the top few detections are returned."""
  rng = np.random.default_rng(8)
  num_boxes, num_classes, max_out = 60, 30, 40
  boxes, _ = _clustered_boxes(rng, num_boxes)
  probs = rng.dirichlet(np.full(num_classes, 0.3), num_boxes).astype(np.float32)
  scores = probs.reshape(-1)
  box_idx = np.arange(num_boxes * num_classes) // num_classes
  classes = (np.arange(num_boxes * num_classes) % num_classes + 1).astype(
      np.int32)
  valid = scores >= 0.05
  indices, out_valid = ops.batched_nms(boxes[box_idx], scores, classes, 0.5,
                                       max_out, valid=valid, tile_size=64)
  # Reference: greedy per class, then all kept pairs by descending score
  # (ties by lower index), as torchvision's batched_nms orders them.
  kept = []
  for c in range(1, num_classes + 1):
    members = np.nonzero((classes == c) & valid)[0]
    local = _nms_ref(boxes[box_idx[members]], scores[members], 0.5)
    kept += [members[i] for i in local]
  kept.sort(key=lambda i: (-scores[i], i))
  assert len(kept) > max_out
  assert _kept(indices, out_valid) == kept[:max_out]


# ------------------------------------------------------------------ soft-NMS


def _soft_kept(out):
  indices, scores, valid = (np.asarray(v) for v in out)
  assert np.all(indices[~valid] == 0) and np.all(scores[~valid] == 0)
  return list(indices[valid]), scores[valid]


@pytest.mark.parametrize('seed,n,sigma,thr,per_class', [
    (0, 60, 0.5, 0.001, True), (1, 90, 0.3, 0.2, True),
    (2, 50, 0.5, 0.05, False), (3, 70, 2.0, 0.3, True)])
def test_soft_nms_matches_published_loop(seed, n, sigma, thr, per_class):
  """Clustered boxes with tied scores and exact duplicates (ties), a score
  threshold that drops decayed boxes (thr 0.2, 0.3) or almost none."""
  rng = np.random.default_rng(seed)
  boxes, scores = _clustered_boxes(rng, n)
  classes = rng.integers(0, 3, n).astype(np.int32) if per_class else None
  expected = np_refs.soft_nms(boxes.astype(np.float64), scores, classes,
                              sigma, thr)
  out = ops.soft_nms(boxes, scores, classes, sigma, thr, n)
  kept, kept_scores = _soft_kept(out)
  assert kept == [i for i, _ in expected]
  np.testing.assert_allclose(kept_scores, [s for _, s in expected],
                             rtol=1e-5)
  # Boxes were decayed (not only reordered), and some dropped by thr.
  assert any(s < scores[i] for i, s in expected)
  if thr >= 0.2:
    assert len(expected) < np.sum(scores >= thr)
  # A shorter output is the prefix.
  k = max(1, len(expected) // 3)
  kept, _ = _soft_kept(ops.soft_nms(boxes, scores, classes, sigma, thr, k))
  assert kept == [i for i, _ in expected[:k]]


def test_soft_nms_hand_case():
  """Closed form: B overlaps A (IoU 0.8) in A's class, C is B in another
  class; sigma 0.5 decays B to 0.5 * exp(-0.64 / 0.5) = 0.1390."""
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 8],
                    [50, 50, 60, 60]], np.float32)
  scores = np.array([0.9, 0.5, 0.5, 0.3], np.float32)
  classes = np.array([1, 1, 2, 1], np.int32)
  b_score = 0.5 * math.exp(-0.8**2 / 0.5)
  for thr, expected in ((0.1, [(0, 0.9), (2, 0.5), (3, 0.3), (1, b_score)]),
                        (0.2, [(0, 0.9), (2, 0.5), (3, 0.3)])):
    kept, kept_scores = _soft_kept(
        ops.soft_nms(boxes, scores, classes, 0.5, thr, 4))
    assert kept == [i for i, _ in expected]
    np.testing.assert_allclose(kept_scores, [s for _, s in expected],
                               rtol=1e-6)


def test_soft_nms_valid_mask_and_vmap():
  rng = np.random.default_rng(9)
  data = [_clustered_boxes(rng, 40) for _ in range(2)]
  boxes = np.stack([d[0] for d in data])
  scores = np.stack([d[1] for d in data])
  valid = rng.random((2, 40)) < 0.7
  # Invalid entries would win and decay their neighbours if they were used.
  masked = np.where(valid, scores, np.float32(5.0))
  fn = jax.jit(jax.vmap(
      lambda b, s, v: ops.soft_nms(b, s, None, 0.5, 0.01, 40, valid=v)))
  out = fn(boxes, masked, valid)
  for k in range(2):
    expected = np_refs.soft_nms(boxes[k].astype(np.float64),
                                np.where(valid[k], scores[k], 0.0), None,
                                0.5, 0.01)
    kept, kept_scores = _soft_kept([o[k] for o in out])
    assert kept == [i for i, _ in expected]
    np.testing.assert_allclose(kept_scores, [s for _, s in expected],
                               rtol=1e-5)
