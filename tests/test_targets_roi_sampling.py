"""IoU labelling and balanced sampling against hand-computed answers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax.targets import roi_sampling
from tests import np_refs

STDS = (0.1, 0.1, 0.2, 0.2)


GT = np.array([[0, 0, 10, 10], [50, 50, 70, 90], [0, 0, 0, 0]], np.float32)
GT_CLASSES = np.array([2, 1, 0], np.int32)
GT_MASK = np.array([True, True, False])
# Known IoUs with gt 0 / gt 1.
BOXES = np.array([
    [0, 0, 10, 5],      # 0.5 with gt0 -> fg class 2 (>= is inclusive)
    [0, 0, 10, 4.9],    # 0.49 -> bg
    [5, 0, 15, 10],     # 1/3 -> bg
    [50, 50, 70, 90],   # 1.0 with gt1 -> class 1
    [50, 50, 70, 80],   # 0.75 with gt1 -> class 1
    [100, 100, 120, 120],  # 0 -> bg
    [0, 0, 10, 10],     # identical to gt0 but invalid -> 0
], np.float32)
VALID = np.array([True] * 6 + [False])


def test_label_boxes_known_ious():
  lab = jax.jit(roi_sampling.label_boxes, static_argnums=5)(
      BOXES, VALID, GT, GT_CLASSES, GT_MASK, 0.5)
  np.testing.assert_array_equal(lab['labels'], [2, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(lab['foreground'],
                                [True, False, False, True, True, False, False])
  ref_iou = [max(np_refs.iou(b, g) for g, m in zip(GT, GT_MASK) if m) for b in BOXES]
  np.testing.assert_allclose(lab['iou'], ref_iou, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(lab['matched'])[[0, 3, 4]],
                                [0, 1, 1])


def test_balanced_sample_cap_order_and_key():
  pos = np.zeros(40, bool)
  pos[:12] = True
  neg = ~pos
  neg[35:] = False  # 23 negatives
  fn = jax.jit(roi_sampling.balanced_sample, static_argnums=(3, 4))
  idx, is_pos, valid = map(np.asarray, fn(jax.random.PRNGKey(0), pos, neg, 16,
                                          0.25))
  assert valid.all()
  assert is_pos.sum() == 4 and is_pos[:4].all()  # positives first, capped
  assert pos[idx[:4]].all() and neg[idx[4:]].all()
  assert len(set(idx.tolist())) == 16
  again = fn(jax.random.PRNGKey(0), pos, neg, 16, 0.25)
  np.testing.assert_array_equal(idx, again[0])
  other = fn(jax.random.PRNGKey(3), pos, neg, 16, 0.25)
  assert not np.array_equal(idx, other[0])
  # Too few candidates: 2 positives, 3 negatives -> 5 valid of 16.
  pos2 = np.zeros(10, bool)
  pos2[[1, 7]] = True
  neg2 = np.zeros(10, bool)
  neg2[[0, 2, 9]] = True
  idx2, is_pos2, valid2 = map(np.asarray, fn(jax.random.PRNGKey(1), pos2, neg2,
                                             16, 0.5))
  assert valid2.sum() == 5 and is_pos2.sum() == 2
  assert set(idx2[valid2].tolist()) == {0, 1, 2, 7, 9}


def test_balanced_sample_uniform_over_candidates():
  # Every positive candidate is drawn about equally often over many keys.
  pos = np.zeros(20, bool)
  pos[:8] = True
  fn = jax.jit(jax.vmap(
      lambda k: roi_sampling.balanced_sample(k, pos, ~pos, 8, 0.25)[0]))
  idx = np.asarray(fn(jax.random.split(jax.random.PRNGKey(0), 2000)))
  counts = np.bincount(idx[:, :2].ravel(), minlength=20)[:8]
  np.testing.assert_allclose(counts / 2000, 2 / 8, atol=0.05)


@functools.lru_cache
def _t_fn(append_gt, num_samples, fg_fraction):
  return jax.jit(functools.partial(
      roi_sampling.t_head_targets, fg_iou=0.5, num_samples=num_samples,
      fg_fraction=fg_fraction, append_gt=append_gt, stds=STDS))


def _t_targets(key, append_gt, num_samples=8, fg_fraction=0.25):
  origin = np.arange(len(BOXES), dtype=np.int32) + 100
  gt_origin = np.array([7, 8, 9], np.int32)
  fn = _t_fn(append_gt, num_samples, fg_fraction)
  out = fn(key, BOXES, VALID, origin, GT, GT_CLASSES, GT_MASK, gt_origin)
  return {k: np.asarray(v) for k, v in out.items()}


def test_t_head_targets_with_gt_appended():
  # Candidates: 3 fg proposals + 2 gts = 5 fg, 3 bg proposals (the invalid
  # proposal and the padded gt never appear). 8 samples, <= 2 fg -> 2 fg +
  # 3 bg, 5 valid.
  t = _t_targets(jax.random.PRNGKey(0), True)
  assert t['valid'].sum() == 5
  assert t['foreground'].sum() == 2
  all_boxes = np.concatenate([BOXES, GT])
  all_origin = np.concatenate([np.arange(7) + 100, [7, 8, 9]])
  all_labels = [2, 0, 0, 1, 1, 0, 0, 2, 1, 0]
  for i in np.flatnonzero(t['valid']):
    j = [k for k in range(10) if np.array_equal(all_boxes[k], t['boxes'][i])
         and all_origin[k] == t['origin'][i]]
    assert len(j) == 1, 'every sample is one candidate, origin carried along'
    j = j[0]
    assert j != 6 and j != 9
    assert t['is_proposal'][i] == (j < 7)  # appended gts are not proposals
    assert t['labels'][i] == all_labels[j]
    gt = GT[0] if all_labels[j] == 2 else GT[1]
    if t['foreground'][i]:
      np.testing.assert_allclose(t['delta_targets'][i],
                                 np_refs.encode(gt, all_boxes[j], STDS), atol=1e-5)
      assert t['iou'][i] >= 0.5
    else:
      np.testing.assert_array_equal(t['delta_targets'][i], 0.0)
  np.testing.assert_array_equal(t['boxes'][~t['valid']], 0.0)
  assert not t['is_proposal'][~t['valid']].any()


def test_t_head_targets_fg_fraction_over_keys():
  # A 0.5 fraction of 8 caps the 5 fg candidates at 4; 3 bg fill up to 7.
  for seed in range(3):
    t = _t_targets(jax.random.PRNGKey(seed), True, fg_fraction=0.5)
    assert t['foreground'].sum() == 4
    assert t['valid'].sum() == 7
  t = _t_targets(jax.random.PRNGKey(0), False, fg_fraction=1.0)
  assert t['foreground'].sum() == 3 and t['valid'].sum() == 6
  assert set(t['origin'][t['valid']].tolist()) == set(range(100, 106))


def test_s_head_targets_label_every_proposal():
  fn = jax.jit(functools.partial(roi_sampling.s_head_targets, fg_iou=0.7,
                                 stds=STDS))
  s = {k: np.asarray(v) for k, v in
       fn(BOXES, VALID, GT, GT_CLASSES, GT_MASK).items()}
  # fg_iou 0.7: box 0 (IoU 0.5) is now background.
  np.testing.assert_array_equal(s['labels'], [0, 0, 0, 1, 1, 0, 0])
  np.testing.assert_allclose(s['delta_targets'][4],
                             np_refs.encode(GT[1], BOXES[4], STDS), atol=1e-5)
  np.testing.assert_allclose(s['delta_targets'][3], 0.0, atol=1e-6)
  np.testing.assert_array_equal(s['delta_targets'][[0, 1, 2, 5, 6]], 0.0)


def test_no_gt_all_background():
  fn = jax.jit(functools.partial(roi_sampling.s_head_targets, fg_iou=0.5,
                                 stds=STDS))
  s = fn(BOXES, VALID, GT, GT_CLASSES, np.zeros(3, bool))
  assert not np.asarray(s['foreground']).any()
  assert np.isfinite(np.asarray(s['delta_targets'])).all()


@pytest.mark.parametrize('name', roi_sampling.S_HEAD_SAMPLINGS)
def test_every_s_head_sampler_keeps_valid_capped_and_deterministic(name):
  """Every entry of S_HEAD_SAMPLERS, jitted and vmapped as losses/total.py
  calls it: a mask over valid proposals only, at most num_samples of them,
  at most fg_fraction foreground, the same for the same key; or None (the
  loss mines)."""
  sampler = roi_sampling.S_HEAD_SAMPLERS[name]
  rng = np.random.default_rng(0)
  p, num_samples, fg_fraction = 200, 32, 0.25
  valid = rng.uniform(size=(3, p)) < 0.8
  foreground = valid & (rng.uniform(size=(3, p)) < 0.3)
  background = valid & ~foreground
  draw = jax.jit(jax.vmap(functools.partial(
      sampler, num_samples=num_samples, fg_fraction=fg_fraction)))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  mask = draw(keys, foreground, background)
  if mask is None:
    assert name == 'ohem'  # the paper's: mining happens in the loss
    return
  mask = np.asarray(mask)
  assert mask.shape == (3, p) and mask.dtype == bool
  assert not (mask & ~valid).any()
  assert (mask.sum(1) <= num_samples).all() and (mask.sum(1) > 0).all()
  assert ((mask & foreground).sum(1) <= int(num_samples * fg_fraction)).all()
  np.testing.assert_array_equal(mask, draw(keys, foreground, background))
  other = draw(jax.random.split(jax.random.PRNGKey(1), 3), foreground,
               background)
  assert (np.asarray(other) != mask).any()


def test_balanced_s_head_sampler_fills_its_quota():
  """With plenty of both kinds, exactly num_samples, fg_fraction of them
  foreground (the T-head's detectron2 rule)."""
  foreground = np.zeros(100, bool)
  foreground[:40] = True
  mask = np.asarray(roi_sampling.s_head_balanced(
      jax.random.PRNGKey(3), foreground, ~foreground, num_samples=20,
      fg_fraction=0.25))
  assert mask.sum() == 20 and (mask & foreground).sum() == 5
