"""Tests for mimicdet_jax.models.backbones (ResNet, frozen BN, freezing, counts).

References: torchvision's own layer1..layer4 outputs (tests/data/
torchvision_resnets.npz, made with torch from the weights that
tests/data/backbone_weights.py generates) and a NumPy bottleneck written here.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mimicdet_jax.models import backbones as bb
from mimicdet_jax.tools import import_weights

DATA = os.path.join(os.path.dirname(__file__), 'data')
sys.path.insert(0, DATA)
import backbone_weights  # pylint: disable=g-import-not-at-top,wrong-import-position

LEVELS = ('C2', 'C3', 'C4', 'C5')

# torchvision's documented num_params minus fc (2048 * 1000 + 1000).
TORCHVISION_NPARAMS_NOFC = {
    'resnet50': 25_557_032 - 2_049_000,
    'resnet101': 44_549_160 - 2_049_000,
    'resnext101_32x8d': 88_791_336 - 2_049_000,
    'resnext101_64x4d': 83_455_272 - 2_049_000,
}


@pytest.fixture(scope='module')
def refs():
  with np.load(os.path.join(DATA, 'torchvision_resnets.npz')) as f:
    return {k: f[k] for k in f.files}


def _torchvision_weights(refs, arch):
  shapes = json.loads(str(refs[f'{arch}_shapes']))
  return backbone_weights.make_weights(shapes, seed=1)


@pytest.mark.parametrize('arch,ext', [
    ('resnet50', 'safetensors'),
    # Grouped convs of X101 are also covered by the NumPy bottleneck test.
    pytest.param('resnext101_64x4d', 'npz', marks=pytest.mark.slow)])
def test_matches_torchvision_layers(refs, tmp_path, arch, ext):
  weights = _torchvision_weights(refs, arch)
  path = str(tmp_path / f'w.{ext}')
  if ext == 'safetensors':
    save_file(weights, path)
  else:
    np.savez(path, **weights)
  variables = import_weights.load_torchvision(arch, path)
  out = jax.jit(bb.ResNet(arch).apply)(variables, refs['input_nhwc'])
  for level in LEVELS:
    ref = refs[f'{arch}_{level}']
    got = np.asarray(out[level])
    assert got.shape == ref.shape, level
    # float32 sums of thousands of terms in a different order: compare with
    # 1e-4 of the level's magnitude (C4/C5 of X101 reach ~300).
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4 * scale, f'{arch} {level}: max err {err}, scale {scale}'


@pytest.mark.parametrize('arch', sorted(TORCHVISION_NPARAMS_NOFC))
def test_param_counts_equal_torchvision(refs, arch):
  n = bb.count_parameters(bb.init_shapes(arch))
  assert n == TORCHVISION_NPARAMS_NOFC[arch]
  if f'{arch}_nparams_nofc' in refs:
    assert n == int(refs[f'{arch}_nparams_nofc'])


# ----------------------------------------------------- NumPy bottleneck


def _np_conv(x, w_hwio, stride, pad, groups):
  """Direct NCHW-free conv: x [H, W, Cin], w [kh, kw, Cin/g, Cout]."""
  kh, kw, cin_g, cout = w_hwio.shape
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[0] + 2 * pad - kh) // stride + 1
  wo = (x.shape[1] + 2 * pad - kw) // stride + 1
  cout_g = cout // groups
  y = np.zeros((ho, wo, cout), np.float64)
  for i in range(ho):
    for j in range(wo):
      patch = xp[i * stride:i * stride + kh, j * stride:j * stride + kw]
      for g in range(groups):
        p = patch[:, :, g * cin_g:(g + 1) * cin_g]
        wg = w_hwio[:, :, :, g * cout_g:(g + 1) * cout_g]
        y[i, j, g * cout_g:(g + 1) * cout_g] = np.einsum('hwc,hwco->o', p, wg)
  return y


def _np_bn(x, v, eps=1e-5):
  return (x - v['mean']) / np.sqrt(v['var'] + eps) * v['scale'] + v['bias']


def _random_like(tree, rng):
  def fill(path, leaf):
    name = path[-1].key
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == 'scale':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (rng.standard_normal(leaf.shape) * 0.3).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, tree)


def test_bottleneck_matches_numpy():
  # ResNeXt-style block with a strided projection shortcut, odd spatial size.
  block = bb.Bottleneck(planes=4, stride=2, groups=2, width_per_group=64)
  x = np.random.default_rng(0).standard_normal((1, 7, 6, 6)).astype(np.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)
  v = _random_like(shapes, np.random.default_rng(1))
  got = np.asarray(jax.jit(block.apply)(v, x))[0]

  p, f = v['params'], v['frozen']
  relu = lambda a: np.maximum(a, 0)
  x0 = x[0].astype(np.float64)
  y = relu(_np_bn(_np_conv(x0, p['conv1']['kernel'], 1, 0, 1), f['bn1']))
  y = relu(_np_bn(_np_conv(y, p['conv2']['kernel'], 2, 1, 2), f['bn2']))
  y = _np_bn(_np_conv(y, p['conv3']['kernel'], 1, 0, 1), f['bn3'])
  sc = _np_bn(_np_conv(x0, p['downsample_conv']['kernel'], 2, 0, 1),
              f['downsample_bn'])
  want = relu(y + sc)
  assert p['conv2']['kernel'].shape == (3, 3, 4, 8)  # width 8, 2 groups
  assert got.shape == want.shape == (4, 3, 16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_identity_shortcut_block_has_no_projection():
  block = bb.Bottleneck(planes=4)
  shapes = jax.eval_shape(block.init, jax.random.key(0),
                          jnp.zeros((1, 5, 5, 16)))
  assert 'downsample_conv' not in shapes['params']
  assert 'downsample_bn' not in shapes['frozen']


# ------------------------------------------------------- tiny network


def _numpy_init(model, x, seed=0):
  """Variables of `model` with He-normal kernels from NumPy.

  jax.random init compiles slowly on a loaded CPU; the values only need to be
  a reasonable network, the init functions are not under test here.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out)
              ).astype(np.float32)
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def tiny():
  x = np.random.default_rng(0).standard_normal((2, 32, 64, 3)).astype(
      np.float32)
  return x, _numpy_init(bb.ResNet('resnet_tiny'), x)


def test_tiny_shapes_and_identity_frozen_bn(tiny):
  x, variables = tiny
  out = jax.jit(bb.ResNet('resnet_tiny').apply)(variables, x)
  channels = bb.ARCHS['resnet_tiny'].out_channels()
  assert channels == {'C2': 32, 'C3': 64, 'C4': 128, 'C5': 256}
  for s, level in enumerate(LEVELS):
    stride = 4 * 2**s
    assert out[level].shape == (2, 32 // stride, 64 // stride, channels[level])
    assert np.isfinite(np.asarray(out[level])).all()
  frozen = jax.tree_util.tree_leaves_with_path(variables['frozen'])
  for path, leaf in frozen:
    want = 1.0 if path[-1].key in ('scale', 'var') else 0.0
    np.testing.assert_array_equal(leaf, want)
  assert all(l.dtype == jnp.float32
             for l in jax.tree_util.tree_leaves(variables))


def test_remat_same_outputs_and_grads(tiny):
  x, variables = tiny

  def loss(params, remat):
    out = bb.ResNet('resnet_tiny', remat=remat, frozen_stages=0).apply(
        {'params': params, 'frozen': variables['frozen']}, x)
    return sum(jnp.sum(jnp.sin(o)) for o in out.values())

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l0, g0 = grad_fn(variables['params'], False)
  l1, g1 = grad_fn(variables['params'], True)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1),
                          jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # frozen_stages=0: every conv gets a gradient.
    assert np.abs(np.asarray(a)).max() > 0, path


def test_bfloat16_compute(tiny):
  x, variables = tiny
  out32 = jax.jit(bb.ResNet('resnet_tiny').apply)(variables, x)
  model = bb.ResNet('resnet_tiny', dtype=jnp.bfloat16)
  # Params created by a bf16 model are float32 too.
  v16 = jax.eval_shape(model.init, jax.random.key(1), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(v16))
  out16 = jax.jit(model.apply)(variables, x)
  for level in LEVELS:
    assert out16[level].dtype == jnp.bfloat16
    assert out16[level].shape == out32[level].shape
    a = np.asarray(out16[level], np.float32)
    assert np.isfinite(a).all()
    b = np.asarray(out32[level])
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 0.05, (level, rel)


def test_frozen_stages_get_zero_gradient(tiny):
  # frozen_stages=0 (all gradients non-zero) is checked in the remat test.
  x, variables = tiny
  frozen_stages = 1

  def loss(params):
    out = bb.ResNet('resnet_tiny', frozen_stages=frozen_stages).apply(
        {'params': params, 'frozen': variables['frozen']}, x)
    return sum(jnp.sum(o**2) for o in out.values())

  grads = jax.jit(jax.grad(loss))(variables['params'])
  mask = bb.frozen_param_mask(variables['params'], frozen_stages)
  frozen_modules = {'conv1', 'layer1'}
  for (path, g), m in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree_util.tree_leaves(mask)):
    top = path[0].key
    assert m == (top in frozen_modules), path
    if m:
      np.testing.assert_array_equal(g, 0.0)
    else:
      assert np.abs(np.asarray(g)).max() > 0, path


def test_frozen_param_mask_on_full_model_tree(tiny):
  _, variables = tiny
  mask2 = bb.frozen_param_mask(variables['params'], 2)
  assert all(jax.tree_util.tree_leaves(mask2['layer2']))
  assert not any(jax.tree_util.tree_leaves(mask2['layer3']))
  assert not any(jax.tree_util.tree_leaves(bb.frozen_param_mask(
      variables['params'], 0)))
  params = {'backbone': variables['params'],
            'fpn': {'conv1': {'kernel': jnp.zeros((1, 1, 2, 2))}}}
  mask = bb.frozen_param_mask(params, 1)
  assert mask['fpn']['conv1']['kernel'] is False  # same name, not backbone
  assert mask['backbone']['conv1']['kernel'] is True
  assert all(jax.tree_util.tree_leaves(mask['backbone']['layer1']))
  assert not any(jax.tree_util.tree_leaves(mask['backbone']['layer2']))


def test_group_norm_option():
  x = jnp.ones((1, 32, 32, 3))
  model = bb.ResNet('resnet_tiny', norm='group_norm', frozen_stages=1)
  variables = _numpy_init(model, x)
  assert 'frozen' not in variables
  assert 'scale' in variables['params']['bn1']
  out = jax.jit(model.apply)(variables, x)
  assert out['C5'].shape == (1, 1, 1, 256)
  assert np.isfinite(np.asarray(out['C5'])).all()
  mask = bb.frozen_param_mask(variables['params'], 1)
  assert mask['bn1']['scale'] and not mask['layer2']['block0']['bn1']['scale']
  with pytest.raises(ValueError, match='norm'):
    jax.eval_shape(bb.ResNet('resnet_tiny', norm='batch_norm').init,
                   jax.random.key(0), x)


def test_resnet50_full_resolution_shapes():
  shapes = jax.eval_shape(
      lambda: bb.ResNet('resnet50').init_with_output(
          jax.random.key(0), jnp.zeros((1, 896, 1408, 3)))[0])
  want = bb.ARCHS['resnet50'].out_channels()
  for s, level in enumerate(LEVELS):
    stride = 4 * 2**s
    assert shapes[level].shape == (1, 896 // stride, 1408 // stride,
                                   want[level])


def test_unknown_arch_raises():
  with pytest.raises(ValueError, match='resnet_tiny'):
    jax.eval_shape(bb.ResNet('resnet18').init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize('hw', [(16, 16), (15, 9)])
def test_max_pool_matches_reduce_window_values_and_gradient(hw):
  """The nine-tap stem max pool equals XLA's reduce_window max pool (flax),
  values and gradient, on tie-free data (odd sizes: -inf padding counts)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.permutation(2 * hw[0] * hw[1] * 3).reshape(
      2, *hw, 3).astype(np.float32) / 7.0 - 5.0)  # distinct values: no ties
  ref = lambda v: nn.max_pool(v, (3, 3), strides=(2, 2),
                              padding=((1, 1), (1, 1)))
  w = jnp.asarray(rng.normal(size=ref(x).shape).astype(np.float32))
  np.testing.assert_array_equal(bb.max_pool_3x3_s2(x), ref(x))
  g_ours = jax.grad(lambda v: jnp.sum(bb.max_pool_3x3_s2(v) * w))(x)
  g_ref = jax.grad(lambda v: jnp.sum(ref(v) * w))(x)
  np.testing.assert_allclose(g_ours, g_ref, rtol=0, atol=1e-6)


def _np_max_pool_first_argmax(x, g):
  """torch MaxPool2d(3, 2, padding=1) and its gradient by loops: each
  window's gradient goes to its first maximal element in row-major order."""
  b, h, w, c = x.shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  out = np.full((b, ho, wo, c), -np.inf, np.float32)
  grad = np.zeros_like(x)
  for n in range(b):
    for r in range(ho):
      for s in range(wo):
        for k in range(c):
          best = None
          for i in range(2 * r - 1, 2 * r + 2):
            for j in range(2 * s - 1, 2 * s + 2):
              if 0 <= i < h and 0 <= j < w and (
                  best is None or x[n, i, j, k] > x[n, best[0], best[1], k]):
                best = (i, j)
          out[n, r, s, k] = x[n, best[0], best[1], k]
          grad[n, best[0], best[1], k] += g[n, r, s, k]
  return out, grad


def _tied_case(hw):
  """(x, cotangent, the loop's max pool, its gradient) on data with ties: a
  ReLU's zeros, repeated values, and a tie of positive values."""
  rng = np.random.default_rng(3)
  x = np.maximum(rng.integers(-3, 3, size=(2, *hw, 2)), 0).astype(np.float32)
  x[0, 0, :3, 0] = 5.0  # a tie of positive values
  g = rng.normal(size=(2, (hw[0] + 1) // 2, (hw[1] + 1) // 2, 2)).astype(
      np.float32)
  return (x, g) + _np_max_pool_first_argmax(x, g)


@pytest.mark.parametrize('hw', [(8, 8), (7, 5)])
def test_max_pool_gradient_goes_to_the_first_maximum_like_torch(hw):
  """With ties (a ReLU's zeros, repeated values) the gradient of each window
  goes to its first maximal element only, as in torch; checked against a
  loop, also under vmap and jit as the model runs it."""
  x, g, want_out, want_grad = _tied_case(hw)
  f = lambda v: jnp.sum(bb.max_pool_3x3_s2(v) * g)
  np.testing.assert_array_equal(bb.max_pool_3x3_s2(jnp.asarray(x)), want_out)
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(x)), want_grad,
                             rtol=0, atol=1e-6)
  per_image = jax.jit(jax.vmap(jax.grad(
      lambda v, gi: jnp.sum(bb.max_pool_3x3_s2(v[None]) * gi[None]))))
  np.testing.assert_allclose(per_image(jnp.asarray(x), g), want_grad,
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize('stride,hw', [(1, (6, 5)), (2, (7, 6))])
def test_conv1x1_matches_strided_conv(stride, hw):
  """layers.Conv1x1 (used for every 1x1 backbone conv) equals nn.Conv 1x1
  with the same kernel, stride and no padding (torchvision's shortcut)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models.layers import Conv1x1  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *hw, 5)),
                  jnp.float32)
  ours = Conv1x1(4, use_bias=False, stride=stride)
  params = ours.init(jax.random.PRNGKey(0), x)
  ref = nn.Conv(4, (1, 1), strides=(stride, stride), padding='VALID',
                use_bias=False)
  y = ours.apply(params, x)
  assert y.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 4)
  np.testing.assert_allclose(y, ref.apply(params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('per_image', [False, True])
def test_channel_matmul_gradients_match_the_closed_form(per_image):
  """ops.matmul.channel_matmul's own VJP: dx = dy W^T, dW = sum over every
  position (and image) of x^T dy, against NumPy, batched and under vmap."""
  from mimicdet_jax.ops.matmul import channel_matmul  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 1, 4, 5, 6)).astype(np.float32)
  w = rng.normal(size=(6, 7)).astype(np.float32)
  g = rng.normal(size=(3, 1, 4, 5, 7)).astype(np.float32)
  if per_image:
    fn = lambda x, w: jnp.sum(jax.vmap(lambda xi: channel_matmul(xi, w))(x) * g)
  else:
    fn = lambda x, w: jnp.sum(channel_matmul(x, w) * g)
  dx, dw = jax.jit(jax.grad(fn, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  np.testing.assert_allclose(dx, g64 @ w.T.astype(np.float64), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(
      dw, x64.reshape(-1, 6).T @ g64.reshape(-1, 7), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(channel_matmul(jnp.asarray(x), jnp.asarray(w)),
                             x64 @ w.astype(np.float64), rtol=1e-5, atol=1e-5)
  # bfloat16 compute keeps its dtypes through the custom gradient.
  gb = jax.grad(lambda x, w: jnp.sum(channel_matmul(x, w).astype(jnp.float32)),
                argnums=(0, 1))(jnp.asarray(x, jnp.bfloat16),
                                jnp.asarray(w, jnp.bfloat16))
  assert gb[0].dtype == jnp.bfloat16 and gb[1].dtype == jnp.bfloat16


def test_max_pool_branch_of_other_platforms_matches_the_loop(hw=(7, 5)):
  """Off the CPU the max is one reduce_window and the first-maximum index
  comes from comparing the taps with it: the same values and gradient as the
  loop, ties included; a TPU lowering has the reduce_window, a CPU one not."""
  x, g, want_out, want_grad = _tied_case(hw)
  out, index = bb._max_pool_reduce_window_with_index(jnp.asarray(x))  # pylint: disable=protected-access
  np.testing.assert_array_equal(out, want_out)
  (grad,) = bb._max_pool_bwd((index, hw), jnp.asarray(g))  # pylint: disable=protected-access
  np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-6)
  traced = jax.jit(jax.grad(lambda v: jnp.sum(bb.max_pool_3x3_s2(v) * g))
                   ).trace(jnp.asarray(x))
  assert 'reduce_window' in traced.lower(lowering_platforms=('tpu',)).as_text()
  assert 'reduce_window' not in traced.lower(
      lowering_platforms=('cpu',)).as_text()
