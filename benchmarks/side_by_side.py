"""Variants of the training step side by side, each in a fresh process.

The runner that benchmarks/cpu_xla_flags.py (XLA options),
benchmarks/cpu_malloc.py (glibc malloc settings) and benchmarks/demo_cost.py
(cheaper demo recipes) share: each variant runs
`benchmarks/train_step.py` in its own process (XLA_FLAGS are read once, when
the backend starts; a recipe change recompiles), and the baseline runs first
and again last so that drift of a shared machine shows in the table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Mapping, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))


def child_env(xla_flags: str = '',
              env: Optional[Mapping[str, Optional[str]]] = None
              ) -> dict[str, str]:
  """This process's environment for a CPU child: xla_flags appended to the
  inherited XLA_FLAGS, then env's variables set (None removes one)."""
  out = dict(os.environ, JAX_PLATFORMS='cpu')
  out['XLA_FLAGS'] = (out.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
  for key, value in (env or {}).items():
    if value is None:
      out.pop(key, None)
    else:
      out[key] = value
  return out


def train_step(config: str, *, batch: int, steps: int, warmup: int,
               extra_args: Sequence[str] = (), xla_flags: str = '',
               env: Optional[Mapping[str, Optional[str]]] = None) -> dict:
  """benchmarks/train_step.py's JSON result, or {'error': its last lines},
  run in child_env(xla_flags, env)."""
  with tempfile.NamedTemporaryFile(suffix='.json') as f:
    cmd = [sys.executable, os.path.join(_HERE, 'train_step.py'),
           '--config', config, '--batch', str(batch), '--steps', str(steps),
           '--warmup', str(warmup), '--json', f.name, *extra_args]
    p = subprocess.run(cmd, env=child_env(xla_flags, env),
                       capture_output=True, text=True, check=False)
    if p.returncode:
      tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
      return dict(error=' | '.join(tail))
    with open(f.name) as g:
      return json.load(g)


def run_all(names: Sequence[str], known: Sequence[str],
            run_one: Callable[[str], dict]) -> list[dict]:
  """run_one(name) for 'base', every other name, then 'base' again.

  Exits with a one-line message naming the unknown variants, if any.
  """
  unknown = sorted(set(names) - set(known))
  if unknown:
    sys.exit(f'unknown variants: {unknown}; known: {sorted(known)}')
  rows = []
  for name in ['base'] + [n for n in names if n != 'base'] + ['base']:
    rows.append(dict(name=name, **run_one(name)))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def arg_parser(doc: str, variants: Sequence[str]) -> argparse.ArgumentParser:
  """--config, --steps, --warmup, --variants (default: all), --json."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument('--config', default='configs/demo.py')
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--variants', default=','.join(variants))
  ap.add_argument('--json', default=None, help='also write the rows here')
  return ap


def variant_names(args: argparse.Namespace) -> list[str]:
  return [n for n in args.variants.split(',') if n]


def save(path: str | None, rows: Sequence[dict]) -> None:
  if path:
    with open(path, 'w') as f:
      json.dump(list(rows), f, indent=1)


def print_table(columns: Sequence[str], rows: Sequence[dict],
                cells: Callable[[dict, float], list[str]]) -> None:
  """A Markdown table of run_all's rows: the variant's name, then
  cells(row, first baseline's step_s); a failed run shows its error."""
  base = rows[0].get('step_s')
  print('\n| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))
  for r in rows:
    rest = ([f"failed: {r['error'][:80]}"] + [''] * (len(columns) - 2)
            if 'error' in r else cells(r, base))
    print('| ' + ' | '.join([r['name'], *rest]) + ' |')
