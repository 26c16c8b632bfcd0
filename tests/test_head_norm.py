"""t_head.norm / s_head.norm (GroupNorm before the hidden ReLUs) and the
dead-unit monitor (t_reg_alive / s_reg_alive), against NumPy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.demo
from mimicdet_jax import config_lib
from mimicdet_jax.losses import total
from mimicdet_jax.models import heads


def numpy_alive(features, mask):
  b, s, d = features.shape
  alive = 0
  for unit in range(d):
    alive += any(features[i, j, unit] > 0 and mask[i, j]
                 for i in range(b) for j in range(s))
  return alive / d


def test_alive_units_matches_numpy_loop():
  rng = np.random.default_rng(0)
  f = np.maximum(rng.normal(size=(2, 5, 12)) - 1.0, 0.0).astype(np.float32)
  f[:, :, 3] = 0.0  # a dead unit
  f[:, :, 7] = 0.0
  f[0, 1, 7] = 2.0  # alive only on a masked-out row: counts as dead
  mask = rng.random((2, 5)) < 0.6
  mask[0, 1] = False
  got = float(total.alive_units(jnp.asarray(f), jnp.asarray(mask)))
  assert got == pytest.approx(numpy_alive(f, mask))
  assert 0.0 < got < 1.0


def numpy_group_norm_relu(x, groups, scale, bias, eps=1e-5):
  """Per sample (axis 0): mean / var over the positions and the channels of
  each group, then scale, bias and ReLU."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  c = x.shape[-1]
  size = c // groups
  for n in range(x.shape[0]):
    for g in range(groups):
      part = x[n, ..., g * size:(g + 1) * size]
      out[n, ..., g * size:(g + 1) * size] = (
          (part - part.mean()) / np.sqrt(part.var() + eps))
  return np.maximum(out * scale + bias, 0.0)


class NormedRelu(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, x):
    return heads._normed_relu(x, self.norm, jnp.float32, 'n')  # pylint: disable=protected-access


@pytest.mark.parametrize('shape', [(3, 64), (2, 4, 5, 64), (2, 48)])
def test_group_norm_relu_matches_numpy(shape):
  rng = np.random.default_rng(1)
  x = (rng.normal(size=shape) * 3.0 + 1.5).astype(np.float32)
  module = NormedRelu('group_norm')
  variables = module.init(jax.random.PRNGKey(0), x)
  c = shape[-1]
  scale = rng.normal(size=c).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  variables = {'params': {'n': {'scale': jnp.asarray(scale),
                                'bias': jnp.asarray(bias)}}}
  got = np.asarray(module.apply(variables, x))
  groups = np.gcd(32, c)  # 48 channels: 16 groups of 3
  np.testing.assert_allclose(
      got, numpy_group_norm_relu(x, groups, scale, bias), rtol=1e-3, atol=3e-3)
  # (float32 GroupNorm takes E[x^2] - E[x]^2: ~1e-3 off on 2-channel groups.)
  # 'none' is the paper's plain ReLU, with no parameters.
  plain = NormedRelu('none')
  assert plain.init(jax.random.PRNGKey(0), x) == {}
  np.testing.assert_array_equal(np.asarray(plain.apply({}, x)),
                                np.maximum(x, 0.0))


def test_head_norm_wiring_and_config_check():
  t_head = heads.THead(levels=(3,), num_logits=4, fc_dim=32, num_convs=2,
                       conv_dim=8, canonical_size=224.0, canonical_level=4,
                       norm='group_norm')
  feats = {3: jnp.ones((1, 16, 16, 8))}
  boxes = jnp.array([[[1.0, 2.0, 9.0, 12.0]]])
  params = jax.eval_shape(t_head.init, jax.random.PRNGKey(0), feats,
                          boxes)['params']
  assert {'cls_fc1_norm', 'cls_fc2_norm', 'reg_conv1_norm', 'reg_conv2_norm',
          'reg_fc_norm'} <= set(params)
  plain = jax.eval_shape(heads.THead(levels=(3,), num_logits=4, fc_dim=32,
                                     num_convs=2, conv_dim=8,
                                     canonical_size=224.0,
                                     canonical_level=4).init,
                         jax.random.PRNGKey(0), feats, boxes)['params']
  assert not any(k.endswith('_norm') for k in plain)
  s_head = heads.SHead(levels=(3, 4), num_logits=4, channels=8,
                       offset_hidden=(4,), cls_dim=16, reg_dim=16,
                       norm='group_norm')
  s_feats = {3: jnp.ones((1, 8, 8, 8)), 4: jnp.ones((1, 4, 4, 8))}
  deltas = {k: jnp.zeros(v.shape[:3] + (4,)) for k, v in s_feats.items()}
  s_params = jax.eval_shape(s_head.init, jax.random.PRNGKey(0), s_feats,
                            deltas)['params']
  assert {'cls_hidden_norm', 'reg_hidden_norm'} <= set(s_params)
  c = configs.demo.get_config()
  c.s_head.norm = 'batch_norm'
  with pytest.raises(config_lib.ConfigError, match='s_head.norm'):
    config_lib.resolve(c, num_classes=3)
