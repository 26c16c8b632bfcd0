"""Backward passes that XLA:CPU runs slowly, and the rewrites that were tried.

  python benchmarks/cpu_grad_variants.py [--reps 20]

1. The ResNet stem max pool (3x3, stride 2, pad 1) on [8, 128, 128, 16]:
   flax `nn.max_pool` (reduce_window; its gradient is a select-and-scatter)
   vs `backbones.max_pool_3x3_s2` (the max of nine strided taps, what the
   backbone uses), forward and forward+backward.
2. The weight gradient of a 3x3 conv at demo shapes: XLA's own vs a
   custom_vjp computing it as nine shifted matmuls or one im2col matmul
   (kept out of the model: slower for the large shapes).
3. A 1x1 layer (x @ W) as the model runs it, per image under vmap with a
   normalisation after it, fwd+bwd: `jnp.dot` (autodiff's weight gradient,
   which XLA:CPU computed after transposing the output gradient) vs
   `ops.matmul.channel_matmul` (its own VJP, what `layers.Conv1x1` uses).
Each row is timed in this one process (median of --reps calls).
"""
import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top,wrong-import-position
from mimicdet_jax.ops.matmul import channel_matmul  # pylint: disable=g-import-not-at-top,wrong-import-position


def _conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _taps(x):
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def _with_weight_grad(weight_grad):
  """conv with XLA's input gradient and the given weight gradient."""
  @jax.custom_vjp
  def f(x, w):
    return _conv(x, w)

  def fwd(x, w):
    return _conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    dx, = jax.vjp(lambda xx: _conv(xx, w), x)[1](g)
    return dx, weight_grad(x, g).reshape(w.shape)
  f.defvjp(fwd, bwd)
  return f


def _shifted_matmuls(x, g):
  c = x.shape[-1]
  g2 = g.reshape(-1, g.shape[-1])
  return jnp.stack([t.reshape(-1, c).T @ g2 for t in _taps(x)])


def _im2col(x, g):
  return jnp.einsum('bhwkc,bhwo->kco', jnp.stack(_taps(x), axis=3), g)


def _median_ms(f, args, reps):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reps', type=int, default=20)
  reps = parser.parse_args().reps
  rng = np.random.default_rng(0)

  x = jax.nn.relu(jnp.asarray(rng.normal(size=(8, 128, 128, 16)), jnp.float32))
  weights = jnp.arange(16.0)
  flax_pool = lambda v: nn.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1)))
  print('stem max pool [8,128,128,16]      forward ms  fwd+bwd ms')
  for name, pool in (('nn.max_pool (reduce_window)', flax_pool),
                     ('max_pool_3x3_s2 (nine taps)', backbones.max_pool_3x3_s2)):
    grad = jax.jit(jax.grad(lambda v, p=pool: jnp.sum(p(v) * weights)))
    print(f'  {name:30s} {_median_ms(jax.jit(pool), (x,), reps):10.2f} '
          f'{_median_ms(grad, (x,), reps):11.2f}')

  print('3x3 conv fwd+bwd ms: XLA  shifted matmuls  im2col matmul')
  variants = (_conv, _with_weight_grad(_shifted_matmuls),
              _with_weight_grad(_im2col))
  for shape, cout in (((8, 64, 64, 32), 32), ((8, 32, 32, 32), 32),
                      ((512, 7, 7, 32), 32), ((8, 32, 32, 64), 64)):
    xs = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(0.1 * rng.normal(size=(3, 3, shape[-1], cout)), jnp.float32)
    ms = [_median_ms(jax.jit(jax.grad(
        lambda a, b, f=f: jnp.sum(f(a, b) ** 2), argnums=(0, 1))), (xs, w), reps)
          for f in variants]
    print(f'  {str(shape):18s} -> {cout:3d}  ' + '  '.join(f'{m:8.2f}' for m in ms))

  print('1x1 layer per image, then normalised  jnp.dot ms  channel_matmul ms')
  for shape, cout in (((4, 1, 64, 64, 16), 32), ((4, 1, 32, 32, 64), 256)):
    xs = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(shape[-1], cout)), jnp.float32)
    g = jnp.asarray(rng.normal(size=shape[:-1] + (cout,)), jnp.float32)

    def loss(a, b, mm):
      y = jax.vmap(lambda ai: mm(ai, b))(a)
      y = y - y.mean(axis=(1, 2, 3), keepdims=True)
      return jnp.sum(jax.nn.relu(y) * g)

    ms = [_median_ms(jax.jit(jax.grad(
        lambda a, b, mm=mm: loss(a, b, mm), argnums=(0, 1))), (xs, w), reps)
          for mm in (jnp.dot, channel_matmul)]
    print(f'  {str(shape):18s} -> {cout:3d}  ' + '  '.join(f'{m:8.2f}' for m in ms))


if __name__ == '__main__':
  main()
