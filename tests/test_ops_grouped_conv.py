"""ops.grouped_conv against a NumPy loop; the backbone's grouped convs per impl."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mimicdet_jax.models import backbones
from mimicdet_jax.ops import grouped_conv
from tests.test_plan_tpu import needs_libtpu


def numpy_grouped_conv3x3(x, kernel, groups, stride):
  """Direct loop over output pixels, groups and taps (padding 1)."""
  n, h, w, c_in = x.shape
  cpg, c_out = kernel.shape[2], kernel.shape[3]
  opg = c_out // groups
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  out = np.zeros((n, ho, wo, c_out))
  for g in range(groups):
    for i in range(3):
      for j in range(3):
        tap = xp[:, i:i + stride * (ho - 1) + 1:stride,
                 j:j + stride * (wo - 1) + 1:stride, g * cpg:(g + 1) * cpg]
        out[..., g * opg:(g + 1) * opg] += tap @ kernel[i, j, :, g * opg:(g + 1) * opg]
  return out


CASES = [  # (channels in, channels out, groups, stride, block)
    (32, 32, 8, 1, 16),   # 4 groups per block
    (32, 32, 8, 2, 16),   # strided
    (32, 64, 4, 1, 16),   # 2 output channels per input channel
    (24, 24, 6, 1, 16),   # blocks do not tile the groups: XLA's grouped conv
    (16, 16, 4, 1, 128),  # block wider than the input: one block
]


@pytest.mark.parametrize('impl', grouped_conv.IMPLS)
@pytest.mark.parametrize('c_in,c_out,groups,stride,block', CASES)
def test_every_impl_matches_a_numpy_loop(impl, c_in, c_out, groups, stride,
                                         block):
  rng = np.random.default_rng(c_in + groups + stride)
  x = rng.normal(size=(2, 7, 9, c_in)).astype(np.float32)
  k = rng.normal(size=(3, 3, c_in // groups, c_out)).astype(np.float32)
  got = grouped_conv.grouped_conv3x3(jnp.asarray(x), jnp.asarray(k), groups,
                                     stride, impl, block)
  np.testing.assert_allclose(np.asarray(got),
                             numpy_grouped_conv3x3(x, k, groups, stride),
                             rtol=1e-4, atol=1e-4)


def test_block_diagonal_kernel_is_zero_between_groups():
  rng = np.random.default_rng(0)
  cpg, groups, block = 2, 8, 8  # 4 groups per block, 2 blocks
  k = rng.normal(size=(3, 3, cpg, 16)).astype(np.float32)  # 2 outputs / group
  dense = np.asarray(grouped_conv.block_diagonal(jnp.asarray(k), groups, block))
  assert dense.shape == (3, 3, block, 16)
  for o in range(16):
    g = o // 2
    row = (g % 4) * cpg  # the group's input channels inside its block
    np.testing.assert_array_equal(dense[:, :, row:row + cpg, o], k[:, :, :, o])
    others = np.delete(dense[:, :, :, o], np.s_[row:row + cpg], axis=2)
    assert not others.any()


def test_gradients_match_xla_grouped_conv():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 6, 5, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 4, 32)), jnp.float32)
  grads = {impl: jax.grad(lambda x, k, impl=impl: jnp.sum(jnp.sin(
      grouped_conv.grouped_conv3x3(x, k, 8, 2, impl, 16))), argnums=(0, 1))(x, k)
           for impl in ('xla', 'blockdiag')}
  for a, b in zip(grads['xla'], grads['blockdiag']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4)


def test_bottleneck_has_the_same_parameters_and_outputs_for_every_impl():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 64)),
                  jnp.float32)
  outs = {}
  for impl in grouped_conv.IMPLS:
    block = backbones.Bottleneck(planes=64, stride=2, groups=8,
                                 width_per_group=4, grouped_conv=impl)
    variables = block.init(jax.random.PRNGKey(0), x)
    assert variables['params']['conv2']['kernel'].shape == (3, 3, 4, 32)
    outs[impl] = (variables, block.apply(variables, x))
  ref_vars, ref = outs['xla']
  for impl, (variables, y) in outs.items():
    assert jax.tree.all(jax.tree.map(
        lambda a, b: bool((a == b).all()), variables, ref_vars)), impl
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5,
                               atol=1e-5)


def test_unknown_impl_names_the_allowed_ones():
  with pytest.raises(ValueError, match='blockdiag'):
    grouped_conv.grouped_conv3x3(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 2, 8)),
                                 4, 1, 'dense')


@needs_libtpu
def test_auto_is_block_diagonal_on_tpu_and_xla_on_cpu():
  """'auto' compiled for a TPU chip from this CPU host costs what 'blockdiag'
  costs (its flops are the block-diagonal conv's, not XLA's grouped conv's);
  lowered for the CPU it is XLA's grouped conv."""
  from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top
  one = jax.sharding.SingleDeviceSharding(aot.topology_devices('v5p:1x1x1')[0])
  x = jax.ShapeDtypeStruct((2, 56, 88, 256), jnp.bfloat16, sharding=one)
  k = jax.ShapeDtypeStruct((3, 3, 4, 256), jnp.bfloat16, sharding=one)
  flops = {}
  for impl in grouped_conv.IMPLS:
    fn = lambda x, k, impl=impl: grouped_conv.grouped_conv3x3(x, k, 64, 1, impl)
    flops[impl] = jax.jit(fn).lower(x, k).compile().cost_analysis()['flops']
  assert flops['blockdiag'] > 10 * flops['xla']  # 128-wide blocks: 32x
  assert flops['auto'] == flops['blockdiag']
  cpu = jax.jit(lambda x, k: grouped_conv.grouped_conv3x3(x, k, 64, 1)).lower(
      jnp.zeros((1, 8, 8, 256), jnp.bfloat16), jnp.zeros((3, 3, 4, 256),
                                                         jnp.bfloat16))
  assert 'feature_group_count = 64' in cpu.as_text()
