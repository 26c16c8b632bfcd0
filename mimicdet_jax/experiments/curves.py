r"""S-head and T-head AP against training steps, from a run's checkpoints.

  python -m mimicdet_jax.experiments.curves --out PNG RUN_DIR [RUN_DIR ...] \
      [--label NAME ...]

Every checkpoint a run kept (WORKDIR/checkpoints/<step>) is scored twice on
the validation split of the run's own config (WORKDIR/config.json): the
S-head (eval.head=s, the detector) and the T-head (eval.head=t, its teacher),
with `evaluate_lib.evaluate`. The numbers go to RUN_DIR/curve.json ({step: {s_AP,
t_AP, s_AP50, t_AP50}}, reused on the next call) and one PNG plots AP against
steps (solid S-head, dashed T-head) and S AP / T AP against steps, one colour
per label (runs that share a label are averaged at their common steps, each
seed drawn thin).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

CURVE_FILE = 'curve.json'


def score_checkpoints(run_dir: str) -> dict:
  """{step: {s_AP, s_AP50, t_AP, t_AP50}} for every checkpoint of run_dir."""
  from mimicdet_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, CURVE_FILE)
  curve = {}
  if os.path.exists(path):
    with open(path) as f:
      curve = {int(k): v for k, v in json.load(f).items()}
  for step in restore.checkpoint_steps(run_dir):
    if step in curve:
      continue
    variables, _ = restore.restore_variables(run_dir, str(step))
    row = {}
    for head in ('s', 't'):
      with open(os.path.join(run_dir, 'config.json')) as f:
        recipe = json.load(f)
      recipe['eval']['head'] = head
      config = restore.load_config(run_dir, recipe)
      metrics = evaluate_lib.evaluate(
          config, variables, run_dir, step, viz=0,
          out_dir=os.path.join(run_dir, 'curve', f'{step}_{head}'))
      for key in ('AP', 'AP50'):
        row[f'{head}_{key}'] = float(metrics[key])
    curve[step] = row
    with open(path, 'w') as f:
      json.dump({str(k): v for k, v in sorted(curve.items())}, f, indent=1)
  return curve


def plot(curves: Mapping[str, Sequence[Mapping[int, Mapping[str, float]]]],
         path: str, title: str = '') -> None:
  """curves: {label: [curve of each run]} -> PNG of AP (%) against steps
  (left) and of the S-head's AP over the T-head's (right, with the 0.8
  and 0.9 lines)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = plt.get_cmap('tab10')
  for i, (label, runs) in enumerate(curves.items()):
    color = colors(i % 10)
    common = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    for head, style in (('s', '-'), ('t', '--')):
      key = f'{head}_AP'
      for run in runs:
        steps = sorted(run)
        ax.plot(steps, [100 * run[s][key] for s in steps], style, color=color,
                alpha=0.25, linewidth=0.8)
      if common:
        mean = [100 * np.mean([r[s][key] for r in runs]) for s in common]
        name = 'S-head' if head == 's' else 'T-head'
        ax.plot(common, mean, style, color=color, linewidth=2, marker='o',
                label=f'{label}: {name} (mean of {len(runs)})')
    ratio = lambda run, s: run[s]['s_AP'] / max(run[s]['t_AP'], 1e-9)
    for run in runs:
      steps = sorted(run)
      ratio_ax.plot(steps, [ratio(run, s) for s in steps], color=color,
                    alpha=0.25, linewidth=0.8)
    if common:
      ratio_ax.plot(common, [np.mean([ratio(r, s) for r in runs])
                             for s in common],
                    color=color, linewidth=2, marker='o', label=label)
  for line, style in ((0.8, '--'), (0.9, ':')):
    ratio_ax.axhline(line, color='k', linewidth=0.8, linestyle=style)
  ax.set_ylabel('COCO AP (%)')
  ratio_ax.set_ylabel('S-head AP / T-head AP')
  for a in (ax, ratio_ax):
    a.set_xlabel('training step')
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='training workdirs')
  parser.add_argument('--label', action='append', default=[],
                      help='one per run (default: the run folder\'s parent)')
  parser.add_argument('--out', required=True, help='PNG to write')
  parser.add_argument('--title', default='', help='the figure\'s title')
  args = parser.parse_args(argv)
  if args.label and len(args.label) != len(args.runs):
    parser.error('give one --label per run, or none')
  labels = args.label or [os.path.basename(os.path.dirname(
      os.path.abspath(r))) for r in args.runs]
  curves: dict[str, list] = {}
  for run, label in zip(args.runs, labels):
    curves.setdefault(label, []).append(score_checkpoints(run))
  plot(curves, args.out, args.title)
  for label, runs in curves.items():
    for run in runs:
      print(label, {s: {k: round(v, 3) for k, v in r.items()}
                    for s, r in sorted(run.items())})
  print(f'written: {args.out}')
  return curves


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
