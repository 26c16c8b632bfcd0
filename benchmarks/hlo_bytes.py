r"""Where the bytes of a compiled step go, read from its optimized HLO text.

  python benchmarks/hlo_bytes.py STEP.opt.txt [--depth 2] [--top 25]
      [--instructions N] [--kinds copy,slice,pad]

For every instruction outside fused computations (the entry computation, while
bodies and conditions, called computations), the bytes it touches are its
output plus its whole operands (XLA's cost analysis counts only what a fusion
reads of an operand, so this is an upper bound per instruction); an instruction inside a while body is counted once, not per trip
(the text has no trip counts), as the compiler's own cost analysis does.
Bytes are attributed to the JAX name stack of the instruction's metadata
(op_name), cut to `--depth` Flax module names, and to the op kind.
`--instructions N` also lists the N instructions that touch the most bytes
(of the op kinds in `--kinds`, all by default): kind, result shape, bytes and
op_name, to tie a kind's total to the layers that make it.
"""
import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top

_SHAPE = re.compile(r'\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64)\[([0-9,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^)]*\))?.*\{\s*$')


def shape_bytes(text: str) -> float:
  """Bytes of every array shape written in `text`."""
  return sum(aot.array_bytes(dtype, dims)
             for dtype, dims in _SHAPE.findall(text))


def parse(path: str):
  """Yields (computation, instruction name, result text, op kind, operand
  text, op_name, attributes) for every instruction."""
  comp = None
  with open(path) as f:
    for line in f:
      if line.rstrip().endswith('{') and not line[:1].isspace():
        m = _COMP.match(line)
        comp = m.group(1) if m else comp
        continue
      m = _INSTR.match(line)
      if not m or comp is None:
        continue
      name, rest = m.groups()
      # "<shape> <kind>(<operands>), attrs"
      km = re.match(r'(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$', rest)
      if not km:
        continue
      result, kind, tail = km.groups()
      depth, i = 1, 0
      while i < len(tail) and depth:
        depth += {'(': 1, ')': -1}.get(tail[i], 0)
        i += 1
      operands, attrs = tail[:i - 1], tail[i:]
      op = re.search(r'op_name="([^"]*)"', attrs)
      yield comp, name, result, kind, operands, op.group(1) if op else '', attrs


def attribute(op_name: str, depth: int) -> str:
  """'jit(f)/jvp(MimicDet)/backbone/layer1_0/conv1/conv' -> 'backbone/layer1_0'."""
  parts = [p for p in op_name.split('/') if p]
  names = []
  for p in parts:
    inner = re.sub(r'^(\w+\()+', '', p).rstrip(')')
    if re.match(r'^(jit|pjit|shard_map|jvp|transpose|vmap|remat|checkpoint|'
                r'while|body|cond|scan|rematted_computation|_where|main)$', inner):
      continue
    if p.startswith(('jit(', 'pjit(')) and '(' in p:
      continue
    names.append(inner)
  return '/'.join(names[:depth]) or '(none)'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('hlo')
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--instructions', type=int, default=0)
  parser.add_argument('--kinds', default='')
  args = parser.parse_args()
  rows = list(parse(args.hlo))
  fused = set()
  loops = set()
  for _, _, _, kind, _, _, attrs in rows:
    for key in ('calls', 'to_apply', 'scatter', 'select'):
      for m in re.finditer(key + r'=%?([\w.\-]+)', attrs):
        fused.add(m.group(1))
    for key in ('body', 'condition'):
      for m in re.finditer(key + r'=%?([\w.\-]+)', attrs):
        loops.add(m.group(1))
  size = {name: shape_bytes(result) for _, name, result, *_ in rows}
  by_scope = collections.Counter()
  by_kind = collections.Counter()
  in_loops = 0.0
  total = 0.0
  listed = []
  kinds = set(filter(None, args.kinds.split(',')))
  skip = ('parameter', 'tuple', 'get-tuple-element', 'constant', 'bitcast',
          'after-all', 'partition-id', 'replica-id')
  for comp, name, result, kind, operands, op_name, attrs in rows:
    if comp in fused or kind in skip:
      continue
    if kind == 'while' or kind == 'conditional' or kind == 'call':
      continue  # their bodies are counted instruction by instruction
    b = size[name] + sum(size.get(o, 0.0) for o in
                         re.findall(r'%([\w.\-]+)', operands))
    total += b
    if comp in loops:
      in_loops += b
    fusion_kind = re.search(r'kind=(k\w+)', attrs)
    label = kind + (f'/{fusion_kind.group(1)}' if fusion_kind else '')
    by_scope[attribute(op_name, args.depth)] += b
    by_kind[label] += b
    if not kinds or kind in kinds or label in kinds:
      listed.append((b, label, result, op_name))
  print(f'total {total / 1e9:.2f} GB over {len(rows)} instructions; '
        f'{in_loops / 1e9:.2f} GB in while bodies (counted once)')
  for title, counter in (('by name scope', by_scope), ('by op kind', by_kind)):
    print(f'\n{title}:')
    for key, b in counter.most_common(args.top):
      print(f'  {b / 1e9:8.3f} GB {100 * b / total:5.1f} %  {key}')
  if args.instructions:
    print(f'\nthe {args.instructions} instructions that touch the most bytes:')
    for b, label, result, op_name in sorted(listed, key=lambda r: -r[0])[
        :args.instructions]:
      shape = re.sub(r'\{[^}]*\}', '', result)[:60]
      print(f'  {b / 1e6:8.1f} MB  {label:<16} {shape:<60} {op_name[-90:]}')


if __name__ == '__main__':
  main()
