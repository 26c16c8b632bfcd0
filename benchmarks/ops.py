"""Times the numerical ops at detection sizes.

  JAX_PLATFORMS=cpu python benchmarks/ops.py --size cpu
  python benchmarks/ops.py --size full            # on a GPU/TPU

Sizes: `full` is the real workload: P2..P7 of an 800x1333 canvas, batch 2,
256 channels, 2000 boxes per image for RoIAlign, 5000 -> 2000 proposals for
NMS, 1000 boxes x 80 classes -> 100 detections for per-class NMS; RoIAlign
also at the T-head's 128 sampled RoIs per image, in both forms (gather and
einsum, `t_head.roi_align_impl`). `cpu` keeps
the spatial sizes and box counts but uses 32 channels (RoIAlign and the
deformable conv scale about linearly with channels). `small` is a smoke
test. Each op is jitted; the first call (compile + run) is reported apart
from the median of `--reps` timed calls.
"""
import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top
from mimicdet_jax import ops  # pylint: disable=g-import-not-at-top

SPEC = common.base_config()  # box.scale_clip, t_head.canonical_*

SIZES = {
    # canvas (h, w), batch, channels, RoI boxes per image, NMS inputs/outputs,
    # boxes of the per-class NMS at inference (x 80 classes -> 100)
    'full': dict(canvas=(800, 1333), batch=2, channels=256, rois=2000,
                 nms_in=5000, nms_out=2000, eval_boxes=1000),
    'cpu': dict(canvas=(800, 1333), batch=2, channels=32, rois=2000,
                nms_in=5000, nms_out=2000, eval_boxes=1000),
    'small': dict(canvas=(256, 384), batch=2, channels=16, rois=200,
                  nms_in=500, nms_out=200, eval_boxes=100),
    # configs/demo.py: 256x256 canvas, 32 FPN channels, batch 4, 64 T-head
    # samples per image, 300 proposals.
    'demo': dict(canvas=(256, 256), batch=4, channels=32, rois=64,
                 nms_in=1500, nms_out=300, eval_boxes=300),
}


def _timeit(fn, args, reps):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def _random_boxes(rng, shape, canvas):
  h, w = canvas
  size = np.exp(rng.uniform(np.log(8), np.log(600), shape + (2,)))
  centre = rng.uniform(0, 1, shape + (2,)) * [w, h]
  boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
  return jnp.asarray(boxes, jnp.float32)


def _level_hw(canvas, level):
  return tuple(math.ceil(s / 2 ** level) for s in canvas)


def bench(size: str, reps: int, which, skip_roi_align=()):
  cfg = SIZES[size]
  rng = np.random.default_rng(0)
  b, c, canvas = cfg['batch'], cfg['channels'], cfg['canvas']
  rows = []

  def record(name, shapes, fn, args):
    first, median = _timeit(fn, args, reps)
    rows.append(dict(op=name, shapes=shapes, first_call_s=round(first, 3),
                     median_ms=round(1e3 * median, 2)))
    print(f'{name:40s} {shapes:60s} first {first:7.2f} s  '
          f'median {1e3 * median:9.2f} ms', flush=True)

  if 'boxes' in which:
    boxes = _random_boxes(rng, (b, cfg['rois']), canvas)
    gt = _random_boxes(rng, (b, 100), canvas)
    record('box_iou', f'[{b},{cfg["rois"]},4]x[{b},100,4]',
           jax.jit(ops.box_iou), (boxes, gt))
    stds = (0.1, 0.1, 0.2, 0.2)
    coder = jax.jit(lambda x, r: ops.decode_deltas(
        ops.encode_deltas(x, r, stds), r, stds,
        scale_clip=SPEC.box.scale_clip))
    record('encode+decode_deltas', f'[{b},{cfg["rois"]},4]', coder,
           (boxes, boxes[:, ::-1]))

  if 'nms' in which:
    n, k = cfg['nms_in'], cfg['nms_out']
    boxes = _random_boxes(rng, (b, n), canvas)
    scores = jnp.asarray(rng.uniform(size=(b, n)), jnp.float32)
    fn = jax.jit(jax.vmap(lambda x, s: ops.nms(x, s, 0.8, k)))
    record('nms (vmap, iou 0.8)', f'[{b},{n}] -> {k}', fn, (boxes, scores))
    # Inference: every (box, class) pair of the top boxes is a candidate;
    # scores ~U(0, 0.05) so that ~90 % pass the 0.005 threshold.
    nb = cfg['eval_boxes']
    n = nb * 80
    boxes = jnp.repeat(_random_boxes(rng, (b, nb), canvas), 80, axis=1)
    scores = jnp.asarray(rng.uniform(0, 0.05, (b, n)), jnp.float32)
    classes = jnp.tile(jnp.arange(1, 81, dtype=jnp.int32), (b, nb))
    fn = jax.jit(jax.vmap(lambda x, s, l: ops.batched_nms(
        x, s, l, 0.6, 100, valid=s >= 0.005)))
    record('batched_nms (80 classes, iou 0.6)', f'[{b},{nb}x80] -> 100', fn,
           (boxes, scores, classes))

  if 'roi_align' in which:
    levels = (2, 3, 4, 5, 6)
    maps = {l: jnp.asarray(rng.normal(size=(b,) + _level_hw(canvas, l) + (c,)),
                           jnp.float32) for l in levels}
    # The configured count (proposals at inference) and the T-head's 128
    # sampled RoIs per image in training; both forms (t_head.roi_align_impl).
    for n in sorted({cfg['rois'], 128}, reverse=True):
      boxes = _random_boxes(rng, (b, n), canvas)
      shapes = f'P2..P6 C={c}, [{b},{n}] boxes -> 7x7'
      for impl, align in (('gather', ops.multilevel_roi_align),
                          ('einsum', ops.multilevel_roi_align_einsum)):
        if impl in skip_roi_align:
          continue
        rule = dict(canonical_size=SPEC.t_head.canonical_size,
                    canonical_level=SPEC.t_head.canonical_level)
        fwd = jax.jit(lambda m, x, align=align: align(m, x, levels, (7, 7), 2,
                                                      **rule))
        record(f'multilevel_roi_align {impl} fwd', shapes, fwd, (maps, boxes))
        grad = jax.jit(jax.grad(lambda m, x, align=align: jnp.sum(
            align(m, x, levels, (7, 7), 2, **rule) ** 2)))
        record(f'multilevel_roi_align {impl} fwd+bwd', shapes, grad,
               (maps, boxes))

  if 'deform_conv' in which:
    for level, k in ((3, 3), (4, 5), (5, 5), (6, 5), (7, 5)):
      hw = _level_hw(canvas, level)
      x = jnp.asarray(rng.normal(size=(b,) + hw + (c,)), jnp.float32)
      offset = jnp.asarray(rng.normal(0, 2, (b,) + hw + (2 * k * k,)),
                           jnp.float32)
      kernel = jnp.asarray(rng.normal(0, 0.05, (k, k, c, c)), jnp.float32)
      shapes = f'P{level} [{b},{hw[0]},{hw[1]},{c}] k={k} -> {c}'
      fwd = jax.jit(lambda x, o, w, k=k: ops.deform_conv2d(
          x, o, w, padding=k // 2))
      record('deform_conv2d fwd', shapes, fwd, (x, offset, kernel))
      grad = jax.jit(jax.grad(lambda x, o, w, k=k: jnp.sum(ops.deform_conv2d(
          x, o, w, padding=k // 2) ** 2), argnums=(0, 1, 2)))
      record('deform_conv2d fwd+bwd', shapes, grad, (x, offset, kernel))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='cpu')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--ops', default='boxes,nms,roi_align,deform_conv',
                      help='comma-separated subset')
  parser.add_argument('--json', default='', help='write the rows here')
  parser.add_argument('--skip_roi_align', default='',
                      help='comma-separated RoIAlign forms not to time '
                      '(gather, einsum)')
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f'device: {device.platform} {device.device_kind} '
        f'({jax.device_count()} devices); jax {jax.__version__}; '
        f'size {args.size}: {SIZES[args.size]}; reps {args.reps}', flush=True)
  rows = bench(args.size, args.reps, set(args.ops.split(',')),
               set(filter(None, args.skip_roi_align.split(','))))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(device=str(device.device_kind), size=args.size,
                     config=SIZES[args.size], rows=rows), f, indent=1)


if __name__ == '__main__':
  main()
