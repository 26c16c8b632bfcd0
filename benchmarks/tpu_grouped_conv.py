"""X101's grouped 3x3 conv on TPU: XLA's grouped conv against rewrites.

  python benchmarks/tpu_grouped_conv.py [--layers 1,2,3,4]
      [--impls xla,blockdiag,taps] [--blocks 32,64,128,256]

Compiles, for one v5p chip (libtpu; compiler figures, not measured), the
forward + backward (input and kernel gradients) of one stride-1 3x3 conv of
ResNeXt-101 64x4d at the 896x1408 canvas, 2 images, bf16, per layer:
`ops.grouped_conv`'s 'xla' (feature_group_count) and 'blockdiag' (at each
--blocks width), and 'taps' (below: nine shifted slices, each a matmul
batched over the groups). Prints flops, bytes accessed (and without the
memory-space copies), temporaries, the compiler's estimate and the compile
time. docs/BENCHMARKS.md, "X101's grouped convs".
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from mimicdet_jax.ops import grouped_conv  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top

# X101 64x4d at 896x1408: (H, W, channels) of each layer's grouped conv.
LAYERS = {1: (224, 352, 256), 2: (112, 176, 512), 3: (56, 88, 1024),
          4: (28, 44, 2048)}
GROUPS = 64


def taps(x, kernel, groups):
  """Stride-1 grouped 3x3 conv as nine shifted, group-batched matmuls."""
  n, h, w, c_in = x.shape
  cpg = c_in // groups
  k = kernel.reshape(3, 3, cpg, groups, kernel.shape[-1] // groups)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = 0
  for i in range(3):
    for j in range(3):
      tap = xp[:, i:i + h, j:j + w].reshape(n, h, w, groups, cpg)
      out = out + jnp.einsum('nhwgc,cgo->nhwgo', tap, k[i, j],
                             preferred_element_type=jnp.float32)
  return out.astype(x.dtype).reshape(n, h, w, -1)


def conv(x, k, impl, block):
  if impl == 'taps':
    return taps(x, k, GROUPS)
  return grouped_conv.grouped_conv3x3(x, k, GROUPS, 1, impl, block)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', default='1,2,3,4')
  parser.add_argument('--impls', default='xla,blockdiag,taps')
  parser.add_argument('--blocks', default=str(grouped_conv.BLOCK),
                      help="'blockdiag' block widths to try")
  parser.add_argument('--batch', type=int, default=2)
  args = parser.parse_args()
  one = jax.sharding.SingleDeviceSharding(aot.topology_devices('v5p:1x1x1')[0])
  for layer in (int(v) for v in args.layers.split(',')):
    h, w, c = LAYERS[layer]
    x = jax.ShapeDtypeStruct((args.batch, h, w, c), jnp.bfloat16, sharding=one)
    k = jax.ShapeDtypeStruct((3, 3, c // GROUPS, c), jnp.float32, sharding=one)
    runs = [(impl, int(b)) for impl in args.impls.split(',')
            for b in (args.blocks.split(',') if impl == 'blockdiag' else [0])]
    for impl, block in runs:
      def loss(x, k, impl=impl, block=block):
        y = conv(x, k.astype(jnp.bfloat16), impl, block or grouped_conv.BLOCK)
        return jnp.sum(y.astype(jnp.float32) ** 2)
      t0 = time.time()
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, k).compile()
      dt = time.time() - t0
      cost = compiled.cost_analysis()
      copies = aot.memory_space_copy_bytes(compiled.as_text())
      temp = compiled.memory_analysis().temp_size_in_bytes
      name = f'{impl} {block}' if block else impl
      print(f'layer{layer} {name:>13}: {cost["flops"] / 1e9:8.2f} GFLOP '
            f'{cost["bytes accessed"] / 1e9:7.3f} GB '
            f'({(cost["bytes accessed"] - aot.COPY_COUNT * copies) / 1e9:.3f} '
            f'without copies) temp {temp / 1e9:.3f} GB estimate '
            f'{cost.get("optimal_seconds", float("nan")) * 1e3:.3f} ms '
            f'compile {dt:.1f} s', flush=True)


if __name__ == '__main__':
  main()
