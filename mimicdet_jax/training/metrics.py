"""Training metrics: WORKDIR/metrics.jsonl and TensorBoard (process 0)."""
import json
import os
from typing import Mapping, Optional, Sequence

from absl import logging
import numpy as np


class MetricWriter:
  """Writes scalars to WORKDIR/metrics.jsonl and TensorBoard (process 0).

  One JSON object per log step: {"step": int, name: float, ...}. On resume
  from step s, rows after s (written by a run that died before its next
  checkpoint) are dropped so the file reads like one uninterrupted run;
  TensorBoard events after s are purged the same way.
  """

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f
                if line.strip() and json.loads(line)['step'] <= start_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(rows)
      os.replace(self.path + '.tmp', self.path)
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=start_step + 1 if start_step > 0 else None)
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard events')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in sorted(scalars.items())})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step':
          self._tb.add_scalar(f'train/{k}', v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict]:
  """Rows of a training run's metrics.jsonl ([] when absent)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_time(rows: Sequence[Mapping[str, float]]) -> float:
  """Seconds of training from metrics.jsonl: sum of step_time x steps per row.

  Survives resumes (the training loop drops rows after the checkpoint it
  resumes from); includes compilation, which sits in each process's first
  window.
  """
  total, prev = 0.0, 0
  for row in rows:
    total += float(row.get('step_time', 0.0)) * (int(row['step']) - prev)
    prev = int(row['step'])
  return total


def median_step_time(rows: Sequence[Mapping[str, float]]) -> Optional[float]:
  """Median seconds per step over the logged windows (compile-free estimate:
  only each process's first window holds compilation)."""
  values = [float(r['step_time']) for r in rows if 'step_time' in r]
  return float(np.median(values)) if values else None
