"""Pyramid, heads and the MimicDet module: shapes for every recipe, NumPy
references for the pyramid, and the S-head's deformable / plain equivalences."""
import functools
import importlib
import math
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax import config_lib
from mimicdet_jax.models import anchors
from mimicdet_jax.models import fpn
from mimicdet_jax.models import heads
from mimicdet_jax.models import mimicdet

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
RECIPES = sorted(p.stem for p in CONFIG_DIR.glob('*.py')
                 if p.stem not in ('__init__', 'common'))


def _config(name, num_classes, **overrides):
  c = importlib.import_module(f'configs.{name}').get_config()
  for key, value in overrides.items():
    section, field = key.split('.', 1)
    node = c[section]
    *path, last = field.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  c.model.num_classes = num_classes
  c.s_head.num_logits = num_classes + 1
  return config_lib.resolve(c, num_classes)


def _np_conv(x, w, b, stride=1):
  """NHWC conv with torch padding k // 2, by a loop over kernel taps."""
  k = w.shape[0]
  p = k // 2
  bsz, h, wd, _ = x.shape
  ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros((bsz, ho, wo, w.shape[-1]), np.float64)
  for i in range(k):
    for j in range(k):
      patch = xp[:, i:i + stride * (ho - 1) + 1:stride,
                 j:j + stride * (wo - 1) + 1:stride]
      out += patch @ w[i, j]
  return out + b


def _normal(shape, seed=0):
  """Test inputs from NumPy (jax.random would add a compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _np_variables(init_fn, *args, seed=0):
  """Variables with `init_fn`'s tree and shapes, filled by NumPy.

  jax.random.normal costs seconds of XLA compile per parameter on a loaded
  CPU; the tests that do not check the initialisation itself use these:
  He-scaled normal kernels, small random biases, identity frozen BatchNorm.
  """
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    collection, name = path[0].key, path[-1].key
    if collection == 'frozen':
      return np.ones(leaf.shape, leaf.dtype) if name in ('scale', 'var') else (
          np.zeros(leaf.shape, leaf.dtype))
    if name == 'bias':
      return rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------- pyramid


def test_fpn_matches_numpy_reference():
  rng = np.random.default_rng(0)
  # A 96 x 64 canvas: C5 is 3 x 2, so P6 / P7 round up (2 x 1, 1 x 1).
  c_feats = {f'C{l}': rng.normal(size=(2, 96 // 2**l, 64 // 2**l, 3 + l)
                                 ).astype(np.float32) for l in range(2, 6)}
  module = fpn.FPN(channels=8, levels=(2, 3, 4, 5, 6, 7))
  params = _np_variables(module.init, c_feats)['params']
  got = jax.jit(module.apply)({'params': params}, c_feats)
  np_params = jax.tree.map(np.asarray, params)
  conv = lambda name, x, s=1: _np_conv(  # pylint: disable=g-long-lambda
      x, np_params[name]['kernel'], np_params[name]['bias'], s)
  want, inner = {}, None
  for l in (5, 4, 3, 2):
    lat = conv(f'lateral_c{l}', c_feats[f'C{l}'])
    if inner is not None:
      up = inner.repeat(2, axis=1).repeat(2, axis=2)
      lat = lat + up[:, :lat.shape[1], :lat.shape[2]]
    inner = lat
    want[l] = conv(f'output_p{l}', inner)
  want[6] = conv('p6', want[5], 2)
  want[7] = conv('p7', np.maximum(want[6], 0), 2)
  assert sorted(got) == [2, 3, 4, 5, 6, 7]
  for l in want:
    np.testing.assert_allclose(got[l], want[l], rtol=1e-4, atol=1e-4)
  assert got[6].shape == (2, 2, 1, 8) and got[7].shape == (2, 1, 1, 8)


@pytest.mark.parametrize('in_hw,out_hw', [((3, 2), (6, 4)), ((3, 2), (5, 3)),
                                           ((2, 3), (6, 3))])
def test_upsample_nearest_reads_torchs_source_pixel(in_hw, out_hw):
  # torch F.interpolate(mode='nearest'): output (i, j) reads input
  # (floor(i * h / H), floor(j * w / W)); x2 and x3 take the broadcast path,
  # 3 -> 5 the general gather. The gradient sums over each pixel's copies.
  x = np.random.default_rng(0).normal(size=(2,) + in_hw + (3,)).astype(np.float32)
  want = np.zeros((2,) + out_hw + (3,), np.float32)
  for i in range(out_hw[0]):
    for j in range(out_hw[1]):
      want[:, i, j] = x[:, i * in_hw[0] // out_hw[0], j * in_hw[1] // out_hw[1]]
  np.testing.assert_array_equal(fpn.upsample_nearest(jnp.asarray(x), out_hw), want)
  g = np.random.default_rng(1).normal(size=want.shape).astype(np.float32)
  want_grad = np.zeros_like(x)
  for i in range(out_hw[0]):
    for j in range(out_hw[1]):
      want_grad[:, i * in_hw[0] // out_hw[0], j * in_hw[1] // out_hw[1]] += g[:, i, j]
  got_grad = jax.grad(lambda v: jnp.sum(fpn.upsample_nearest(v, out_hw) * g))(
      jnp.asarray(x))
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)


def test_fpn_without_p2_has_no_c2_lateral():
  c_feats = {f'C{l}': jnp.ones((1, 64 // 2**l, 64 // 2**l, 4)) for l in range(2, 6)}
  module = fpn.FPN(channels=8, levels=(3, 4, 5, 6, 7))
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), c_feats)['params']
  assert 'lateral_c2' not in params and 'output_p2' not in params
  assert sorted(jax.eval_shape(module.apply, {'params': params}, c_feats)) == [3, 4, 5, 6, 7]


# ------------------------------------------------------------ refinement


def test_refinement_init_and_shapes():
  feats = {l: _normal((1, 2**(7 - l), 2**(7 - l), 8), seed=l) for l in (3, 4, 5)}
  module = heads.RefinementModule(channels=8)
  # Only the bias leaves: jit drops the (slow to compile) normal draws.
  biases = jax.jit(lambda k: jax.tree.map(
      lambda p: p['bias'], module.init(k, feats)['params'],
      is_leaf=lambda p: 'bias' in p))(jax.random.PRNGKey(0))
  # RetinaNet prior probability: sigmoid(bias) = 0.01.
  np.testing.assert_allclose(biases['objectness'], [-math.log(99.0)], rtol=1e-6)
  np.testing.assert_allclose(jax.nn.sigmoid(biases['objectness']), [0.01], rtol=1e-5)
  assert not np.any(biases['conv']) and not np.any(biases['deltas'])
  params = _np_variables(module.init, feats)['params']
  assert params['conv']['kernel'].shape == (3, 3, 8, 8)
  assert params['objectness']['kernel'].shape == (1, 1, 8, 1)
  out = jax.jit(module.apply)({'params': params}, feats)
  for l, (logits, deltas) in out.items():
    assert logits.shape == feats[l].shape[:3]
    assert deltas.shape == feats[l].shape[:3] + (4,)
  # Shared weights: the same map on two levels gives the same outputs.
  same = jax.jit(module.apply)({'params': params}, {3: feats[4], 4: feats[4]})
  np.testing.assert_allclose(same[3][0], out[4][0], rtol=1e-6)


# ---------------------------------------------------------------- T-head


def _pyramid(levels, size=128, channels=8, seed=0):
  return {l: _normal((2, size // 2**l, size // 2**l, channels), seed=seed + l)
          for l in levels}


def test_t_head_shapes_and_reads_only_the_fpn_level():
  levels = (2, 3, 4, 5, 6)
  head = heads.THead(levels=levels, num_logits=6, fc_dim=32, num_convs=2,
                     conv_dim=8, canonical_size=32.0, canonical_level=4)
  feats = _pyramid(levels)
  # sqrt(wh) = 32 -> level 4 by the FPN rule with canonical size 32.
  boxes = jnp.array([[[10., 20., 42., 52.], [40., 8., 72., 40.]]] * 2)
  params = _np_variables(head.init, feats, boxes)
  apply = jax.jit(head.apply)
  cls, reg_feature, deltas = apply(params, feats, boxes)
  assert cls.shape == (2, 2, 6) and reg_feature.shape == (2, 2, 32)
  assert deltas.shape == (2, 2, 4) and cls.dtype == jnp.float32
  assert bool(jnp.all(reg_feature >= 0))  # ReLU feature (the mimic target)
  other = dict(feats)
  for l in (2, 3, 5, 6):
    other[l] = feats[l] + 10.0
  np.testing.assert_allclose(apply(params, other, boxes)[0], cls, atol=1e-5)
  other[4] = feats[4] + 1.0
  assert not np.allclose(apply(params, other, boxes)[0], cls, atol=1e-3)


def test_t_head_einsum_roi_align_gives_the_gather_outputs():
  """t_head.roi_align_impl: same parameters, same outputs either way."""
  levels = (2, 3, 4, 5, 6)
  kw = dict(levels=levels, num_logits=6, fc_dim=32, num_convs=2, conv_dim=8,
            canonical_size=32.0, canonical_level=4)
  feats = _pyramid(levels)
  boxes = jnp.array([[[10., 20., 42., 52.], [40., 8., 72., 40.],
                      [0., 0., 128., 128.], [3., 5., 9., 12.]]] * 2)
  params = _np_variables(heads.THead(**kw).init, feats, boxes)
  apply = {impl: jax.jit(heads.THead(roi_align_impl=impl, **kw).apply)
           for impl in ('gather', 'einsum')}
  gather = apply['gather'](params, feats, boxes)
  einsum = apply['einsum'](params, feats, boxes)
  hlo = lambda impl: apply[impl].lower(params, feats, boxes).as_text()
  assert 'gather' in hlo('gather') and 'gather' not in hlo('einsum')
  for a, b in zip(einsum, gather):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- S-head


def _s_head(deformable, **kw):
  return heads.SHead(levels=(3, 4, 5), num_logits=5, channels=8, p3_kernel=3,
                     kernel=5, offset_hidden=(4, 6), cls_dim=16, reg_dim=12,
                     deformable=deformable, **kw)


@functools.lru_cache(maxsize=None)
def _s_apply(deformable, offset_stop_grad=True):
  return jax.jit(_s_head(deformable, offset_stop_grad=offset_stop_grad).apply)


@functools.lru_cache(maxsize=None)
def _s_setup():
  """Inputs and deformable-head parameters shared by the S-head tests."""
  feats = _pyramid((3, 4, 5), size=128, channels=6, seed=3)
  deltas = {l: _normal(f.shape[:3] + (4,), seed=10 + l)
            for l, f in feats.items()}
  params = _np_variables(_s_head(True).init, feats, deltas)['params']
  return feats, deltas, params


def _without_offset_nets(params):
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if 'offset_net' not in k})


def _set_offsets(params, bias_fn, kernel_value=0.0):
  """Each micro-net's last layer: constant kernel, bias = bias_fn(num_offsets)."""
  flat = flax.traverse_util.flatten_dict(params)
  for key in list(flat):
    if key[-3:-1] == ('offset_net', 'offsets'):
      if key[-1] == 'kernel':
        flat[key] = jnp.full_like(flat[key], kernel_value)
      else:
        flat[key] = bias_fn(flat[key].shape[0])
  return flax.traverse_util.unflatten_dict(flat)


def test_s_head_param_layout_and_zero_init_offsets():
  feats, deltas, params = _s_setup()
  # P3 has its own 3x3 conv, P4..P5 share one 5x5 conv.
  assert params['p3_conv']['kernel'].shape == (3, 3, 6, 8)
  assert params['coarse_conv']['kernel'].shape == (5, 5, 6, 8)
  assert params['p3_conv']['offset_net']['offsets']['kernel'].shape == (1, 1, 6, 18)
  assert params['coarse_conv']['offset_net']['offsets']['kernel'].shape == (1, 1, 6, 50)
  assert params['coarse_conv']['offset_net']['hidden1']['kernel'].shape == (1, 1, 4, 4)
  # The real initialisation of the micro-nets' last layers: zero, so training
  # starts from an ordinary conv (jit keeps only these leaves: no RNG compile).
  last = jax.jit(lambda k: {c: _s_head(True).init(k, feats, deltas)['params'][c][
      'offset_net']['offsets'] for c in ('p3_conv', 'coarse_conv')})(jax.random.PRNGKey(0))
  for conv in ('p3_conv', 'coarse_conv'):
    assert not np.any(last[conv]['kernel']) and not np.any(last[conv]['bias'])
  plain = jax.eval_shape(_s_head(False).init, jax.random.PRNGKey(0), feats,
                         deltas)['params']
  assert 'offset_net' not in plain['p3_conv']
  assert (jax.tree.structure(plain) ==
          jax.tree.structure(_without_offset_nets(params)))


def test_s_head_zero_offsets_equal_plain_conv():
  feats, deltas, params = _s_setup()
  # Random hidden layers, zero last layer: the micro-net outputs zeros.
  params = _set_offsets(params, jnp.zeros)
  got = _s_apply(True)({'params': params}, feats, deltas)
  want = _s_apply(False)({'params': _without_offset_nets(params)}, feats, deltas)
  for l in (3, 4, 5):
    for g, w in zip(got[l], want[l]):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  assert got[3][0].shape == (2, 16, 16, 5) and got[5][1].shape == (2, 4, 4, 12)


@pytest.mark.parametrize('kernel_size', [3, 5])
def test_guided_conv_offsets_shift_the_sampling_grid(kernel_size):
  # Offset (dy, dx) = (1, 0) on every tap (torchvision order: dy then dx)
  # samples one row lower: an ordinary conv whose zero padding moves from
  # the top to the bottom, ((p - 1, p + 1), (p, p)).
  k, p = kernel_size, kernel_size // 2
  x = _normal((2, 9, 7, 6), seed=0)
  deltas = _normal((2, 9, 7, 4), seed=1)
  conv = heads.GuidedConv(8, k, deformable=True, offset_hidden=(4, 6))
  params = _np_variables(conv.init, x, deltas)['params']
  params = _set_offsets({'c': params}, lambda n: jnp.tile(jnp.array([1.0, 0.0]), n // 2))['c']
  got = jax.jit(conv.apply)({'params': params}, x, deltas)
  want = jax.nn.relu(jax.lax.conv_general_dilated(
      x, params['kernel'], (1, 1), ((p - 1, p + 1), (p, p)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(got))) > 0.05  # not trivially zero


def test_s_head_offset_input_gradient_switch():
  feats, deltas, params = _s_setup()
  # A last micro-net layer that depends on its input, so a gradient can flow.
  params = _set_offsets(params, lambda n: jnp.full((n,), 0.3), kernel_value=0.1)

  def grad_sum(stop):
    f = lambda d: jnp.sum(_s_head(True, offset_stop_grad=stop).apply(
        {'params': params}, feats, d)[3][0])
    return float(jnp.sum(jnp.abs(jax.jit(jax.grad(f))(deltas)[3])))

  assert grad_sum(True) == 0.0 and grad_sum(False) > 0.0


# --------------------------------------------------------------- MimicDet


def _run_t_head(model, variables, t_features, boxes):
  return jax.jit(lambda v, f, b: model.apply(v, f, b, method=mimicdet.MimicDet.t_head))(
      variables, t_features, boxes)


def _demo_forward(num_classes=5, batch=2, canvas=None, **overrides):
  """Demo config forward; the variants run on a smaller canvas to save time."""
  config = _config('demo', num_classes, **overrides)
  model = mimicdet.MimicDet(config)
  canvas = canvas or config.data.canvas_buckets[0]
  images = _normal((batch,) + tuple(canvas) + (3,))
  variables = _np_variables(model.init, images)
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, images)
  return config, model, variables, images, outputs


@pytest.fixture(scope='module')
def demo_run():
  return _demo_forward()


def test_demo_forward_shapes(demo_run):
  config, model, variables, _, out = demo_run
  canvas = config.data.canvas_buckets[0]
  a = anchors.num_anchors(canvas, config.model.s_levels)
  # Frozen-BN statistics live in 'frozen'; a GroupNorm backbone has none.
  expected = {'params'} | ({'frozen'} if config.model.backbone.norm == 'frozen_bn'
                           else set())
  assert set(variables) == expected
  assert set(variables['params']) == {'backbone', 'fpn', 'refinement',
                                      's_head_net', 't_head_net'}
  assert sorted(out['t_features']) == [2, 3, 4, 5, 6]
  assert out['t_features'][2].shape == (2, 64, 64, config.model.fpn_channels)
  assert out['refine_logits'].shape == (2, a)
  assert out['refine_deltas'].shape == (2, a, 4)
  assert out['s_cls_logits'].shape == (2, a, 6)
  assert out['s_reg_feature'].shape == (2, a, config.s_head.reg_dim)
  assert out['s_deltas'].shape == (2, a, 4)
  for key in ('refine_logits', 's_cls_logits', 's_reg_feature', 's_deltas'):
    assert out[key].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out[key])))
  boxes = jnp.array([[[8., 8., 40., 56.], [0., 0., 256., 256.], [100., 90., 140., 200.]]] * 2)
  t_cls, t_reg, t_deltas = _run_t_head(model, variables, out['t_features'], boxes)
  assert t_cls.shape == (2, 3, 6) and t_deltas.shape == (2, 3, 4)
  assert t_reg.shape == (2, 3, config.t_head.fc_dim)
  assert bool(jnp.all(jnp.isfinite(t_cls)))


def test_dense_outputs_follow_anchor_origin_order(demo_run):
  config, model, variables, images, out = demo_run
  pyramid = jax.jit(lambda v, x: model.apply(
      v, x, method=lambda m, x: m.fpn(m.backbone(x))))(variables, images)
  levels = config.model.s_levels
  s_feats = {l: pyramid[l] for l in levels}
  refine = jax.jit(heads.RefinementModule(config.refine.channels).apply)(
      {'params': variables['params']['refinement']}, s_feats)
  anc = anchors.dense_anchors(config.data.canvas_buckets[0], levels,
                              config.model.anchor_scale)
  rng = np.random.default_rng(0)
  for a in rng.choice(len(anc['level']), 20, replace=False).tolist() + [len(anc['level']) - 1]:
    l, (y, x) = int(anc['level'][a]), anc['yx'][a]
    np.testing.assert_allclose(out['refine_logits'][:, a], refine[l][0][:, y, x],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out['refine_deltas'][:, a], refine[l][1][:, y, x],
                               rtol=1e-4, atol=1e-5)


def _demo_shapes(**overrides):
  """eval_shape of init and forward (no compile) for a demo-config variant."""
  config = _config('demo', 5, **overrides)
  model = mimicdet.MimicDet(config)
  images = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  return config, model, variables, jax.eval_shape(model.apply, variables, images)


def test_unstaggered_t_head_reads_s_levels():
  config, model, variables, out = _demo_shapes(**{'model.staggered': False})
  assert sorted(out['t_features']) == list(config.model.s_levels)
  assert out['t_features'][7].shape == (1, 1, 1, config.model.fpn_channels)
  # P2 is then not built at all.
  assert 'lateral_c2' not in variables['params']['fpn']
  boxes = jax.ShapeDtypeStruct((1, 3, 4), jnp.float32)
  t_cls, _, _ = jax.eval_shape(
      lambda v, f, b: model.apply(v, f, b, method=mimicdet.MimicDet.t_head),
      variables, out['t_features'], boxes)
  assert t_cls.shape == (1, 3, 6)
  _, _, staggered_vars, staggered = _demo_shapes()
  assert sorted(staggered['t_features']) == [2, 3, 4, 5, 6]
  assert 'lateral_c2' in staggered_vars['params']['fpn']


def test_plain_s_head_config_has_no_offset_nets():
  _, _, variables, out = _demo_shapes(**{'s_head.deformable': False})
  flat = flax.traverse_util.flatten_dict(variables['params']['s_head_net'])
  assert not any('offset_net' in k for k in flat)
  assert flat[('p3_conv', 'kernel')].shape[:2] == (3, 3)
  assert flat[('coarse_conv', 'kernel')].shape[:2] == (5, 5)
  assert out['s_cls_logits'].shape[-1] == 6


def test_bfloat16_forward_is_finite_with_float32_params():
  config, model, variables, _, out = _demo_forward(batch=1, canvas=(128, 128), **{'model.dtype': 'bfloat16'})
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  for key in ('refine_logits', 'refine_deltas', 's_cls_logits', 's_reg_feature', 's_deltas'):
    assert out[key].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out[key])))
  assert out['t_features'][3].dtype == jnp.bfloat16
  boxes = jnp.array([[[8., 8., 40., 56.], [0., 0., 128., 128.]]])
  t_out = _run_t_head(model, variables, out['t_features'], boxes)
  assert all(t.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(t))) for t in t_out)


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_shapes_with_eval_shape(recipe):
  num_classes = 5 if recipe == 'demo' else 80
  config = _config(recipe, num_classes)
  model = mimicdet.MimicDet(config)
  canvas = tuple(config.data.canvas_buckets[0])
  images = jax.ShapeDtypeStruct((2,) + canvas + (3,), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  a = anchors.num_anchors(canvas, config.model.s_levels)
  logits = num_classes + 1
  assert out['refine_logits'].shape == (2, a)
  assert out['s_cls_logits'].shape == (2, a, logits)
  assert out['s_reg_feature'].shape == (2, a, config.s_head.reg_dim)
  assert out['s_deltas'].shape == (2, a, 4)
  for l in config.model.t_levels:
    assert out['t_features'][l].shape == (
        (2,) + anchors.level_shape(canvas, l) + (config.model.fpn_channels,))
  boxes = jax.ShapeDtypeStruct((2, config.t_head.num_samples, 4), jnp.float32)
  t_cls, t_reg, t_deltas = jax.eval_shape(
      lambda v, f, b: model.apply(v, f, b, method=mimicdet.MimicDet.t_head),
      variables, out['t_features'], boxes)
  assert t_cls.shape == (2, config.t_head.num_samples, logits)
  assert t_reg.shape == (2, config.t_head.num_samples, config.t_head.fc_dim)
  assert t_deltas.shape == (2, config.t_head.num_samples, 4)
  if recipe not in ('demo', 'proxy_real', 'photos'):  # the CPU recipes: 256x256
    assert canvas == (896, 1408) and a == 112 * 176 + 56 * 88 + 28 * 44 + 14 * 22 + 7 * 11
