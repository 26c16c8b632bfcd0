r"""A floor under the bytes of the train step and of each of its parts, read
off their jaxprs (no compile, no TPU).

  python benchmarks/tpu_floor.py configs.mimicdet_r50_fpn_1x 2 [key=value ...]
      [--parts step,backbone,fpn,...] [--json OUT.json]

The model is mimicdet_jax/tools/floor.py's (docs/BENCHMARKS.md, "A floor
under the bytes"): every convolution and matmul reads its operands and
writes its result once; everything else is taken as fused for free; the
program's arguments are read once and its outputs written once. The
compiler's count (`plan_tpu`, `tpu_parts.py`) can only be above it.

Parts (the step's per-chip batch, `per_chip` images on one device; as
benchmarks/tpu_parts.py builds them): step (the shard_map train step over 4
devices, per device), backbone, fpn, refinement, forward, proposals, t_head,
s_head, losses, update. Prints one row per part: floor GB per step and per
image, and the share of each primitive kind.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top

from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import floor  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import plan_tpu  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_parts  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config_module')
  parser.add_argument('per_chip', type=int)
  parser.add_argument('--parts', default='step,' + ','.join(tpu_parts.PARTS))
  parser.add_argument('--json', default=None)
  parser.add_argument('overrides', nargs='*')
  args = parser.parse_args()
  # The step is traced over 4 CPU devices (jax reads the flag when its first
  # backend starts, below).
  if 'device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_force_host_platform_device_count=4')
  raw, num_classes = tpu_parts.load_config(args.config_module, args.overrides)
  devices = jax.devices('cpu')[:4]
  config = aot.resolve_for(raw, num_classes, args.per_chip)
  canvas = plan_tpu.pick_canvas(config, 'first')  # lsj: its one canvas
  wanted = args.parts.split(',')
  programs = {}
  if 'step' in wanted:
    step_config = aot.resolve_for(raw, num_classes,
                                  args.per_chip * len(devices))
    program = aot.train_step_program(step_config, devices, canvas)
    programs['step'] = (program.fn, program.args)
  programs.update(tpu_parts.build_parts(config, devices[0], canvas,
                                        args.per_chip))
  rows = {}
  gb = 1e9
  print(f'{args.config_module}, {args.per_chip} images per chip, canvas '
        f'{canvas[0]}x{canvas[1]}: floor GB per step (per chip) and per '
        f'image; share of the floor by kind')
  for name in wanted:
    if name not in programs:
      print(f'{name}: not in this config ({sorted(programs)})')
      continue
    row = floor.program_floor(*programs[name])
    rows[name] = row
    kinds = ', '.join(f'{k} {v / gb:.2f}' for k, v in sorted(
        row.items(), key=lambda kv: -kv[1]) if k != 'total' and v)
    print(f'{name:<11} {row["total"] / gb:7.2f} GB  '
          f'{row["total"] / gb / args.per_chip:6.2f} per image   ({kinds})',
          flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(config=args.config_module, per_chip=args.per_chip,
                     canvas=canvas, overrides=args.overrides, rows=rows),
                f, indent=1)


if __name__ == '__main__':
  main()
