r"""Inference-time variants scored on the same checkpoints, paired by seed.

  python -m mimicdet_jax.experiments.eval_variants --workdir DIR \
      --settings eval.weights=raw,eval.weights=ema,eval.weights=raw+eval.tta=hflip \
      [--reference eval.weights=raw] [--head s] [--checkpoint latest] \
      [--runs VARIANT/seed0,...]

What does EMA, flip TTA or soft-NMS bring? None of them changes training,
so each finished run of an ablation grid (`experiments/ablate.py`: DIR/
<variant>/seed<k> with run.json status "done") is scored once per setting,
and the settings are compared on the same checkpoints: the pairing removes
the seed-to-seed spread of training from the difference. A setting is
`key=value` eval overrides joined by '+' (as ablate's grid entries; keys of
`eval.*` only, since the checkpoints are fixed). Each score is written to
RUN/eval_variants/<setting>/metrics.json (a rerun scores only what is
missing), and DIR/eval_variants.json and .md hold the table: per setting
the mean and spread over runs of AP / AP50 of `--head`, and its paired
difference to `--reference` with a t interval (`report.paired_difference`).
"""
import argparse
import json
import os
from typing import Any, Optional, Sequence

from mimicdet_jax import errors
from mimicdet_jax.experiments import ablate
from mimicdet_jax.experiments import report

KEYS = ('AP', 'AP50', 'AP75')


def parse_setting(spec: str) -> dict[str, Any]:
  """'eval.weights=raw+eval.tta=hflip' -> {'eval.weights': 'raw', ...}.

  Raises:
    ConfigError: an entry that is not key=value, or a key outside eval.*.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  for part in spec.split('+'):
    if not part.strip().startswith('eval.'):
      raise errors.ConfigError(
          f'--settings {spec!r}: {part!r} is not an eval.* key=value (the '
          'checkpoints are fixed; train variants with experiments/ablate.py)')
  return ablate.variant_overrides(spec, common.base_config())


def finished_runs(workdir: str) -> list[str]:
  """RUN folders (relative to `workdir`) whose run.json says done."""
  runs = []
  for variant in sorted(os.listdir(workdir)):
    vdir = os.path.join(workdir, variant)
    if not os.path.isdir(vdir):
      continue
    for seed in sorted(os.listdir(vdir)):
      info = ablate.read_json(os.path.join(vdir, seed, 'run.json'))
      if info and info.get('status') == 'done':
        runs.append(f'{variant}/{seed}')
  return runs


def score(run_dir: str, overrides: dict[str, Any], head: str,
          checkpoint: str, out_dir: str) -> dict[str, float]:
  """Scores one checkpoint of `run_dir` under `overrides` (its own config
  otherwise), writing OUT_DIR/metrics.json."""
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = restore.load_config(run_dir, head=head)
  raw = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    config_lib.set_key(raw, key, value)
  config = restore.resolve_config(raw, run_dir)
  variables, step, used = restore.restore_checkpoint(
      run_dir, checkpoint, config.eval.weights)
  if used != config.eval.weights:
    raise errors.ConfigError(
        f'{run_dir}: asked for the {config.eval.weights} weights, the '
        f'checkpoint has only {used} (train with optim.ema_decay > 0)')
  metrics = evaluate_lib.evaluate(config, variables, run_dir, step, viz=0,
                                  out_dir=out_dir, weights=used)
  return {k: float(metrics[k]) for k in KEYS}


def setting_dirname(spec: str) -> str:
  return ablate.variant_dirname(spec)


def summarize(scores: dict[str, dict[str, dict[str, float]]],
              settings: Sequence[str], reference: str) -> dict[str, Any]:
  """{setting: {key: spread, key_vs_ref: paired difference}} over runs."""
  out = {}
  for setting in settings:
    row = {}
    for key in KEYS[:2]:
      values = {run: s[setting][key] for run, s in scores.items()
                if setting in s}
      ref = {run: s[reference][key] for run, s in scores.items()
             if reference in s}
      row[key] = report.spread(list(values.values()))
      row[f'{key}_vs_reference'] = report.paired_difference(values, ref)
    out[setting] = row
  return out


def format_table(summary: dict[str, Any], reference: str, head: str,
                 runs: Sequence[str]) -> str:
  lines = [f'{head.upper()}-head, {len(runs)} checkpoints ({", ".join(runs)}); '
           f'difference to `{reference}` paired by checkpoint, '
           f'{int(100 * report.CONFIDENCE)} % t interval, in AP points.', '',
           '| setting | AP | AP50 | AP - reference | AP50 - reference |',
           '|---|---|---|---|---|']
  for setting, row in summary.items():
    cells = [report._cell(row[k], 100.0) for k in KEYS[:2]]  # pylint: disable=protected-access
    cells += ['—' if setting == reference else
              report._delta_cell(row[f'{k}_vs_reference'])  # pylint: disable=protected-access
              for k in KEYS[:2]]
    lines.append(f'| `{setting}` | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True,
                      help='an ablate.py grid folder')
  parser.add_argument('--settings', required=True,
                      help="comma-separated; each 'eval.k=v[+eval.k=v]'")
  parser.add_argument('--reference', default=None,
                      help='the setting the others are paired against '
                           '(default: the first)')
  parser.add_argument('--head', default='s', choices=('s', 't'))
  parser.add_argument('--checkpoint', default='latest')
  parser.add_argument('--runs', default='',
                      help='VARIANT/seedK,... (default: every finished run)')
  args = parser.parse_args(argv)
  settings = [s for s in args.settings.split(',') if s]
  overrides = {s: parse_setting(s) for s in settings}
  reference = args.reference or settings[0]
  if reference not in settings:
    raise errors.ConfigError(f'--reference {reference!r} is not in --settings')
  if not os.path.isdir(args.workdir):
    raise errors.MissingFileError(f'{args.workdir}: not a folder')
  runs = ([r for r in args.runs.split(',') if r] or
          finished_runs(args.workdir))
  if not runs:
    raise errors.MissingFileError(
        f'{args.workdir}: no finished run (run.json with status done)')
  scores = {}
  for run in runs:
    run_dir = os.path.join(args.workdir, run)
    scores[run] = {}
    for setting in settings:
      out_dir = os.path.join(run_dir, 'eval_variants', args.head,
                             setting_dirname(setting))
      path = os.path.join(out_dir, 'metrics.json')
      if os.path.exists(path):
        with open(path) as f:
          metrics = json.load(f)
        scores[run][setting] = {k: float(metrics[k]) for k in KEYS}
      else:
        print(f'{run}: scoring {setting}', flush=True)
        scores[run][setting] = score(run_dir, overrides[setting], args.head,
                                     args.checkpoint, out_dir)
  summary = summarize(scores, settings, reference)
  table = format_table(summary, reference, args.head, runs)
  ablate.write_json(os.path.join(args.workdir, 'eval_variants.json'),
                    dict(scores=scores, summary=summary, reference=reference,
                         head=args.head, checkpoint=args.checkpoint))
  with open(os.path.join(args.workdir, 'eval_variants.md'), 'w') as f:
    f.write(table)
  print(table)
  return summary


if __name__ == '__main__':
  errors.cli(main)()
