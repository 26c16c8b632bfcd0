r"""The FPN's top-down nearest upsampling, alone, in forms XLA:TPU might take
better: the lateral + upsample at P2's shapes ([2, 224, 352, 256] +
[2, 112, 176, 256], bfloat16), forward and backward, compiled for one v5p
chip; prints each form's bytes accessed and the compiler's estimate
(compiler figures, not measured; docs/BENCHMARKS.md, "What holds the <= 11
GB per image target").

  python benchmarks/tpu_upsample.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from mimicdet_jax.models import fpn  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top

B, H, W, C = 2, 112, 176, 256


def two_step(x, hw):
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None], (b, h, 2, w, c)).reshape(b, 2 * h, w, c)
  return jnp.broadcast_to(x[:, :, :, None], (b, 2 * h, w, 2, c)).reshape(
      b, 2 * h, 2 * w, c)


def w_matmul(x, hw):
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None], (b, h, 2, w, c)).reshape(b, 2 * h, w, c)
  m = (jnp.arange(2 * w)[None, :] // 2 == jnp.arange(w)[:, None]).astype(x.dtype)
  return jnp.einsum('bhwc,wv->bhvc', x, m)


FORMS = {
    'broadcast + reshape (fpn.upsample_nearest)': fpn.upsample_nearest,
    'H then W, each a broadcast': two_step,
    'jnp.repeat twice': lambda x, hw: jnp.repeat(jnp.repeat(x, 2, 1), 2, 2),
    'jax.image.resize nearest': lambda x, hw: jax.image.resize(
        x, (x.shape[0], hw[0], hw[1], x.shape[3]), 'nearest'),
    'H a broadcast, W a 0/1 matmul': w_matmul,
}


def main():
  one = jax.sharding.SingleDeviceSharding(aot.topology_devices('v5p:1x1x1')[0])
  big = jax.ShapeDtypeStruct((B, 2 * H, 2 * W, C), jnp.bfloat16, sharding=one)
  small = jax.ShapeDtypeStruct((B, H, W, C), jnp.bfloat16, sharding=one)
  for name, up in FORMS.items():
    def program(lateral, inner, cot, up=up):
      y, pullback = jax.vjp(lambda l, i: l + up(i, l.shape[1:3]), lateral, inner)
      return y, pullback(cot)
    cost = jax.jit(program).lower(big, small, big).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"{name}: {cost['bytes accessed'] / 1e9:.3f} GB, estimate "
          f"{cost.get('optimal_seconds', 0) * 1e3:.3f} ms", flush=True)


if __name__ == '__main__':
  main()
