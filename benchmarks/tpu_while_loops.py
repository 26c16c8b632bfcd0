"""How XLA's TPU cost analysis counts while loops: once, not per trip.

  python benchmarks/tpu_while_loops.py

Compiles for one v5p chip (libtpu; compiler figures) (1) a fori_loop of 10
trips of a 1024x1024 matmul + tanh against the same loop unrolled and one
trip, and (2) the deformable conv of an 896x1408 canvas's P3 (1 x 112 x 176
x 256, 3x3, bf16, forward + backward) with its row chunking (one lax.map)
against one loop-free chunk. docs/BENCHMARKS.md, "How the bytes of while
loops are counted".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from mimicdet_jax.ops import deform_conv  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top


def report(name, fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  print(f'{name}: while loops {compiled.as_text().count(" while(")}, '
        f'{cost["flops"] / 1e9:.3f} GFLOP, {cost["bytes accessed"] / 1e9:.4f} '
        f'GB, optimal_seconds {cost.get("optimal_seconds")}')


def main():
  one = jax.sharding.SingleDeviceSharding(aot.topology_devices('v5p:2x2x1')[0])
  shaped = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
  x = shaped((1024, 1024), jnp.float32)
  body = lambda i, a: jnp.tanh(a @ a) + i
  report('one trip', lambda a: body(0, a), x)
  report('fori_loop, 10 trips', lambda a: jax.lax.fori_loop(0, 10, body, a), x)
  report('unrolled, 10 trips',
         lambda a: jax.lax.fori_loop(0, 10, body, a, unroll=True), x)
  args = (shaped((1, 112, 176, 256), jnp.bfloat16),
          shaped((1, 112, 176, 18), jnp.float32),
          shaped((3, 3, 256, 256), jnp.bfloat16))
  for name, limit in (('P3 deformable conv, chunked (default)',
                       deform_conv.DEFAULT_MAX_GATHER_ELEMENTS),
                      ('P3 deformable conv, one chunk (loop-free)', 1 << 40)):
    report(name, jax.grad(lambda x, o, k, limit=limit: deform_conv.deform_conv2d(
        x, o, k, padding=1, max_gather_elements=limit).astype(
            jnp.float32).sum(), argnums=(0, 2)), *args)


if __name__ == '__main__':
  main()
