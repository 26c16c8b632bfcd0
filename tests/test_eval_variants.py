"""experiments/eval_variants.py: inference settings paired on the same
checkpoints."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from mimicdet_jax import errors
from mimicdet_jax.experiments import eval_variants


def test_settings_are_typed_eval_overrides_only():
  assert eval_variants.parse_setting('eval.weights=raw+eval.tta=hflip') == {
      'eval.weights': 'raw', 'eval.tta': 'hflip'}
  assert eval_variants.parse_setting('eval.soft_nms_sigma=0.3') == {
      'eval.soft_nms_sigma': 0.3}
  with pytest.raises(errors.ConfigError, match='optim.ema_decay'):
    eval_variants.parse_setting('optim.ema_decay=0.9')
  with pytest.raises(errors.ConfigError):
    eval_variants.parse_setting('eval.no_such_key=1')


def _grid(root, runs, values, done=True):
  """Fake finished runs with their scores already on disk (what a rerun
  reads instead of scoring again)."""
  for run, per_setting in zip(runs, values):
    run_dir = os.path.join(root, run)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, 'run.json'), 'w') as f:
      json.dump({'status': 'done' if done else 'training'}, f)
    for setting, ap in per_setting.items():
      out = os.path.join(run_dir, 'eval_variants', 's',
                         eval_variants.setting_dirname(setting))
      os.makedirs(out)
      with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump({'AP': ap, 'AP50': ap + 0.2, 'AP75': ap - 0.1}, f)


def test_table_pairs_each_setting_with_the_reference_by_checkpoint(tmp_path):
  raw, ema = 'eval.weights=raw', 'eval.weights=ema'
  raw_ap = [0.50, 0.60, 0.55, 0.65]
  ema_ap = [0.52, 0.61, 0.58, 0.66]
  runs = [f'v/seed{k}' for k in range(4)]
  _grid(str(tmp_path), runs, [{raw: r, ema: e} for r, e in zip(raw_ap, ema_ap)])
  _grid(str(tmp_path), ['v/seed9'], [{}], done=False)  # unfinished: left out
  summary = eval_variants.main(['--workdir', str(tmp_path), '--settings',
                                f'{raw},{ema}'])
  diffs = np.array(ema_ap) - np.array(raw_ap)
  half = stats.t.ppf(0.975, 3) * diffs.std(ddof=1) / math.sqrt(4)
  paired = summary[ema]['AP_vs_reference']
  assert paired['n'] == 4
  assert paired['mean'] == pytest.approx(diffs.mean())
  assert paired['low'] == pytest.approx(diffs.mean() - half)
  assert paired['high'] == pytest.approx(diffs.mean() + half)
  assert paired['verdict'] == 'higher'  # every checkpoint gains 0.01-0.03
  assert summary[raw]['AP']['mean'] == pytest.approx(np.mean(raw_ap))
  table = open(tmp_path / 'eval_variants.md').read()
  assert '+1.7 [' in table and 'higher' in table and 'seed9' not in table
  saved = json.load(open(tmp_path / 'eval_variants.json'))
  assert sorted(saved['scores']) == runs


def test_reference_must_be_a_setting_and_the_grid_must_have_runs(tmp_path):
  with pytest.raises(errors.ConfigError, match='--reference'):
    eval_variants.main(['--workdir', str(tmp_path), '--settings',
                        'eval.tta=none', '--reference', 'eval.tta=hflip'])
  with pytest.raises(errors.MissingFileError, match='no finished run'):
    eval_variants.main(['--workdir', str(tmp_path), '--settings',
                        'eval.tta=none'])
