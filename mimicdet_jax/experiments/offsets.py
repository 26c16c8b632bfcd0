r"""Do the S-head's deformable taps follow the refined box? A diagnostic.

  python -m mimicdet_jax.experiments.offsets --workdir DIR [--images 32]

Restores DIR's latest checkpoint (config from DIR/config.json), runs the
network on the first validation images and, at the positions inference reads
(`postprocess.inference_positions`), compares
the offsets the S-head's deformable convs use with `box_aligned_offsets`,
the offsets that would put the k x k taps on the bins of the refined box
there. Prints and returns, per kernel (P3's and the shared P4..P7 one), in
cells of the level, averaged over taps and positions:

  used:     |offset used|        (0 = an ordinary convolution)
  box:      |box-aligned offset| (how far the box's bins lie from the grid)
  gap:      |used - box-aligned|
  aligned:  1 - gap / box        (1 = taps on the box's bins, 0 = no closer
                                  than the regular grid, < 0 = further)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import restore
from mimicdet_jax.data import pipeline
from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.models import heads
from mimicdet_jax.models import mimicdet


def offset_alignment(config, variables, images: np.ndarray,
                     image_size: np.ndarray) -> dict[str, dict[str, float]]:
  """The module docstring's numbers for one batch, per S-head kernel."""
  model = mimicdet.MimicDet(config)
  levels = tuple(config.model.s_levels)
  canvas = images.shape[1:3]
  out, inter = model.apply(variables, jnp.asarray(images), train=False,
                           mutable=['intermediates'])
  anchors = anchors_lib.dense_anchors(canvas, levels, config.model.anchor_scale)
  idx, _ = postprocess.inference_positions(
      out['refine_logits'], anchors['boxes'], jnp.asarray(image_size), config)
  idx = np.asarray(idx)
  s_inter = inter['intermediates']['s_head_net']
  finest = min(levels)
  result = {}
  for name in (f'p{finest}_conv', 'coarse_conv'):
    used_per_level = s_inter[name]['offsets']  # one entry per call (level)
    conv_levels = [finest] if name.startswith('p') else [l for l in levels
                                                         if l != finest]
    k = config.s_head.p3_kernel if name.startswith('p') else config.s_head.kernel
    sums = np.zeros(3)
    count = 0
    for level, used in zip(conv_levels, used_per_level):
      start = int(np.flatnonzero(anchors['level'] == level)[0])
      h, w = used.shape[1:3]
      deltas = out['refine_deltas'][:, start:start + h * w].reshape(
          used.shape[0], h, w, 4)
      box = heads.box_aligned_offsets(deltas, k, config.model.anchor_scale,
                                      tuple(config.refine.stds),
                                      config.box.scale_clip)
      used = np.asarray(used).reshape(used.shape[0], h * w, k * k, 2)
      box = np.asarray(box).reshape(used.shape)
      for b in range(used.shape[0]):
        sel = idx[b][(idx[b] >= start) & (idx[b] < start + h * w)] - start
        if sel.size == 0:
          continue
        u, x = used[b, sel], box[b, sel]
        sums += [np.linalg.norm(u, axis=-1).sum(),
                 np.linalg.norm(x, axis=-1).sum(),
                 np.linalg.norm(u - x, axis=-1).sum()]
        count += sel.size * k * k
    used_m, box_m, gap_m = sums / max(count, 1)
    result[name] = dict(used=float(used_m), box=float(box_m),
                        gap=float(gap_m),
                        aligned=float(1.0 - gap_m / max(box_m, 1e-9)),
                        taps=int(count))
  return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--images', type=int, default=32)
  args = parser.parse_args(argv)
  config = restore.load_config(args.workdir)
  variables, step = restore.restore_variables(args.workdir, 'latest')
  source = pipeline.build_source(config.data, 'val')
  batch = next(pipeline.make_eval_batches(config, source, args.images))
  result = offset_alignment(config, variables, batch['image'],
                            batch['image_size'])
  result = dict(step=step, workdir=args.workdir, **result)
  print(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
