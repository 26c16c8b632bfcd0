"""ResNeXt's grouped 3x3 convolution, with a formulation for TPUs.

`grouped_conv3x3(x, kernel, groups, stride, impl)` computes what
`lax.conv_general_dilated(..., feature_group_count=groups)` computes with
padding 1, NHWC input and flax's kernel layout (3, 3, C_in / groups, C_out):

- 'xla': that call; XLA lowers the grouped conv itself.
- 'blockdiag': groups merged into blocks of `block` input channels with a
  block-diagonal kernel (dense inside a group, zero between the groups of a
  block), then a conv with C_in / block groups. block / (C_in / groups) x the
  flops, but each block is a matrix-unit-sized contraction.
- 'auto': 'blockdiag' where the program is lowered for TPU, 'xla' elsewhere
  (`lax.platform_dependent`: an ahead-of-time compile for TPU from a CPU host
  takes the TPU branch).

Why: XLA:TPU's own grouped conv with 4-32 channels per group (ResNeXt-101
64x4d) accesses 5-20x the bytes of the block-diagonal one, forward and
backward, per the TPU compiler's cost analysis; GPUs (cuDNN) and CPUs run
grouped convs natively. Figures: docs/BENCHMARKS.md, "X101's grouped convs"
(benchmarks/tpu_grouped_conv.py).
"""
import jax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'blockdiag')
# Input channels per block-diagonal block: the TPU matrix unit's width, the
# fewest bytes per layer of X101 64x4d in benchmarks/tpu_grouped_conv.py.
BLOCK = 128


def _xla(x, kernel, groups, stride):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def block_diagonal(kernel: jax.Array, groups: int, block: int) -> jax.Array:
  """(kh, kw, C_in/groups, C_out) -> (kh, kw, block, C_out), groups merged.

  Block b of `block` input channels holds groups b*m .. b*m+m-1 (m = block /
  channels per group); its kernel is zero between different groups.
  """
  kh, kw, cpg, c_out = kernel.shape
  m = block // cpg
  k = kernel.reshape(kh, kw, cpg, groups // m, m, c_out // groups)
  dense = jnp.einsum('hwcbmo,nm->hwncbmo', k, jnp.eye(m, dtype=kernel.dtype))
  return dense.reshape(kh, kw, m * cpg, c_out)


def _blockdiag(x, kernel, groups, stride, block):
  c_in = x.shape[-1]
  cpg = c_in // groups
  block = max(cpg, min(block, c_in))
  if block % cpg or c_in % block:  # groups do not tile the blocks
    return _xla(x, kernel, groups, stride)
  return _xla(x, block_diagonal(kernel, groups, block), c_in // block, stride)


def grouped_conv3x3(x: jax.Array, kernel: jax.Array, groups: int,
                    stride: int = 1, impl: str = 'auto',
                    block: int = BLOCK) -> jax.Array:
  """3x3 conv, padding 1, stride `stride`, `groups` groups; impl of IMPLS."""
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'xla' or groups == 1:
    return _xla(x, kernel, groups, stride)
  if impl == 'blockdiag':
    return _blockdiag(x, kernel, groups, stride, block)
  return jax.lax.platform_dependent(
      x, kernel,
      tpu=lambda x, k: _blockdiag(x, k, groups, stride, block),
      default=lambda x, k: _xla(x, k, groups, stride))
