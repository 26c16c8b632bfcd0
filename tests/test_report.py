"""Paired statistics of the ablation report against closed forms."""
import math

import numpy as np
import pytest

from mimicdet_jax.experiments import report

# Two-sided 95 % Student t quantiles t_{0.975, df} from printed tables.
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 7: 2.364624252}


def test_paired_difference_interval_matches_hand_computation():
  variant = {0: 0.50, 1: 0.46, 2: 0.55, 3: 0.49, 9: 0.70}  # seed 9 unpaired
  reference = {0: 0.45, 1: 0.44, 2: 0.50, 3: 0.42, 5: 0.10}
  d = [0.05, 0.02, 0.05, 0.07]
  mean = sum(d) / 4
  sd = math.sqrt(sum((x - mean)**2 for x in d) / 3)
  half = T975[3] * sd / math.sqrt(4)
  out = report.paired_difference(variant, reference)
  assert out['seeds'] == [0, 1, 2, 3] and out['n'] == 4
  np.testing.assert_allclose(out['values'], d, atol=1e-12)
  np.testing.assert_allclose(out['mean'], mean, rtol=1e-12)
  np.testing.assert_allclose(out['std'], sd, rtol=1e-12)
  np.testing.assert_allclose(out['half_width'], half, rtol=1e-8)
  np.testing.assert_allclose([out['low'], out['high']],
                             [mean - half, mean + half], rtol=1e-8)
  assert out['verdict'] == 'higher'


@pytest.mark.parametrize('df', sorted(T975))
def test_t_quantile_per_sample_size(df):
  # Differences +-1 alternating around 0.1: sd known, interval from the table.
  n = df + 1
  d = np.array([0.1 + (1 if i % 2 else -1) * 0.01 for i in range(n)])
  out = report.paired_difference(dict(enumerate(d)), dict.fromkeys(range(n), 0.0))
  np.testing.assert_allclose(out['half_width'],
                             T975[df] * d.std(ddof=1) / math.sqrt(n),
                             rtol=1e-8)


def test_verdicts():
  ref = dict.fromkeys(range(4), 0.5)
  lower = report.paired_difference({0: 0.40, 1: 0.42, 2: 0.41, 3: 0.43}, ref)
  assert lower['verdict'] == 'lower' and lower['high'] < 0
  # Mean +0.01 but spread +-0.05: the interval holds zero.
  mixed = report.paired_difference({0: 0.56, 1: 0.46, 2: 0.55, 3: 0.47}, ref)
  assert mixed['low'] < 0 < mixed['high'] and mixed['verdict'] == 'unresolved'
  one = report.paired_difference({0: 0.9}, ref)
  assert one['n'] == 1 and one['half_width'] is None
  assert one['verdict'] == 'unresolved'  # a single seed never decides
  none = report.paired_difference({}, ref)
  assert none['n'] == 0 and none['verdict'] == 'unresolved'


def test_table_shows_interval_and_verdict():
  records = {}
  for s in range(4):
    records[('mimic_off', s)] = dict(s_AP=0.40 + 0.01 * s, t_AP=0.60)
    records[('both', s)] = dict(s_AP=0.43 + 0.01 * s + 0.001 * (s % 2),
                                t_AP=0.60 + 0.02 * (s % 2) - 0.01)
  summary = report.summarize(records, ['mimic_off', 'both'], range(4))
  delta = summary['both']['delta_s_AP']
  assert delta['verdict'] == 'higher' and delta['n'] == 4
  assert summary['both']['delta_t_AP']['verdict'] == 'unresolved'
  table = report.format_table(summary, range(4))
  row = [l for l in table.splitlines() if l.startswith('| `both`')][0]
  lo, hi = delta['low'] * 100, delta['high'] * 100
  assert f'+{delta["mean"] * 100:.1f} [{lo:+.1f}, {hi:+.1f}] higher' in row
  assert 'unresolved' in row
