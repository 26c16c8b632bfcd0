"""tools/floor.py: the floor under a program's bytes, against sizes
worked out by hand (closed forms), for each rule of its model."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mimicdet_jax.tools import floor as floor_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

F32, BF16 = 4, 2


def floor(fn, *args):
  return floor_lib.program_floor(jax.jit(fn), args)


def test_matmul_reads_operands_writes_result_and_elementwise_is_free():
  a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  row = floor(lambda a, w: jax.nn.relu(a @ w * 2.0 + 1.0), a, w)
  dot = (64 * 32 + 32 * 16 + 64 * 16) * F32
  assert row['dot_general'] == dot
  assert row['arguments'] == (64 * 32 + 32 * 16) * F32
  assert row['outputs'] == 64 * 16 * F32
  assert row['total'] == dot + row['arguments'] + row['outputs']


def test_conv_forward_and_backward_are_three_convs_at_their_dtypes():
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.bfloat16)
  y = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.bfloat16)

  def fwd_bwd(x, k, dy):
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    out, pull = jax.vjp(conv, x, k)
    return out, pull(dy)

  row = floor(fwd_bwd, x, k, y)
  nx, nk, ny = 2 * 8 * 8 * 4, 3 * 3 * 4 * 8, 2 * 8 * 8 * 8
  # forward x, k -> y; input gradient dy, k -> dx; kernel gradient x, dy -> dk
  convs = ((nx + nk + ny) + (ny + nk + nx) + (nx + ny + nk)) * BF16
  assert row['conv_general_dilated'] == convs
  assert row['arguments'] == (nx + nk + ny) * BF16
  assert row['outputs'] == (ny + nx + nk) * BF16


def test_scan_counts_every_trip_while_counts_one_cond_its_largest_branch():
  m = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  one = 3 * 16 * 16 * F32  # one 16x16 @ 16x16 matmul

  def scanned(m):
    return jax.lax.scan(lambda c, _: (c @ m, None), m, None, length=5)[0]

  def looped(m):
    return jax.lax.while_loop(lambda c: c[0, 0] < 1e6, lambda c: c @ m, m)

  def branches(m, p):
    return jax.lax.cond(p, lambda m: m @ m @ m, lambda m: m @ m, m)

  assert floor(scanned, m)['dot_general'] == 5 * one
  row = floor(looped, m)
  assert row['dot_general'] == one and row['(while)'] == one
  row = floor(branches, m, jax.ShapeDtypeStruct((), jnp.bool_))
  assert row['dot_general'] == 2 * one


def test_collective_reads_and_writes_its_operand_arguments_per_shard():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('d',))
  spec = jax.sharding.PartitionSpec

  def summed(x):
    return jax.shard_map(lambda x: jax.lax.psum(x, 'd'), mesh=mesh,
                         in_specs=spec('d'), out_specs=spec())(x)

  split = jax.sharding.NamedSharding(mesh, spec('d'))
  row = floor(summed, jax.ShapeDtypeStruct((2, 128), jnp.float32,
                                           sharding=split))
  psum = sum(v for k, v in row.items() if k.startswith('psum'))
  assert psum == 2 * 128 * F32  # the per-device [1, 128], in and out
  assert row['arguments'] == 128 * F32  # one device's shard
