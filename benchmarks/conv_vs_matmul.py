"""Why models/layers.Conv1x1 is a matmul: fwd+bwd time of a 1x1 and a 3x3 conv.

  python benchmarks/conv_vs_matmul.py [--reps 5]

Times jax.grad (w.r.t. input and kernel) of sum(conv(x, w)**2) for the
shapes of the demo's S-head (1x1, [8,32,32,64] -> 256) and FPN P2 output
(3x3, [8,64,64,64] -> 64), as lax.conv_general_dilated and as the same
maths written as a matmul (1x1) or im2col + matmul (3x3), in one process.
"""
import argparse
import time

import jax
from jax import lax
import jax.numpy as jnp


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def matmul_1x1(x, w):
  return x @ w[0, 0]


def im2col(x, w):
  kh, kw, ci, co = w.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, wd = x.shape[1:3]
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :]
                          for i in range(kh) for j in range(kw)], -1)
  return cols @ w.reshape(kh * kw * ci, co)


def bench(fn, x, w, reps):
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w)**2), argnums=(0, 1)))
  jax.block_until_ready(grad(x, w))
  start = time.perf_counter()
  for _ in range(reps):
    out = grad(x, w)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps * 1000


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  key = jax.random.PRNGKey(0)
  cases = [('1x1 [8,32,32,64]->256', (8, 32, 32, 64), (1, 1, 64, 256), matmul_1x1, 'matmul'),
           ('3x3 [8,64,64,64]->64', (8, 64, 64, 64), (3, 3, 64, 64), im2col, 'im2col+matmul')]
  print(f'device: {jax.devices()[0].device_kind}, fwd+bwd ms (mean of {args.reps} calls)')
  for name, xs, ws, alt, alt_name in cases:
    x, w = jax.random.normal(key, xs), jax.random.normal(key, ws)
    t_conv, t_alt = bench(conv, x, w, args.reps), bench(alt, x, w, args.reps)
    print(f'{name:24s} conv {t_conv:7.1f}  {alt_name} {t_alt:7.1f}  '
          f'ratio conv/{alt_name} {t_conv / t_alt:4.2f}')


if __name__ == '__main__':
  main()
