r"""A floor under the bytes of the train step: what any compiler that runs
each contraction (convolution, matmul) as its own kernel must move, read
off the step's jaxpr, with no compile and no TPU.

  python benchmarks/tpu_floor.py configs.mimicdet_r50_fpn_1x 2 [key=value ...]
      [--parts step,backbone,fpn,...] [--json OUT.json]

The model (docs/BENCHMARKS.md, "A floor under the bytes"):
- every `conv_general_dilated` and `dot_general` reads each operand once and
  writes its result once, at the dtypes of the jaxpr (bfloat16 activations
  stay bfloat16);
- every other op is free: elementwise work, normalisation, activations,
  gathers, scatters, transposes, reductions and the losses are taken to fuse
  into the contractions next to them, and arrays never round-trip HBM
  between them;
- the program's arguments are read once and its outputs written once (the
  parameters, both AdamW moments, the batch), and a collective reads and
  writes its operand once.
A real program also reads what elementwise work needs beside the
contraction's operand (a ReLU's mask in the backward, BatchNorm's saved
statistics), materialises gathers, and moves arrays between memory spaces:
so the compiler's count (`plan_tpu`, `tpu_parts.py`) can only be above this
floor, and the ratio of the two says how much room a part has left.

Loops: a `scan` body counts `length` times; a `while` body counts once (its
trips depend on data: the NMS loops), as XLA's cost analysis counts it; the
bytes inside while bodies are printed apart. `cond` counts its largest
branch. Platform-independent: the same jaxpr is lowered for every backend.

Parts (the step's per-chip batch, `per_chip` images on one device; as
benchmarks/tpu_parts.py builds them): step (the shard_map train step over 4
devices, per device), backbone, fpn, refinement, forward, proposals, t_head,
s_head, losses, update. Prints one row per part: floor GB per step and per
image, and the share of each primitive kind.
"""
import argparse
import collections
import importlib
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
from jax import extend as jex  # pylint: disable=g-import-not-at-top

from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import plan_tpu  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_parts  # pylint: disable=g-import-not-at-top

CONTRACTIONS = ('conv_general_dilated', 'dot_general')
# Primitive names start so (psum, psum_invariant, psum_scatter, ...).
COLLECTIVES = ('psum', 'all_gather', 'all_to_all', 'pmax', 'pmin',
               'ppermute', 'reduce_scatter')


def aval_bytes(aval) -> int:
  shape = getattr(aval, 'shape', None)
  dtype = getattr(aval, 'dtype', None)
  if shape is None or dtype is None:
    return 0
  return math.prod(shape) * dtype.itemsize


def _sub_jaxprs(eqn):
  """(jaxpr, multiplier, kind) for each sub-jaxpr of `eqn` that runs: a
  scan body `length` times, a while body once ('while'), a cond's largest
  branch (chosen by the caller), anything else once."""
  name = eqn.primitive.name
  params = eqn.params
  if name == 'scan':
    return [(params['jaxpr'], params['length'], None)]
  if name == 'while':
    return [(params['body_jaxpr'], 1, 'while'),
            (params['cond_jaxpr'], 1, 'while')]
  if name == 'cond':
    return [('cond', params['branches'], None)]
  found = []
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, (jex.core.Jaxpr, jex.core.ClosedJaxpr)):
        found.append((v, 1, None))
  return found


def floor_bytes(jaxpr, counts=None, in_while=False, mult=1):
  """Adds the floor bytes of `jaxpr`'s contractions and collectives to
  `counts` ({primitive: bytes}; '(while)' gets those inside while bodies).
  Returns `counts`."""
  counts = collections.Counter() if counts is None else counts
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in CONTRACTIONS or name.startswith(COLLECTIVES):
      moved = (sum(aval_bytes(v.aval) for v in eqn.invars) +
               sum(aval_bytes(v.aval) for v in eqn.outvars)) * mult
      counts[name] += moved
      if in_while:
        counts['(while)'] += moved
      continue
    for sub, times, kind in _sub_jaxprs(eqn):
      if sub == 'cond':
        options = [floor_bytes(branch, None, in_while, mult)
                   for branch in times]
        counts.update(max(options, key=lambda c: sum(
            v for k, v in c.items() if k != '(while)')))
        continue
      floor_bytes(sub, counts, in_while or kind == 'while', mult * times)
  return counts


def program_floor(fn, args) -> dict:
  """Floor of one jitted program at abstract `args`: its contractions and
  collectives, plus its arguments read once and its outputs written once."""
  traced = fn.trace(*args)
  closed = traced.jaxpr
  counts = floor_bytes(closed)
  counts['arguments'] = sum(aval_bytes(v.aval) for v in closed.jaxpr.invars)
  counts['outputs'] = sum(aval_bytes(v.aval) for v in closed.jaxpr.outvars)
  total = sum(v for k, v in counts.items() if k != '(while)')
  return dict(total=total, **counts)


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
  raw = importlib.import_module(args.config_module).get_config()
  for override in args.overrides:
    key, value = override.split('=', 1)
    config_lib.set_key(raw, key, config_lib.parse_value(
        value, config_lib.get_key(raw, key)))
  num_classes = 80 if raw.data.num_classes == -1 else raw.data.num_classes
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
    row = program_floor(*programs[name])
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
