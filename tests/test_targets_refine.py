"""Refinement targets against NumPy loops over the dense positions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.targets import refine
from tests import np_refs

LEVELS = (3, 4, 5, 6, 7)
CANVAS = (128, 128)
SHRINK = 0.3
STDS = (1.0, 1.0, 1.0, 1.0)


def _anchors():
  return anchors_lib.dense_anchors(CANVAS, LEVELS, 4.0)


@jax.jit
def _jit_targets(gt_boxes, gt_mask):
  a = _anchors()
  return refine.refine_targets(
      a['boxes'], a['level'], gt_boxes, gt_mask, levels=LEVELS,
      anchor_scale=4.0, pos_shrink=SHRINK, stds=STDS)


def _targets(gt_boxes, gt_mask=None):
  gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
  if gt_mask is None:
    gt_mask = np.ones(len(gt_boxes), bool)
  out = _jit_targets(jnp.asarray(gt_boxes), jnp.asarray(gt_mask))
  return {k: np.asarray(v) for k, v in out.items()}


def _flat_index(level, y, x):
  """Flat dense index of (level, y, x), written independently of anchors.py."""
  offset = 0
  for l in LEVELS:
    h, w = CANVAS[0] // 2**l, CANVAS[1] // 2**l
    if l == level:
      return offset + y * w + x
    offset += h * w
  raise ValueError(level)


@pytest.mark.parametrize('size,expected', [
    (4.0, 3), (32.0, 3), (45.0, 3), (46.0, 4), (64.0, 4), (100.0, 5),
    (300.0, 6), (512.0, 7), (2000.0, 7)])
def test_gt_levels_closest_anchor(size, expected):
  # Closest anchor in log scale among 4 * 2^l, l in 3..7 (ties to coarser).
  box = jnp.array([[10.0, 10.0, 10.0 + size, 10.0 + size]])
  assert int(jax.jit(refine.gt_levels, static_argnums=(1, 2))(
      box, LEVELS, 4.0)[0]) == expected
  ref = min(LEVELS, key=lambda l: (abs(math.log2(size) - math.log2(4 * 2**l)), -l))
  assert ref == expected


def test_gt_levels_uses_area_of_rectangles():
  # sqrt(128 * 32) = 64 -> level 4; rounds half up: sqrt(wh) = 4 * 2^4.5.
  boxes = jnp.array([[0, 0, 128, 32], [0, 0, 4 * 2**4.5, 4 * 2**4.5 + 0.01]],
                    jnp.float32)
  np.testing.assert_array_equal(refine.gt_levels(boxes, LEVELS, 4.0), [4, 5])


def test_single_gt_exact_positive_positions():
  # 64 x 64 gt centred at (64, 64) -> level 4 (stride 16, anchors 64 px).
  # Shrunk box: 0.3 * 64 = 19.2 wide, [54.4, 73.6]; P4 centres 8 + 16 k, so
  # columns/rows 3 (56) and 4 (72) are inside.
  gt = [32.0, 32.0, 96.0, 96.0]
  t = _targets(gt)
  expected = np.zeros_like(t['positive'])
  for y in (3, 4):
    for x in (3, 4):
      expected[_flat_index(4, y, x)] = True
  np.testing.assert_array_equal(t['positive'], expected)
  assert t['gt_level'][0] == 4
  a = _anchors()
  for i in np.flatnonzero(expected):
    np.testing.assert_allclose(t['delta_targets'][i],
                               np_refs.encode(gt, a['boxes'][i], STDS), atol=1e-5)
  np.testing.assert_array_equal(t['delta_targets'][~expected], 0.0)
  # Origin of the gt: the level-4 cell nearest the centre (64, 64); cells
  # (3,3), (3,4), (4,3), (4,4) tie, the first in flat order wins.
  assert t['gt_origin'][0] == _flat_index(4, 3, 3)


def _np_reference(gt_boxes, gt_mask, shrink):
  """Positive/matched by loops: SPEC rule plus the nearest-cell fallback."""
  a = _anchors()
  num = len(a['boxes'])
  cand = np.zeros((num, len(gt_boxes)), bool)
  for g, (x1, y1, x2, y2) in enumerate(gt_boxes):
    if not gt_mask[g]:
      continue
    w, h = x2 - x1, y2 - y1
    level = int(np.clip(math.floor(math.log2(math.sqrt(w * h) / 4.0) + 0.5),
                        3, 7))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    best, best_d = None, None
    for l in LEVELS:
      if l != level:
        continue
      s = 2**l
      for y in range(CANVAS[0] // s):
        for x in range(CANVAS[1] // s):
          px, py = (x + 0.5) * s, (y + 0.5) * s
          i = _flat_index(l, y, x)
          if abs(px - cx) <= shrink * w / 2 and abs(py - cy) <= shrink * h / 2:
            cand[i, g] = True
          d = (px - cx)**2 + (py - cy)**2
          if best_d is None or d < best_d:
            best, best_d = i, d
    if not cand[:, g].any():
      cand[best, g] = True
  positive = cand.any(1)
  area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
  matched = np.where(positive, np.argmin(np.where(cand, area, np.inf), 1), 0)
  return positive, matched


def test_ties_go_to_smallest_gt():
  # Both on level 4 and both covering cells (3..4, 3..4); the smaller wins.
  big = [24.0, 24.0, 104.0, 104.0]   # 80 px -> level 4
  small = [34.0, 34.0, 94.0, 94.0]   # 60 px -> level 4
  t = _targets([big, small])
  shared = [_flat_index(4, y, x) for y in (3, 4) for x in (3, 4)]
  assert t['positive'][shared].all()
  np.testing.assert_array_equal(t['matched'][shared], 1)
  pos, matched = _np_reference(np.array([big, small]), np.ones(2, bool), SHRINK)
  np.testing.assert_array_equal(t['positive'], pos)
  np.testing.assert_array_equal(t['matched'], matched)


def test_tiny_gt_gets_nearest_cell():
  # 10 x 2 box -> level 3; its shrunk box (3 x 0.6 around (30, 30)) holds no
  # P3 centre (4 + 8 k), so the nearest one, (28, 28) = cell (3, 3), is taken.
  gt = [25.0, 29.0, 35.0, 31.0]
  t = _targets(gt)
  assert t['positive'].sum() == 1
  assert t['positive'][_flat_index(3, 3, 3)]
  assert t['gt_origin'][0] == _flat_index(3, 3, 3)
  a = _anchors()
  np.testing.assert_allclose(t['delta_targets'][_flat_index(3, 3, 3)],
                             np_refs.encode(gt, a['boxes'][_flat_index(3, 3, 3)],
                                        STDS), atol=1e-5)


def test_random_gts_match_loop_reference_and_each_has_a_positive():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, (12, 2))
  wh = np.exp(rng.uniform(np.log(3), np.log(120), (12, 2)))
  gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  mask = np.ones(12, bool)
  mask[[4, 9]] = False  # padding / crowd
  t = _targets(gt, mask)
  pos, matched = _np_reference(gt, mask, SHRINK)
  np.testing.assert_array_equal(t['positive'], pos)
  np.testing.assert_array_equal(t['matched'][pos], matched[pos])
  assert not np.isin([4, 9], t['matched'][t['positive']]).any()
  assert np.isfinite(t['delta_targets']).all()


def test_no_gt_no_positives():
  t = _targets(np.zeros((3, 4)), np.zeros(3, bool))
  assert not t['positive'].any()
  np.testing.assert_array_equal(t['delta_targets'], 0.0)


def test_sample_positions_counts_and_determinism():
  positive = np.zeros(300, bool)
  positive[[3, 50, 77, 90, 120, 200, 201, 202, 203, 250]] = True  # 10
  positive = jnp.asarray(positive)
  sample = jax.jit(refine.sample_positions, static_argnums=(2, 3))
  s = sample(jax.random.PRNGKey(0), positive, 16, 0.5)
  assert int(s.sum()) == 16
  assert int((s & positive).sum()) == 8  # capped at half
  s2 = sample(jax.random.PRNGKey(0), positive, 16, 0.5)
  np.testing.assert_array_equal(s, s2)
  s3 = sample(jax.random.PRNGKey(1), positive, 16, 0.5)
  assert not np.array_equal(s, s3)
  # Fewer positives than the cap: all taken, negatives fill up.
  few = jnp.zeros(300, bool).at[5].set(True)
  s4 = sample(jax.random.PRNGKey(2), few, 16, 0.5)
  assert bool(s4[5]) and int(s4.sum()) == 16


def test_targets_jit_and_vmap():
  a = _anchors()
  gt = jnp.array([[[32.0, 32.0, 96.0, 96.0]], [[0.0, 0.0, 20.0, 20.0]]])
  mask = jnp.ones((2, 1), bool)
  fn = jax.jit(jax.vmap(
      lambda g, m: refine.refine_targets(
          a['boxes'], a['level'], g, m, levels=LEVELS, anchor_scale=4.0,
          pos_shrink=SHRINK, stds=STDS)['positive']))
  out = np.asarray(fn(gt, mask))
  np.testing.assert_array_equal(out[0], _targets(gt[0])['positive'])
  np.testing.assert_array_equal(out[1], _targets(gt[1])['positive'])
