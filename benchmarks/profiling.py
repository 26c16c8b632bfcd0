"""Reading a jax.profiler trace back: XLA op events, per-op sums, HLO names.

The flag-free part of benchmarks/profile_step.py (importable from tests and
other scripts without defining absl flags).
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

import jax


_SUFFIX = re.compile(r'\.\d+$')


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, JAX op_name) from compiled HLO text.

  A fusion has no op_name of its own: it gets the first one found in the
  computation it calls.
  """
  defs: dict[str, tuple[str, str]] = {}  # name -> (shape, line)
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r'%?([\w.\-]+) .*\{\s*$', line)
    if head and not line.startswith(' '):
      current = head.group(1)
      bodies[current] = []
      continue
    inst = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+)', line)
    if inst:
      defs.setdefault(inst.group(1), (inst.group(2), line))
      if current is not None:
        bodies[current].append(line)
  out = {}
  for name, (shape, line) in defs.items():
    meta = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r'calls=%?([\w.\-]+)', line)
    if not meta and called:
      for body_line in bodies.get(called.group(1), ()):
        meta = re.search(r'op_name="([^"]*)"', body_line)
        if meta:
          break
    out[name] = (shape, meta.group(1) if meta else '')
  return out


def op_events(profile: 'jax.profiler.ProfileData'
              ) -> list[tuple[str, int, int]]:
  """(op name, start ns, duration ns) of every XLA op event in the trace.

  XLA:CPU: events on the '/host:CPU' plane's tf_XLA* worker-thread lines,
  without the executor's own ThunkExecutor spans; GPU/TPU: the device
  planes' 'XLA Ops' lines.
  """
  events = []
  for plane in profile.planes:
    for line in plane.lines:
      on_cpu = plane.name == '/host:CPU' and line.name.startswith('tf_XLA')
      on_device = plane.name.startswith('/device:') and line.name == 'XLA Ops'
      if not (on_cpu or on_device):
        continue
      for ev in line.events:
        if ev.name.startswith(('ThunkExecutor', 'ThreadpoolListener',
                               'SlinkyThreadPool', 'end: ')):
          continue
        events.append((ev.name, int(ev.start_ns), int(ev.duration_ns)))
  return events


def summarize(events: Iterable[tuple[str, int, int]], steps: int) -> dict:
  """Per-step totals: by op, by op kind, the summed and the covered time.

  covered = the length of the union of the event intervals (wall time in
  which some op ran), span = first start to last end; all in ms per step.
  """
  events = list(events)
  by_op = collections.Counter()
  by_kind = collections.Counter()
  for name, _, dur in events:
    by_op[name] += dur / 1e6 / steps
    by_kind[_SUFFIX.sub('', name)] += dur / 1e6 / steps
  intervals = sorted((start, start + dur) for _, start, dur in events)
  covered = 0
  if intervals:
    lo, hi = intervals[0]
    for start, end in intervals[1:]:
      if start > hi:
        covered += hi - lo
        lo, hi = start, end
      else:
        hi = max(hi, end)
    covered += hi - lo
  span = (max(e for _, e in intervals) - intervals[0][0]) if intervals else 0
  return dict(by_op=by_op, by_kind=by_kind,
              summed_ms=sum(by_op.values()), covered_ms=covered / 1e6 / steps,
              span_ms=span / 1e6 / steps, events_per_step=len(events) / steps)


# Where a step's op sits, from its JAX source op (HLO op_name).
# The pass: 'backward' for an op of a transposed (reverse-mode) jvp,
# 'forward' for one inside the differentiated loss, 'outside' for the rest
# (targets computed before the loss, optimizer, metrics, input copies),
# 'other' for ops XLA made itself (no op_name).
# The part: the model's first sub-module after the model call (backbone,
# fpn, refinement, s_head_net, t_head_net); 'loss and targets' inside the
# loss but outside the model (proposals' NMS, sampling, losses).
_MODEL_CALL = re.compile(r'MimicDet(?:\.\w+)?\)*$')


def op_group(source: str) -> tuple[str, str]:
  """(pass, part) of one op's JAX source op name."""
  if not source:
    return 'other', '(no op_name)'
  parts = source.split('/')
  if any(p.startswith('transpose(') for p in parts):
    pass_ = 'backward'
  elif any(p.startswith('jvp(') for p in parts):
    pass_ = 'forward'
  else:
    return 'outside', 'targets, optimizer, rest'
  for i, p in enumerate(parts):
    if _MODEL_CALL.search(p):
      modules = [q for q in parts[i + 1:-1] if '(' not in q]
      return pass_, modules[0] if modules else '(model top level)'
  return pass_, 'loss and targets'


def by_group(summary: dict, names: dict[str, tuple[str, str]]
             ) -> collections.Counter:
  """ms per step summed per (pass, part) of op_group, over every op."""
  out = collections.Counter()
  for name, ms in summary['by_op'].items():
    out[op_group(names.get(name, ('', ''))[1])] += ms
  return out
