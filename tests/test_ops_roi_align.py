"""RoIAlign against a NumPy loop of torchvision's definition and its outputs."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mimicdet_jax import ops

_REFS = os.path.join(os.path.dirname(__file__), 'data', 'torchvision_ops.npz')


def _bilinear_ref(fmap, y, x):
  """torchvision roi_align's bilinear_interpolate, one sample, all channels."""
  h, w = fmap.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(fmap.shape[2])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  return (hy * hx * fmap[y_low, x_low] + hy * lx * fmap[y_low, x_high] +
          ly * hx * fmap[y_high, x_low] + ly * lx * fmap[y_high, x_high])


def _roi_align_ref(fmap, box, out_hw, scale, sr, aligned):
  """One box on one [H, W, C] map, float64 loops."""
  oh, ow = out_hw
  off = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [float(v) * scale - off for v in box]
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / oh, roi_w / ow
  out = np.zeros((oh, ow, fmap.shape[2]))
  for ph in range(oh):
    for pw in range(ow):
      acc = np.zeros(fmap.shape[2])
      for iy in range(sr):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / sr
        for ix in range(sr):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / sr
          acc += _bilinear_ref(fmap, y, x)
      out[ph, pw] = acc / (sr * sr)
  return out


def _test_boxes():
  # Image 36 x 44 pixels, feature map stride 4 (9 x 11).
  return np.array([
      [[4.0, 6.0, 30.0, 20.0],        # inside
       [-12.0, -8.0, 10.0, 12.0],     # partly outside (top-left)
       [30.0, 25.0, 60.0, 50.0],      # partly outside (bottom-right)
       [17.2, 11.1, 17.5, 11.3],      # tiny
       [-100.0, -80.0, 150.0, 140.0],  # huge, covers everything
       [0.0, 0.0, 0.0, 0.0]],         # padding (degenerate)
      [[0.0, 0.0, 44.0, 36.0],        # whole image
       [50.0, 40.0, 70.0, 60.0],      # fully outside
       [2.3, 33.9, 41.7, 35.5],       # thin strip on the bottom edge
       [9.0, 9.0, 13.0, 13.0],
       [40.1, -3.0, 43.9, 37.0],      # right edge column
       [5.5, 5.5, 5.5, 20.0]],        # zero width
  ], np.float32)


@pytest.mark.parametrize('sr,aligned,out_hw', [(2, True, (3, 4)),
                                               (1, True, (2, 2)),
                                               (3, False, (3, 2))])
def test_roi_align_matches_loop(sr, aligned, out_hw):
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  boxes = _test_boxes()
  got = np.asarray(jax.jit(ops.roi_align, static_argnums=(2, 3, 4, 5))(
      feat, boxes, out_hw, 0.25, sr, aligned))
  assert got.shape == (2, 6) + out_hw + (3,)
  ref = np.array([[_roi_align_ref(feat[b].astype(np.float64), boxes[b, n],
                                  out_hw, 0.25, sr, aligned)
                   for n in range(6)] for b in range(2)])
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  assert np.all(got[1, 1] == 0)  # fully outside


def test_bfloat16_features_blend_within_two_roundings_of_the_loop():
  """bfloat16 maps (the recipes' model.dtype) give bfloat16 bins within a
  rounding of the weights and one of the result (2 x 2^-8 relative) of
  the float64 loop on the same rounded maps: the blend accumulates in
  float32, not bfloat16."""
  rng = np.random.default_rng(1)
  feat = jnp.asarray(rng.normal(size=(2, 9, 11, 16)), jnp.bfloat16)
  boxes = _test_boxes()
  got = jax.jit(ops.roi_align, static_argnums=(2, 3, 4, 5))(
      feat, boxes, (3, 4), 0.25, 2, True)
  assert got.dtype == jnp.bfloat16
  exact = np.asarray(feat, np.float64)
  ref = np.array([[_roi_align_ref(exact[b], boxes[b, n], (3, 4), 0.25, 2,
                                  True) for n in range(6)] for b in range(2)])
  # The weights are >= 0: each bin's sum of |weight x value| is the loop on
  # |maps|; a rounding of every weight and one of the result stay within
  # 2^-8 of it each.
  size = np.array([[_roi_align_ref(np.abs(exact[b]), boxes[b, n], (3, 4), 0.25,
                                   2, True) for n in range(6)]
                   for b in range(2)])
  err = np.abs(np.asarray(got, np.float64) - ref)
  assert np.all(err <= 2 * 2.0**-8 * size + 1e-6), err.max()


def test_roi_align_matches_torchvision_values_and_gradients():
  refs = np.load(_REFS)
  feat = jnp.asarray(refs['roi_feat'], jnp.float32)
  boxes = jnp.asarray(refs['roi_boxes'], jnp.float32)
  scale = float(refs['roi_scale'])
  for sr in (1, 2):

    @jax.jit
    def value_and_vjp(f, cot, sr=sr):
      out, vjp = jax.vjp(
          lambda f: ops.roi_align(f, boxes, (7, 7), scale, sr, True), f)
      return out, vjp(cot)[0]

    out, grad = value_and_vjp(feat, jnp.asarray(refs[f'roi_cot_sr{sr}'],
                                                jnp.float32))
    np.testing.assert_allclose(out, refs[f'roi_out_sr{sr}'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(grad, refs[f'roi_gradfeat_sr{sr}'], atol=1e-4,
                               rtol=0)


def test_roi_align_gradient_finite_differences():
  rng = np.random.default_rng(1)
  boxes = jnp.asarray(_test_boxes()[:, :5])
  with jax.enable_x64(True):
    feat = jnp.asarray(rng.normal(size=(2, 9, 11, 2)))
    fn = jax.jit(lambda f: ops.roi_align(f, boxes, (2, 3), 0.25, 2, True))
    check_grads(fn, (feat,), order=1, modes=('rev',), atol=1e-6, rtol=1e-6)


def test_fpn_levels_rule():
  sides = np.array([0.0, 10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0,
                    2000.0])
  boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides],
                   axis=-1).astype(np.float32)
  expected = [min(max(math.floor(4 + math.log2(s / 224 + 1e-8)), 2), 6)
              for s in sides]
  got = np.asarray(ops.fpn_levels(boxes, 2, 6, 224.0, 4))
  assert got.dtype == np.int32
  assert list(got) == expected
  assert list(got) == [2, 2, 2, 3, 3, 4, 4, 5, 6]


def test_multilevel_roi_align_picks_each_box_level():
  rng = np.random.default_rng(2)
  levels = (2, 3, 4)
  canvas = (64, 96)
  maps = {l: rng.normal(size=(2, canvas[0] >> l, canvas[1] >> l, 3)).astype(
      np.float32) for l in levels}
  # canonical size 16 at level 3: sides < 16 -> P2, 16..32 -> P3, >= 32 -> P4.
  boxes = np.array([
      [[3.0, 4.0, 11.0, 12.0], [10.0, 20.0, 30.0, 38.0], [0.0, 0.0, 80.0, 64.0],
       [50.0, 30.0, 52.0, 31.0], [0.0, 0.0, 0.0, 0.0]],
      [[-10.0, -6.0, 40.0, 30.0], [60.0, 40.0, 100.0, 70.0],
       [5.0, 5.0, 25.0, 21.0], [90.0, 60.0, 95.0, 63.0], [1.0, 2.0, 3.0, 4.0]],
  ], np.float32)
  fn = jax.jit(lambda m, b: ops.multilevel_roi_align(
      m, b, levels, (2, 3), 2, True, canonical_size=16.0, canonical_level=3))
  got = np.asarray(fn(maps, boxes))
  assert got.shape == (2, 5, 2, 3, 3)
  seen = set()
  for b in range(2):
    for n in range(5):
      x1, y1, x2, y2 = boxes[b, n].astype(np.float64)
      side = math.sqrt(max(x2 - x1, 0) * max(y2 - y1, 0))
      level = min(max(math.floor(3 + math.log2(side / 16 + 1e-8)), 2), 4)
      seen.add(level)
      ref = _roi_align_ref(maps[level][b].astype(np.float64), boxes[b, n],
                           (2, 3), 2.0 ** -level, 2, True)
      np.testing.assert_allclose(got[b, n], ref, atol=1e-4, rtol=0)
  assert seen == set(levels)
  # The list form with explicit levels gives the same result.
  as_list = fn([maps[l] for l in levels], boxes)
  np.testing.assert_array_equal(as_list, got)


# ------------------------------------------- einsum (gather-free) RoIAlign
def test_einsum_roi_align_matches_torchvision_values_and_gradients():
  """One level (P2, stride 4 = roi_scale 0.25) through the einsum form."""
  refs = np.load(_REFS)
  assert float(refs['roi_scale']) == 0.25
  feat = jnp.asarray(refs['roi_feat'], jnp.float32)
  boxes = jnp.asarray(refs['roi_boxes'], jnp.float32)
  on_p2 = jnp.full(boxes.shape[:2], 2, jnp.int32)
  for sr in (1, 2):

    @jax.jit
    def value_and_vjp(f, cot, sr=sr):
      out, vjp = jax.vjp(lambda f: ops.multilevel_roi_align_einsum(
          {2: f}, boxes, (2,), (7, 7), sr, True, box_levels=on_p2), f)
      return out, vjp(cot)[0]

    out, grad = value_and_vjp(feat, jnp.asarray(refs[f'roi_cot_sr{sr}'],
                                                jnp.float32))
    np.testing.assert_allclose(out, refs[f'roi_out_sr{sr}'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(grad, refs[f'roi_gradfeat_sr{sr}'], atol=1e-4,
                               rtol=0)


def _pyramid_and_boxes(seed=2, n=5):
  rng = np.random.default_rng(seed)
  levels = (2, 3, 4)
  canvas = (64, 96)
  maps = {l: rng.normal(size=(2, canvas[0] >> l, canvas[1] >> l, 3)).astype(
      np.float32) for l in levels}
  boxes = np.concatenate([
      rng.uniform(-20, 100, size=(2, n, 2)),
      np.zeros((2, n, 2))], axis=-1).astype(np.float32)
  boxes[..., 2:] = boxes[..., :2] + np.abs(rng.normal(0, 30, size=(2, n, 2)))
  return levels, maps, boxes


@pytest.mark.parametrize('sr,aligned,with_levels', [(2, True, False),
                                                    (3, False, False),
                                                    (2, True, True)])
def test_einsum_multilevel_matches_loop_and_gather(sr, aligned, with_levels):
  levels, maps, boxes = _pyramid_and_boxes(n=12)
  rng = np.random.default_rng(5)
  box_levels = (jnp.asarray(rng.integers(1, 6, size=boxes.shape[:2]),
                            jnp.int32) if with_levels else None)
  kw = dict(canonical_size=16.0, canonical_level=3, box_levels=box_levels)
  einsum = jax.jit(lambda m: ops.multilevel_roi_align_einsum(
      m, boxes, levels, (2, 3), sr, aligned, **kw))
  gather = jax.jit(lambda m: ops.multilevel_roi_align(
      m, boxes, levels, (2, 3), sr, aligned, **kw))
  got = np.asarray(einsum(maps))
  if box_levels is None:
    want_levels = np.asarray(ops.fpn_levels(boxes, 2, 4, 16.0, 3))
  else:  # out-of-range levels clamp to the ends, as in the gather form
    want_levels = np.clip(np.asarray(box_levels), 2, 4)
  for b in range(2):
    for n in range(boxes.shape[1]):
      level = int(want_levels[b, n])
      ref = _roi_align_ref(maps[level][b].astype(np.float64), boxes[b, n],
                           (2, 3), 2.0 ** -level, sr, aligned)
      np.testing.assert_allclose(got[b, n], ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, gather(maps), atol=1e-5, rtol=0)
  # Gradients with respect to every level, against the gather form's.
  cot = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
  vjp = lambda fn: jax.vjp(fn, maps)[1](cot)[0]
  g_einsum, g_gather = vjp(einsum), vjp(gather)
  for l in levels:
    assert np.any(np.asarray(g_gather[l]) != 0)
    np.testing.assert_allclose(g_einsum[l], g_gather[l], atol=1e-4, rtol=0)


def test_einsum_roi_align_gradient_finite_differences():
  levels, maps, boxes = _pyramid_and_boxes(seed=3, n=4)
  with jax.enable_x64(True):
    maps = {l: jnp.asarray(m, jnp.float64) for l, m in maps.items()}
    fn = jax.jit(lambda m: ops.multilevel_roi_align_einsum(
        m, jnp.asarray(boxes, jnp.float64), levels, (2, 2), 2, True,
        canonical_size=16.0, canonical_level=3))
    check_grads(fn, (maps,), order=1, modes=('rev',), atol=1e-6, rtol=1e-6)


def test_einsum_roi_align_backward_has_no_scatter_or_gather():
  levels, maps, boxes = _pyramid_and_boxes(n=8)

  def grad_hlo(align):
    loss = lambda m: jnp.sum(align(m, boxes, levels, (7, 7), 2,
                                   canonical_size=224.0,
                                   canonical_level=4) ** 2)
    return jax.jit(jax.grad(loss)).lower(maps).as_text()

  gather_text = grad_hlo(ops.multilevel_roi_align)
  assert 'scatter' in gather_text  # the check can see one
  einsum_text = grad_hlo(ops.multilevel_roi_align_einsum)
  assert 'scatter' not in einsum_text
  assert 'gather' not in einsum_text
  assert 'dot_general' in einsum_text
