r"""Ablation grid: one flag per design choice of the paper, one command per table.

  python -m mimicdet_jax.experiments.ablate --base configs/demo.py \
      --grid mimic_off,cls,reg,both --seeds 0,1 --workdir DIR [--steps N] \
      [--config.key=value ...] [--only VARIANT[,..]] [--shard i/n] \
      [--val_images N] [--reference mimic_off] [--report_only] \
      [--plot KEY[,..]]

Each (variant, seed) is one ordinary training run in DIR/<variant>/seed<k>,
trained by `launch.train_and_evaluate` and scored by `evaluate_lib.evaluate`
twice on its final checkpoint: S-head (eval.head=s, the detector) and T-head
(eval.head=t, the teacher). Runs go one after the other; re-running the same
command resumes the grid: finished runs (DIR/<variant>/seed<k>/run.json with
status "done") are skipped, a half-trained run resumes from its last
checkpoint, a trained but unscored one is only scored.

After every run DIR/ablation.json and DIR/ablation.md (mean and spread over
seeds of S-head AP/AP50, T-head AP/AP50, the final mimic cosines and the
train time, plus the paired difference to a reference variant) are rebuilt
from every finished run of the grid, missing runs shown as "pending"; each
row states the mimic its runs really used, per path ("cls kl, reg cosine",
"off"). At the end DIR/ablation.png (every number the runs logged over
training: loss terms, mimic cosines, t_reg_alive ...; or the `--plot` keys;
one colour per variant, from each run's metrics.jsonl) is drawn beside them.

Checks before the first run. Every variant's config is resolved
(config_lib.resolve: a key or value that does not exist fails, naming the
variant), and the data set paths must exist (one line otherwise). One-line
warnings: `--reference` not in `--grid` (the table then has no paired
columns), and a `--steps` that cuts the recipe's warm-up.

Variants. A grid entry is a name of VARIANTS, a `key=value` config override,
or several of those joined by '+' (e.g. `cls+no_stagger`,
`mimic.weight=2.0`). Values are Python literals (tuples, numbers, True);
bare words are strings.

Steps. `--steps N` sets train.total_steps=N and compresses the base recipe's
schedule with it: optim.warmup_steps and optim.decay_steps scale by
N / base total_steps; train.log_every becomes at most N/50 (enough points for
the plot) and train.checkpoint_every at most N/3 (a killed run loses at most a
third). `--config.key=value` overrides are applied after that and before the
variant's own keys, which win.

Evaluation. Both heads are scored on the validation set of the config;
`--val_images N` scores on its first N images instead (a COCO JSON written
to DIR/val_firstN.json), cheaper and noisier.

Compilation. JAX's persistent compilation cache (DIR/jax_cache unless
`--compilation_cache`; set as every run's train.compile_cache, which the
training launch applies) lets the seeds of a variant share their compiled
train step, and every variant that leaves the model unchanged (all mimic.*
switches) share the compiled inference; on a CPU compiling is minutes per run.

Clusters. `--shard i/n` runs every n-th (variant, seed) pair starting at i,
`--only a,b` only those variants; give every host the same DIR on a shared
file system and the same --grid/--seeds: each host writes only its own run
folders, and the table is rebuilt from whatever runs are finished (the last
host to finish writes the complete table; `--report_only` rebuilds it without
training).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from mimicdet_jax import config_lib
from mimicdet_jax import errors
from mimicdet_jax.experiments.report import format_table
from mimicdet_jax.experiments.report import plot_curves
from mimicdet_jax.experiments.report import summarize
from mimicdet_jax.losses import mimic as mimic_lib
from mimicdet_jax.training.metrics import median_step_time
from mimicdet_jax.training.metrics import read_metrics
from mimicdet_jax.training.metrics import train_time

# name -> config overrides. Every switch is one key of configs/common.py; the
# defaults (SPEC) are: mimic on, both paths, cosine, stopped teacher, all
# sampled boxes, staggered pyramid, deformable S-head.
VARIANTS: dict[str, dict[str, Any]] = {
    'mimic_off': {'mimic.enabled': False},  # plain one-stage S-head baseline
    'cls': {'mimic.paths': 'cls'},
    'reg': {'mimic.paths': 'reg'},
    'both': {'mimic.paths': 'both'},  # the paper's dual-path mimic (default)
    'teacher_flowing': {'mimic.teacher_grad': 'flowing'},
    'fg_only': {'mimic.samples': 'foreground'},
    'no_stagger': {'model.staggered': False},
    'no_deform': {'s_head.deformable': False},
}
# One variant per mimic distance (losses/mimic.py DISTANCES): that distance on
# every path it is valid for (kl: cls only; reg keeps the base recipe's).
VARIANTS.update({
    name: {f'mimic.{path}_distance': name
           for path, names in mimic_lib.PATH_DISTANCES.items() if name in names}
    for name in mimic_lib.DISTANCES})

RUN_FILE = 'run.json'
# run.json statuses that end a run (skipped when the grid is re-run).
FINISHED = ('done', 'diverged')


# ------------------------------------------------------------------ variants
def variant_overrides(spec: str, config: ml_collections.ConfigDict
                      ) -> dict[str, Any]:
  """Grid entry -> {dotted key: value}: VARIANTS names and key=value, '+'-joined.

  `config` gives the types of `key=value` values. Later parts win.
  """
  overrides = {}
  for part in spec.split('+'):
    part = part.strip()
    if not part:
      raise errors.ConfigError(f'empty part in variant {spec!r}')
    if '=' in part:
      key, text = part.split('=', 1)
      overrides[key] = config_lib.parse_value(text, config_lib.get_key(config, key))
    elif part in VARIANTS:
      overrides.update(VARIANTS[part])
    else:
      raise errors.ConfigError(f'unknown variant {part!r}; named variants: '
                               f'{", ".join(VARIANTS)} (or key=value)')
  return overrides


# File systems allow 255 bytes a name; longer grid entries are cut and
# given a hash of the whole entry.
MAX_DIRNAME = 120


def variant_dirname(spec: str) -> str:
  """A folder name for a grid entry (keeps letters, digits, . _ - = +)."""
  name = re.sub(r'[^A-Za-z0-9._=+-]', '_', spec)
  if len(name) > MAX_DIRNAME:
    digest = hashlib.sha1(spec.encode()).hexdigest()[:10]
    name = f'{name[:MAX_DIRNAME - 11]}-{digest}'
  return name


def schedule_overrides(config: ml_collections.ConfigDict,
                       steps: Optional[int]) -> dict[str, Any]:
  """train.total_steps=steps with the base schedule compressed (module doc)."""
  if not steps:
    return {}
  base = int(config.train.total_steps)
  ratio = steps / base
  return {
      'train.total_steps': int(steps),
      'optim.warmup_steps': int(round(config.optim.warmup_steps * ratio)),
      'optim.decay_steps': tuple(int(round(d * ratio))
                                 for d in config.optim.decay_steps),
      'train.log_every': int(min(config.train.log_every, max(1, steps // 50))),
      'train.checkpoint_every': int(min(config.train.checkpoint_every,
                                        max(1, steps // 3))),
  }


def load_base(path: str) -> ml_collections.ConfigDict:
  """get_config() of a recipe file (configs/*.py)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  if repo not in sys.path:  # recipes import `configs.common`
    sys.path.insert(0, repo)
  spec = importlib.util.spec_from_file_location('_ablation_base', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def subset_annotations(src: str, dst: str, num_images: int) -> str:
  """Writes a COCO JSON with the first `num_images` images of `src` (file order).

  Same categories (so labels and category ids do not change), only the
  annotations of the kept images. For a cheaper, noisier evaluation.
  """
  with open(src) as f:
    coco = json.load(f)
  images = coco['images'][:num_images]
  keep = {im['id'] for im in images}
  subset = dict(coco, images=images, annotations=[
      a for a in coco.get('annotations', []) if a['image_id'] in keep])
  if read_json(dst) != subset:
    write_json(dst, subset)
  return dst


def run_config(base: ml_collections.ConfigDict, spec: str, seed: int,
               steps: Optional[int], global_overrides: Mapping[str, Any]
               ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The training config of one run and every key it changes from `base`.

  Order: --steps schedule, global --config overrides, the variant, seed.
  """
  overrides = {}
  overrides.update(schedule_overrides(base, steps))
  overrides.update(global_overrides)
  overrides.update(variant_overrides(spec, base))
  overrides['seed'] = int(seed)
  # The runner scores the final checkpoint itself (S and T head).
  overrides['eval.at_end'] = False
  overrides['train.eval_every'] = 0
  config = copy.deepcopy(base)
  for key, value in overrides.items():
    config_lib.set_key(config, key, value)
  return config, overrides


def effective_mimic(config: ml_collections.ConfigDict) -> str:
  """What the mimic of a run really is, per path: 'cls kl, reg cosine', 'off'."""
  m = config.mimic
  if not m.enabled:
    return 'off'
  return ', '.join(f'{path} {m[f"{path}_distance"]}'
                   for path in mimic_lib.mimic_paths(m.paths))


def _num_classes(config: ml_collections.ConfigDict) -> int:
  """data.num_classes, else the training annotations' (1 while they do not
  exist: enough to check the keys and values)."""
  if config.data.num_classes != -1:
    return int(config.data.num_classes)
  from mimicdet_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  names = restore.class_names_from_annotations(config.data, 'train')
  return len(names) if names else 1


def check_variants(base: ml_collections.ConfigDict, grid: Sequence[str],
                   steps: Optional[int], global_overrides: Mapping[str, Any]
                   ) -> dict[str, str]:
  """Resolves every variant's run config (config_lib.resolve: keys and
  values) before any training; {variant: `effective_mimic`}.

  Raises:
    ConfigError: naming the variant, for a key or value that does not exist.
  """
  out = {}
  for spec in grid:
    try:
      config, _ = run_config(base, spec, 0, steps, global_overrides)
      out[spec] = effective_mimic(config_lib.resolve(config,
                                                     _num_classes(config)))
    except errors.ConfigError as e:
      raise errors.ConfigError(f'--grid {spec}: {e}') from None
  return out


# Data set paths every run reads (data.source=coco_json).
DATA_KEYS = ('train_annotations', 'train_images', 'val_annotations',
             'val_images')


def check_data(config: ml_collections.ConfigDict) -> None:
  """ConfigError (one line) naming the first data set path that is missing."""
  if config.data.source != 'coco_json':
    return
  for key in DATA_KEYS:
    path = config.data[key]
    if not os.path.exists(path):
      raise errors.ConfigError(
          f'data.{key}={path!r} does not exist: make the data set first '
          '(docs/DATA.md; the demo\'s: python -m mimicdet_jax.data.synthetic '
          'data/synthetic) or point --config.data.* at it')


def grid_warnings(base: ml_collections.ConfigDict, grid: Sequence[str],
                  steps: Optional[int], global_overrides: Mapping[str, Any],
                  reference: str) -> list[str]:
  """One line each: a reference outside the grid (no paired columns), and
  a --steps that cuts the recipe's warm-up."""
  out = []
  if reference not in grid:
    out.append(f'warning: --reference {reference} is not in --grid: the '
               'table has no paired differences (add it to --grid or name '
               'one of its variants)')
  warmup = int(base.optim.warmup_steps)
  scaled = schedule_overrides(base, steps).get('optim.warmup_steps', warmup)
  if scaled < warmup and 'optim.warmup_steps' not in global_overrides:
    out.append(f'warning: --steps {steps} cuts the warm-up from the '
               f"recipe's {warmup} steps to {scaled} (the schedule scales "
               f'with it); --config.optim.warmup_steps={warmup} keeps it')
  return out


def grid_cache(workdir: str, flag: str = '') -> str:
  """The grid's compilation cache for train.compile_cache ('' = off)."""
  if flag == 'none':
    return ''
  return os.path.abspath(flag or os.path.join(workdir, 'jax_cache'))


# --------------------------------------------------------------------- grid
def grid_runs(grid: Sequence[str], seeds: Sequence[int]
              ) -> list[tuple[str, int]]:
  """(variant, seed) pairs in run order: variant-major."""
  return [(v, s) for v in grid for s in seeds]


def select_runs(runs: Sequence[tuple[str, int]], only: Sequence[str] = (),
                shard: Optional[tuple[int, int]] = None
                ) -> list[tuple[str, int]]:
  """--only keeps those variants; --shard i/n keeps every n-th from i."""
  if only:
    unknown = set(only) - {v for v, _ in runs}
    if unknown:
      raise ValueError(f'--only names variants not in --grid: {sorted(unknown)}')
    runs = [r for r in runs if r[0] in only]
  if shard is not None:
    i, n = shard
    if not 0 <= i < n:
      raise ValueError(f'--shard {i}/{n}: need 0 <= i < n')
    runs = list(runs)[i::n]
  return list(runs)


def run_dir(workdir: str, spec: str, seed: int) -> str:
  return os.path.join(workdir, variant_dirname(spec), f'seed{seed}')


def read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Atomic (temp file + rename), so a kill never leaves half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def _jsonable(overrides: Mapping[str, Any]) -> dict[str, Any]:
  """As it reads back from JSON (tuples at any depth become lists)."""
  return json.loads(json.dumps(dict(sorted(overrides.items()))))


def final_value(rows: Sequence[Mapping[str, float]], key: str,
                fraction: float = 0.1) -> Optional[float]:
  """Mean of `key` over the last `fraction` of the logged rows (>= 1 row)."""
  values = [float(r[key]) for r in rows if key in r]
  if not values:
    return None
  n = max(1, int(round(len(values) * fraction)))
  return float(np.mean(values[-n:]))


RunFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


def train_and_score(config: ml_collections.ConfigDict, workdir: str
                    ) -> dict[str, Any]:
  """Trains one run to train.total_steps (resuming) and scores both heads.

  Returns the run's numbers: s_* / t_* (AP, AP50, AP75 fractions), step,
  train_time_s (from metrics.jsonl), final mimic cosines and loss, and the
  wall time of this call's training and scoring.

  A run that stops on train.max_consecutive_nonfinite non-finite losses is
  a result too (the variant diverges): {'diverged': the first line of the
  error}, not scored.

  Raises:
    RuntimeError: training stopped before total_steps (SIGTERM/SIGINT: the
      loop checkpoints and returns), so the run is not finished.
  """
  from mimicdet_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.training import launch
  from mimicdet_jax.training import loop as loop_lib

  total_steps = int(config.train.total_steps)
  start = time.time()
  try:
    state = launch.train_and_evaluate(config, workdir)
  except loop_lib.NonFiniteLossError as e:
    return {'diverged': str(e).splitlines()[0]}
  wall_train = time.time() - start
  if int(state.step) < total_steps:
    raise RuntimeError(f'{workdir}: training stopped at step '
                       f'{int(state.step)} of {total_steps}')

  variables, step = restore.restore_variables(workdir, 'latest')
  result = {'step': step}
  start = time.time()
  for head in ('s', 't'):
    head_config = copy.deepcopy(config)
    head_config.eval.head = head
    resolved = restore.resolve_config(head_config, workdir)
    metrics = evaluate_lib.evaluate(resolved, variables, workdir, step, viz=0,
                                out_dir=os.path.join(workdir, f'eval_{head}'))
    for key in ('AP', 'AP50', 'AP75'):
      result[f'{head}_{key}'] = float(metrics[key])
  rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  result.update(
      train_time_s=train_time(rows),
      step_time_s=median_step_time(rows),
      wall_train_s=wall_train,
      wall_eval_s=time.time() - start,
      final_loss=final_value(rows, 'loss'),
      mimic_cos_cls=final_value(rows, 'mimic_cos_cls'),
      mimic_cos_reg=final_value(rows, 'mimic_cos_reg'))
  return result


def run_grid(base: ml_collections.ConfigDict, workdir: str,
             grid: Sequence[str], seeds: Sequence[int], *,
             steps: Optional[int] = None,
             global_overrides: Optional[Mapping[str, Any]] = None,
             only: Sequence[str] = (),
             shard: Optional[tuple[int, int]] = None,
             reference: str = 'mimic_off',
             command: str = '',
             run_fn: RunFn = train_and_score,
             log: Callable[[str], None] = print,
             plot: bool = True,
             compile_cache: Optional[str] = None,
             plot_keys: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the selected (variant, seed) pairs that are not finished; reports.

  Args:
    base: the recipe config (not resolved).
    workdir: the grid's folder.
    grid, seeds: the whole grid (the report covers all of it).
    steps: --steps (None: the recipe's schedule).
    global_overrides: --config.key=value, for every run.
    only, shard: which runs this process trains (`select_runs`).
    reference: variant the table's paired differences are taken against.
    command: the command line, recorded in the report.
    run_fn: run_fn(config, run_workdir) -> numbers; `train_and_score`.
    log: progress lines (and the `grid_warnings`, before any training).
    plot: draw DIR/ablation.png at the end.
    compile_cache: every run's train.compile_cache (`grid_cache`: the
      grid's, so seeds and variants share compiled programs); None keeps
      the recipe's. Not a setting of the run (run.json).
    plot_keys: the metrics.jsonl keys to plot; () = every logged one.

  Returns:
    The report dict written to DIR/ablation.json.

  Raises:
    ConfigError: a variant's key or value does not exist (before any run).
    ValueError: a run folder holds a run with other settings (a different
      --steps or overrides): use a new DIR rather than mixing them.
  """
  global_overrides = dict(global_overrides or {})
  runs = grid_runs(grid, seeds)
  # Every variant's config resolved before training anything.
  mimic_of = check_variants(base, grid, steps, global_overrides)
  for line in grid_warnings(base, grid, steps, global_overrides, reference):
    log(line)
  todo = select_runs(runs, only, shard)
  report_args = dict(reference=reference, command=command, steps=steps,
                     global_overrides=global_overrides, mimic=mimic_of,
                     plot_keys=plot_keys)
  for k, (spec, seed) in enumerate(todo):
    rdir = run_dir(workdir, spec, seed)
    config, overrides = run_config(base, spec, seed, steps, global_overrides)
    if compile_cache is not None:
      config.train.compile_cache = compile_cache
    record_path = os.path.join(rdir, RUN_FILE)
    record = read_json(record_path)
    settings = _jsonable(overrides)
    if record is not None and record['overrides'] != settings:
      raise ValueError(
          f'{rdir} holds a run with other settings:\n  recorded '
          f'{record["overrides"]}\n  requested {settings}\nUse a new --workdir.')
    if record is not None and record.get('status') in FINISHED:
      log(f'[{k + 1}/{len(todo)}] {spec} seed {seed}: {record["status"]}, '
          'skipped')
      continue
    log(f'[{k + 1}/{len(todo)}] {spec} seed {seed}: training in {rdir}')
    started = (record or {}).get('started', time.time())
    write_json(record_path, dict(variant=spec, seed=int(seed),
                                 overrides=settings, status='running',
                                 started=started, mimic=mimic_of[spec]))
    result = run_fn(config, rdir)
    status = 'diverged' if 'diverged' in result else 'done'
    log(f'[{k + 1}/{len(todo)}] {spec} seed {seed}: {status}')
    write_json(record_path, dict(variant=spec, seed=int(seed),
                                 overrides=settings, status=status,
                                 started=started, finished=time.time(),
                                 mimic=mimic_of[spec], result=result))
    # Table after every run; the plot (slow-ish) once at the end.
    write_report(workdir, grid, seeds, plot=False, **report_args)
  return write_report(workdir, grid, seeds, plot=plot, **report_args)


# ------------------------------------------------------------------ report
def collect_records(workdir: str, grid: Sequence[str], seeds: Sequence[int]
                    ) -> dict[tuple[str, int], dict[str, Any]]:
  """{(variant, seed): run.json's result} for the finished runs of the grid."""
  out = {}
  for spec, seed in grid_runs(grid, seeds):
    record = read_json(os.path.join(run_dir(workdir, spec, seed), RUN_FILE))
    if record is not None and record.get('status') in FINISHED:
      out[(spec, seed)] = record['result']
  return out


def _git_commit() -> str:
  try:
    return subprocess.run(
        ['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10,
        check=True).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return ''


def write_report(workdir: str, grid: Sequence[str], seeds: Sequence[int], *,
                 reference: str = 'mimic_off', command: str = '',
                 steps: Optional[int] = None,
                 global_overrides: Optional[Mapping[str, Any]] = None,
                 plot: bool = True,
                 mimic: Optional[Mapping[str, str]] = None,
                 plot_keys: Sequence[str] = ()) -> dict[str, Any]:
  """DIR/ablation.json, DIR/ablation.md and DIR/ablation.png from run.json files.

  The plot is redrawn only with `plot`; the table links an existing one.
  `mimic`: {variant: `effective_mimic`}, a column of the table; `plot_keys`
  as `run_grid`'s.
  """
  records = collect_records(workdir, grid, seeds)
  summary = summarize(records, grid, seeds, reference)
  report = dict(
      command=command, git_commit=_git_commit(), steps=steps,
      global_overrides=_jsonable(global_overrides or {}),
      grid=list(grid), seeds=list(seeds), reference=reference,
      variants={spec: _jsonable(variant_overrides_or_raw(spec))
                for spec in grid},
      mimic=dict(mimic or {}),
      summary=summary,
      runs=[dict(variant=v, seed=s, **records[(v, s)])
            for v, s in grid_runs(grid, seeds) if (v, s) in records],
      written=time.time())
  write_json(os.path.join(workdir, 'ablation.json'), report)
  plot_path = os.path.join(workdir, 'ablation.png')
  curves = {spec: {seed: read_metrics(os.path.join(
      run_dir(workdir, spec, seed), 'metrics.jsonl')) for seed in seeds}
            for spec in grid} if plot else {}
  drew = (plot_curves(curves, plot_path, plot_keys or None) if plot
          else os.path.exists(plot_path))
  md = [f'# Ablation: {", ".join(grid)}', '',
        f'Command: `{command}`' if command else '',
        f'Commit: `{report["git_commit"]}`' if report['git_commit'] else '',
        '',
        'Mean ± sample std over the finished seeds. AP in percent (COCO '
        'AP@[.5:.95], AP50) of the S-head (the detector, eval.head=s) and of '
        'the T-head (the teacher, eval.head=t) on the same final checkpoint; '
        'cos = mean cosine S vs T over the last 10% of the logged training '
        'steps; train s = training seconds from metrics.jsonl (compilation '
        'included, unless the compilation cache already held it); step s = '
        'median seconds per training step. Δ = paired difference (same '
        'seed) to the reference: mean [95 % t interval] and a verdict, '
        'higher or lower only when the interval excludes zero, else '
        'unresolved (experiments/report.py). mimic = the distance each '
        'path of the mimic used (cls, reg), as the run\'s config had it.', '',
        format_table(summary, seeds, reference, mimic), '']
  if drew:
    md += ['![loss terms and mimic cosine](ablation.png)', '']
  md += ['Variants:', '']
  for spec in grid:
    md.append(f'- `{spec}`: ' + ', '.join(
        f'{k}={v}' for k, v in variant_overrides_or_raw(spec).items()))
  md_path = os.path.join(workdir, 'ablation.md')
  with open(f'{md_path}.tmp{os.getpid()}', 'w') as f:  # shards write too
    f.write('\n'.join(md) + '\n')
  os.replace(f'{md_path}.tmp{os.getpid()}', md_path)
  return report


def variant_overrides_or_raw(spec: str) -> dict[str, Any]:
  """Overrides of a grid entry for the report (key=value parts kept as text)."""
  out = {}
  for part in spec.split('+'):
    if '=' in part:
      key, text = part.split('=', 1)
      out[key] = text
    elif part in VARIANTS:
      out.update(VARIANTS[part])
  return out


# --------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(
      prog='python -m mimicdet_jax.experiments.ablate',
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--base', required=True, help='recipe config, configs/*.py')
  p.add_argument('--grid', required=True,
                 help='comma-separated variants: ' + ', '.join(VARIANTS) +
                 ', key=value, or parts joined by +')
  p.add_argument('--seeds', default='0,1', help='comma-separated seeds')
  p.add_argument('--workdir', required=True)
  p.add_argument('--steps', type=int, default=None,
                 help='train.total_steps; the schedule is compressed with it')
  p.add_argument('--only', default='', help='comma-separated variants to run')
  p.add_argument('--shard', default='', help='i/n: every n-th run from i')
  p.add_argument('--val_images', type=int, default=0,
                 help='score on the first N validation images only (0: all)')
  p.add_argument('--compilation_cache', default='',
                 help="JAX persistent compilation cache folder (default "
                 "DIR/jax_cache; 'none' disables): seeds of a variant, and "
                 "variants with the same model, reuse compiled programs")
  p.add_argument('--reference', default='mimic_off',
                 help='variant the paired differences are taken against')
  p.add_argument('--report_only', action='store_true',
                 help='rebuild ablation.{json,md,png} without training')
  p.add_argument('--plot', default='',
                 help='comma-separated metrics.jsonl keys to plot (default: '
                 'every logged one: losses, mimic cosines, t_reg_alive, ...)')
  return p.parse_known_args(argv)


def _split(text: str) -> list[str]:
  """Comma-separated items; commas inside brackets belong to a value
  (`optim.decay_steps=(1920,2240)` is one item)."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text + ','):
    depth += {'(': 1, '[': 1, ')': -1, ']': -1}.get(ch, 0)
    if ch == ',' and depth <= 0:
      items.append(text[start:i].strip())
      start = i + 1
  return [t for t in items if t]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = parse_args(argv)
  base = load_base(args.base)
  global_overrides = config_lib.parse_overrides(rest, base)
  grid = _split(args.grid)
  if not args.report_only:
    # The data every run reads, before anything is written.
    for spec in grid:
      check_data(run_config(base, spec, 0, args.steps, global_overrides)[0])
  if args.val_images:
    # The subset file lives in DIR, so every shard of the grid shares it.
    src = global_overrides.get('data.val_annotations',
                               base.data.val_annotations)
    if not os.path.exists(src):
      raise errors.ConfigError(f'--val_images {args.val_images}: '
                               f'data.val_annotations={src!r} does not exist')
    global_overrides['data.val_annotations'] = subset_annotations(
        src, os.path.join(os.path.abspath(args.workdir),
                          f'val_first{args.val_images}.json'),
        args.val_images)
  if len(set(grid)) != len(grid):
    raise SystemExit(f'--grid lists a variant twice: {grid}')
  seeds = [int(s) for s in _split(args.seeds)]
  shard = None
  if args.shard:
    i, n = args.shard.split('/')
    shard = (int(i), int(n))
  command = 'python -m mimicdet_jax.experiments.ablate ' + ' '.join(argv)
  if args.report_only:
    for line in grid_warnings(base, grid, args.steps, global_overrides,
                              args.reference):
      print(line)
    report = write_report(
        args.workdir, grid, seeds, reference=args.reference, command=command,
        steps=args.steps, global_overrides=global_overrides,
        mimic=check_variants(base, grid, args.steps, global_overrides),
        plot_keys=_split(args.plot))
  else:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.WARNING)  # orbax/train INFO per step
    try:
      # The grid's cache goes in each run's train.compile_cache, which
      # launch.enable_compile_cache applies (it would override a global one).
      report = run_grid(base, args.workdir, grid, seeds, steps=args.steps,
                        global_overrides=global_overrides,
                        only=_split(args.only), shard=shard,
                        reference=args.reference, command=command,
                        compile_cache=grid_cache(args.workdir,
                                                 args.compilation_cache),
                        plot_keys=_split(args.plot))
    except RuntimeError as e:  # SIGTERM/SIGINT: the run saved a checkpoint
      raise SystemExit(f'{e}\ninterrupted: run the same command again to '
                       'resume the grid') from e
  print(format_table(report['summary'], seeds, args.reference,
                     report.get('mimic')))
  print(f'written: {os.path.join(args.workdir, "ablation.md")}, '
        'ablation.json, ablation.png')
  return report


if __name__ == '__main__':
  errors.cli(main)()
