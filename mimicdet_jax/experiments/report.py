"""Statistics and the report of an ablation grid (table, verdicts, plot).

`experiments/ablate.py` trains and scores the runs; this module turns the
per-run numbers into what a reader compares:

- `spread`: mean and sample spread of a number over seeds;
- `paired_difference`: variant minus reference on the same seeds (same data
  order, same initialisation where the parameter trees agree), its mean and a
  two-sided t confidence interval (default 95 %), and a verdict: `higher` or
  `lower` only when the interval excludes zero, `unresolved` otherwise
  (including n < 2, where no interval exists);
- `summarize` / `format_table`: the Markdown table of DIR/ablation.md;
- `plot_curves`: DIR/ablation.png, every logged number over steps (loss
  terms first, then the diagnostics: mimic cosines, t_reg_alive, ...).

Why paired: seeds move the S-head's AP by several points on short runs, far
more than most design choices; the difference of two runs that share a seed
cancels what the seed does to both (docs/ABLATIONS.md, "Protocol").
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

# metrics.jsonl keys that are not curves.
NOT_PLOTTED = ('step',)

# Per-run numbers summarised over seeds: (key in run.json, table header,
# factor for the table). APs are fractions in the JSON, percent in the table.
SUMMARY_FIELDS = (
    ('s_AP', 'S AP', 100.0),
    ('s_AP50', 'S AP50', 100.0),
    ('t_AP', 'T AP', 100.0),
    ('t_AP50', 'T AP50', 100.0),
    ('mimic_cos_cls', 'cos cls', 1.0),
    ('mimic_cos_reg', 'cos reg', 1.0),
    ('train_time_s', 'train s', 1.0),
    ('step_time_s', 'step s', 1.0),
)

# Paired differences to the reference, with intervals, for these numbers.
PAIRED_FIELDS = ('s_AP', 't_AP')

CONFIDENCE = 0.95


def spread(values: Sequence[Optional[float]]) -> dict[str, Any]:
  """n, mean, sample std (ddof 1; 0 for one value), min, max, the values."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return dict(n=0, mean=None, std=None, min=None, max=None, values=[])
  return dict(n=int(v.size), mean=float(v.mean()),
              std=float(v.std(ddof=1)) if v.size > 1 else 0.0,
              min=float(v.min()), max=float(v.max()), values=v.tolist())


def paired_difference(variant: Mapping[int, float],
                      reference: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
  """Variant minus reference over the seeds both have, with a t interval.

  Args:
    variant, reference: {seed: number}; seeds missing from either side (or
      None) are left out.
    confidence: two-sided level of the interval.

  Returns:
    `spread` of the differences (n, mean, std, min, max, values) plus
    `seeds`, `confidence`, `half_width` = t_{(1+confidence)/2, n-1} * std /
    sqrt(n), `low`, `high` (None for n < 2) and `verdict`: 'higher' when
    low > 0, 'lower' when high < 0, else 'unresolved'.
  """
  seeds = sorted(s for s in variant if s in reference and
                 variant[s] is not None and reference[s] is not None)
  diffs = [float(variant[s]) - float(reference[s]) for s in seeds]
  out = spread(diffs)
  out.update(seeds=seeds, confidence=confidence, half_width=None, low=None,
             high=None, verdict='unresolved')
  n = out['n']
  if n >= 2:
    t = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    half = t * out['std'] / np.sqrt(n)
    out.update(half_width=float(half), low=out['mean'] - half,
               high=out['mean'] + half)
    if out['low'] > 0:
      out['verdict'] = 'higher'
    elif out['high'] < 0:
      out['verdict'] = 'lower'
  return out


def summarize(records: Mapping[tuple[str, int], Mapping[str, Any]],
              grid: Sequence[str], seeds: Sequence[int],
              reference: str = 'mimic_off',
              confidence: float = CONFIDENCE) -> dict[str, Any]:
  """Per variant: `spread` of every SUMMARY_FIELDS number over its seeds.

  Args:
    records: {(variant, seed): run result}; a result with a 'diverged' key
      counts as diverged, not in the numbers.
    grid, seeds: the grid.
    reference: with it in the grid, every other variant also gets
      `delta_<key>` = `paired_difference` (variant - reference, same seed) for
      PAIRED_FIELDS.
    confidence: level of the paired intervals.
  """
  diverged = {k for k, r in records.items() if 'diverged' in r}
  scored = {k: r for k, r in records.items() if k not in diverged}
  out = {}
  for spec in grid:
    done = {s: scored[(spec, s)] for s in seeds if (spec, s) in scored}
    entry = {'seeds_done': sorted(done),
             'seeds_diverged': [s for s in seeds if (spec, s) in diverged],
             'seeds_pending': [s for s in seeds if (spec, s) not in records]}
    for key, _, _ in SUMMARY_FIELDS:
      entry[key] = spread([r.get(key) for r in done.values()])
    if reference in grid and spec != reference:
      ref = {s: scored[(reference, s)] for s in seeds
             if (reference, s) in scored}
      for key in PAIRED_FIELDS:
        entry[f'delta_{key}'] = paired_difference(
            {s: r.get(key) for s, r in done.items()},
            {s: r.get(key) for s, r in ref.items()}, confidence)
    out[spec] = entry
  return out


def _cell(stats: Mapping[str, Any], factor: float, digits: int = 1) -> str:
  if not stats or not stats['n']:
    return '—'
  mean, std = stats['mean'] * factor, stats['std'] * factor
  if stats['n'] == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {std:.{digits}f}'


def _delta_cell(stats: Mapping[str, Any], factor: float = 100.0) -> str:
  """'+2.1 [+0.4, +3.8] higher' (mean, confidence interval, verdict)."""
  if not stats or not stats['n']:
    return '—'
  mean = stats['mean'] * factor
  if stats.get('low') is None:
    return f'{mean:+.1f} (n=1)'
  low, high = stats['low'] * factor, stats['high'] * factor
  return f'{mean:+.1f} [{low:+.1f}, {high:+.1f}] {stats["verdict"]}'


def format_table(summary: Mapping[str, Any], seeds: Sequence[int],
                 reference: str = 'mimic_off',
                 mimic: Optional[Mapping[str, str]] = None) -> str:
  """Markdown table: mean ± sample std over the finished seeds, and the
  paired difference to the reference with its interval and verdict.

  `mimic` ({variant: 'cls kl, reg cosine'}, the distance each path used)
  adds that column.
  """
  with_delta = any('delta_s_AP' in e for e in summary.values())
  lead = ['variant'] + (['mimic'] if mimic is not None else [])
  head = lead + ['seeds'] + [h for _, h, _ in SUMMARY_FIELDS]
  if with_delta:
    head += [f'Δ S AP vs {reference} [CI]', f'Δ T AP vs {reference} [CI]']
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '|'.join(['---'] * len(head)) + '|']
  for spec, entry in summary.items():
    seeds_cell = f'{len(entry["seeds_done"])}/{len(seeds)}'
    if entry['seeds_diverged']:
      seeds_cell += f' ({len(entry["seeds_diverged"])} diverged)'
    row = [f'`{spec}`'] + ([mimic.get(spec, '?')] if mimic is not None
                           else []) + [seeds_cell]
    if not entry['seeds_done']:
      empty = 'diverged' if entry['seeds_diverged'] else 'pending'
      lines.append('| ' + ' | '.join(row + [empty] * (len(head) - len(row)))
                   + ' |')
      continue
    for key, _, factor in SUMMARY_FIELDS:
      digits = {'train_time_s': 0, 'step_time_s': 2}.get(
          key, 3 if factor == 1.0 else 1)
      row.append(_cell(entry[key], factor, digits))
    if with_delta:
      for key in PAIRED_FIELDS:
        row.append(_delta_cell(entry[f'delta_{key}'])
                   if f'delta_{key}' in entry else '—')
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def logged_terms(curves: Mapping[str, Mapping[int, Sequence[Mapping]]]
                 ) -> list[str]:
  """Every number any run logged (NOT_PLOTTED aside): `loss`, the loss_*
  terms, then the rest (diagnostics, lr, timing) in name order."""
  keys = {k for per_seed in curves.values() for rows in per_seed.values()
          for r in rows for k, v in r.items()
          if k not in NOT_PLOTTED and isinstance(v, (int, float))}
  return sorted(keys, key=lambda k: (k != 'loss', not k.startswith('loss'), k))


def plot_curves(curves: Mapping[str, Mapping[int, Sequence[Mapping]]],
                path: str, terms: Optional[Sequence[str]] = None) -> bool:
  """PNG: one panel per term; per variant thin lines per seed and the mean.

  Args:
    curves: {variant: {seed: metrics.jsonl rows}}.
    path: output PNG.
    terms: the metrics.jsonl keys to draw; None = `logged_terms`.
  Returns:
    False (nothing written) when no run has logged a row yet.
  """
  if not any(rows for per_seed in curves.values() for rows in per_seed.values()):
    return False
  terms = list(terms) if terms else logged_terms(curves)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cols = 5
  nrows = -(-len(terms) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows),
                           squeeze=False)
  colors = plt.get_cmap('tab10' if len(curves) <= 10 else 'tab20')
  for t, term in enumerate(terms):
    ax = axes[t // cols][t % cols]
    for v, (spec, per_seed) in enumerate(curves.items()):
      color = colors(v % colors.N)
      series = {}
      for rows in per_seed.values():
        pts = [(int(r['step']), float(r[term])) for r in rows if term in r]
        if not pts:
          continue
        steps, values = zip(*pts)
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
        series[len(series)] = dict(pts)
      if series:
        common = sorted(set.intersection(*(set(s) for s in series.values())))
        if common:
          mean = [np.mean([s[x] for s in series.values()]) for x in common]
          ax.plot(common, mean, color=color, linewidth=1.8, label=spec)
    ax.set_title(term, fontsize=10)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    if term.startswith('loss'):
      ax.set_yscale('log', nonpositive='mask')  # mimic_off: no mimic curve
  for t in range(len(terms), nrows * cols):
    axes[t // cols][t % cols].axis('off')
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc='upper center', ncol=min(len(labels), 8),
               fontsize=9, frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.png'
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)
  return True


