"""A floor under the bytes a program moves: what any compiler that runs each
contraction (convolution, matmul) as its own kernel must move, read off the
program's jaxpr, with no compile and no TPU. `plan_tpu` prints it for the
step; benchmarks/tpu_floor.py for the step and each of its parts.

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
"""
import collections
import math

import jax
from jax import extend as jex

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


def _shard_bytes(x) -> int:
  """Bytes of one device's shard of abstract array `x` (all of it when it
  names no sharding)."""
  sharding = getattr(x, 'sharding', None)
  shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
  return math.prod(shape) * x.dtype.itemsize


def program_floor(fn, args) -> dict:
  """Floor of one jitted program at abstract `args` (ShapeDtypeStructs,
  with shardings where it runs on several devices), per device: its
  contractions and collectives, plus its arguments (each device's shard)
  read once and its outputs written once. {'total': bytes, and bytes by
  kind: 'dot_general', 'conv_general_dilated', a collective's name,
  'arguments', 'outputs'; '(while)': the part of them inside while bodies}."""
  traced = fn.trace(*args)
  closed = traced.jaxpr
  counts = floor_bytes(closed)
  counts['arguments'] = sum(_shard_bytes(x) for x in jax.tree.leaves(args))
  counts['outputs'] = sum(aval_bytes(v.aval) for v in closed.jaxpr.outvars)
  total = sum(v for k, v in counts.items() if k != '(while)')
  return dict(total=total, **counts)
