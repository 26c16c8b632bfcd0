"""Two local processes through jax.distributed (CPU, gloo collectives).

Each process runs tests/train_helper.py with its own --process_id and one CPU
device; the step (pmap, or jit(shard_map) over global arrays) spans both
processes' devices. After training the two processes must hold identical
parameters and have consumed disjoint shards of the data, and the two
wrappers must agree.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import multiprocess
from tests import subprocess_env

HELPER = os.path.join(os.path.dirname(__file__), 'train_helper.py')
REPO = multiprocess.REPO


def _two_processes(workdir, *extra, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS=subprocess_env.xla_flags(1))
  results = multiprocess.run(
      lambda coordinator, i: [
          HELPER, '--workdir', str(workdir), '--coordinator', coordinator,
          '--num_processes', '2', '--process_id', str(i), *map(str, extra)],
      2, timeout=timeout, env=env)
  for rc, out, err in results:
    assert rc == 0, f'{out[-2000:]}\n{err[-4000:]}'
  return [out for _, out, _ in results]


def _check(workdir, steps, examples_per_step):
  finals = [dict(np.load(os.path.join(workdir, f'final_{i}.npz')))
            for i in range(2)]
  assert sorted(finals[0]) == sorted(finals[1])
  for k in finals[0]:
    np.testing.assert_array_equal(finals[0][k], finals[1][k], err_msg=k)
  seen = [json.load(open(os.path.join(workdir, f'seen_{i}.json')))
          for i in range(2)]
  assert len(seen[0]) == len(seen[1]) == steps * examples_per_step
  assert not set(seen[0]) & set(seen[1]), 'the two shards overlap'
  # One checkpoint directory, written together; metrics from process 0 only.
  data_iter = os.path.join(workdir, 'checkpoints', str(steps), 'data_iter')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(
      os.listdir(data_iter))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(l)['step'] for l in f] == list(range(1, steps + 1))
  return finals


@pytest.fixture(scope='module')
def toy_pmap_run(tmp_path_factory):
  """The toy model, 3 steps, pmap over 2 processes: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp('toy_pmap')
  return workdir, _two_processes(workdir, '--total_steps', 3)


def test_two_processes_toy_model_agree_on_disjoint_shards(toy_pmap_run):
  workdir, outs = toy_pmap_run
  assert all('DONE 3' in o for o in outs)
  # Global batch 8 = 2 processes x 1 device x 4 images.
  _check(workdir, steps=3, examples_per_step=4)


def test_two_processes_shard_map_equals_pmap(toy_pmap_run, tmp_path):
  """jit(shard_map) with global arrays across 2 processes: pmap's numbers."""
  outs = _two_processes(tmp_path, '--total_steps', 3,
                        '--parallelism', 'shard_map')
  assert all('DONE 3' in o for o in outs)
  finals = _check(tmp_path, steps=3, examples_per_step=4)
  reference = dict(np.load(os.path.join(toy_pmap_run[0], 'final_0.npz')))
  for k, want in reference.items():
    got = finals[0][k]
    gap = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert gap <= 1e-6, (k, gap)
  rows = lambda d: [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
  for got, want in zip(rows(tmp_path), rows(toy_pmap_run[0])):
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)


@pytest.mark.slow
def test_two_processes_demo_config_agree_on_disjoint_shards(tmp_path):
  data = tmp_path / 'data'
  subprocess.run([sys.executable, '-m', 'mimicdet_jax.data.synthetic',
                  str(data), '--num-train', '16', '--num-val', '2',
                  '--seed', '0'], check=True, cwd=REPO,
                 env=dict(os.environ, PYTHONPATH=REPO))
  work = tmp_path / 'work'
  outs = _two_processes(work, '--total_steps', 3, '--demo', data,
                        timeout=1800)
  assert all('DONE 3' in o for o in outs)
  # Global batch 2 = 2 processes x 1 device x 1 image.
  _check(work, steps=3, examples_per_step=1)
