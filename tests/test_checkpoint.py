"""Tests of mimicdet_jax.checkpoint and of resuming after SIGKILL.

The kill tests run tests/train_helper.py (a small Flax model through
loop_lib.run_training) in separate processes.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mimicdet_jax import checkpoint
from tests import train_helper as th
from tests import subprocess_env

HELPER = os.path.join(os.path.dirname(__file__), 'train_helper.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed):
  rng = np.random.default_rng(seed)
  return {'step': np.int32(seed),
          'params': {'w': rng.normal(size=(3, 4)).astype(np.float32),
                     'b': rng.normal(size=(4,)).astype(np.float32)},
          'rng': np.asarray([seed, 7], np.uint32)}


def test_roundtrip_restores_state_and_data_position(tmp_path):
  it = th.toy_iterator(8, num_local_devices=2)
  for _ in range(3):
    next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2)
  ckpt.save(3, _state(3), it)
  expected = [next(it)['index'] for _ in range(2)]  # batches 4 and 5
  ckpt.close()

  fresh = th.toy_iterator(8, num_local_devices=2)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert ckpt.latest_step() == 3
  restored = ckpt.restore(3, _state(0), fresh)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3))):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  got = [next(fresh)['index'] for _ in range(2)]
  np.testing.assert_array_equal(np.stack(got), np.stack(expected))
  # Batch 4 holds examples 24..31 on [2 devices, 4 per device].
  np.testing.assert_array_equal(got[0], np.arange(24, 32).reshape(2, 4))


def test_restore_into_other_shapes_fails_naming_the_leaf(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1)
  ckpt.save(1, _state(1))
  ckpt.close()
  other = _state(1)
  other['params']['w'] = np.zeros((3, 5), np.float32)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1)
  with pytest.raises(ValueError, match=r"\['params'\]\['w'\]: checkpoint "
                     r"\(3, 4\) float32, model \(3, 5\)"):
    ckpt.restore(1, other)
  ckpt.close()


def test_interval_and_keep_last(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=2, keep=2)
  saved = [s for s in range(1, 8) if ckpt.save(s, _state(s))]
  assert saved == [2, 4, 6]
  assert ckpt.save(7, _state(7), force=True)
  ckpt.close()
  assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ['6', '7']


def _helper(workdir, *args, devices=8):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=subprocess_env.xla_flags(devices),
             PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, HELPER, '--workdir', str(workdir), *map(str, args)],
      env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


def _final(workdir):
  return dict(np.load(os.path.join(workdir, 'final_0.npz')))


def _check_same_run(a, b):
  fa, fb = _final(a), _final(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)  # bitwise
  assert _losses(a) == _losses(b)
  assert [s for s, _ in _losses(b)] == [1, 2, 3, 4, 5, 6]


def _uninterrupted(tmp_path):
  """The reference run, in this process (8 CPU devices, as the helpers)."""
  full = tmp_path / 'full'
  final, _ = th.run_toy(full, th.toy_config(total_steps=6))
  np.savez(full / 'final_0.npz', **th.flat_params(final.params))
  return full


def test_sigkill_mid_save_then_restart_equals_uninterrupted(tmp_path):
  full = _uninterrupted(tmp_path)
  part = tmp_path / 'part'
  # checkpoint_every=2: the process kills itself from inside the save of
  # step 4 (train_helper.kill_inside_save), before orbax commits it.
  r = _helper(part, '--total_steps', 6, '--kill_in_save', 4)
  assert r.returncode == -9, r.stderr[-3000:]
  assert 'KILLED IN SAVE 4' in r.stdout and 'DONE' not in r.stdout
  # The kill hit the save: step 4 is a temporary directory, not a
  # checkpoint, and the latest committed step is 2.
  names = sorted(os.listdir(part / 'checkpoints'))
  assert '2' in names and '4' not in names, names
  assert any(n.startswith('4.') for n in names), names
  latest = checkpoint.Checkpointer(str(part / 'checkpoints'), save_every=2,
                                   keep=3).latest_step()
  assert latest == 2
  r = _helper(part, '--total_steps', 6)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'DONE 6' in r.stdout
  # The restart resumed from step 2, removed the partial directory and
  # re-saved step 4.
  assert sorted(os.listdir(part / 'checkpoints')) == ['2', '4', '6']
  _check_same_run(full, part)


@pytest.mark.slow
def test_three_steps_then_sigkill_after_save_then_restart(tmp_path):
  full = _uninterrupted(tmp_path)
  part = tmp_path / 'part'
  r = _helper(part, '--total_steps', 3)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _helper(part, '--total_steps', 6, '--kill_at', 5, '--kill_signal', 'KILL')
  assert r.returncode == -9, r.stderr[-3000:]
  r = _helper(part, '--total_steps', 6)
  assert r.returncode == 0, r.stderr[-3000:]
  _check_same_run(full, part)


@pytest.mark.slow
def test_sigterm_process_exits_cleanly_with_a_checkpoint(tmp_path):
  r = _helper(tmp_path, '--total_steps', 20, '--kill_at', 3,
              '--kill_signal', 'TERM')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'DONE 4' in r.stdout
  assert '4' in os.listdir(tmp_path / 'checkpoints')


@pytest.mark.slow
def test_demo_config_sigkill_after_save_then_restart(tmp_path):
  """The same on MimicDet and the grain DataLoader (minutes on CPU)."""
  data = tmp_path / 'data'
  subprocess.run([sys.executable, '-m', 'mimicdet_jax.data.synthetic',
                  str(data), '--num-train', '16', '--num-val', '2',
                  '--seed', '0'], check=True, cwd=REPO,
                 env=dict(os.environ, PYTHONPATH=REPO))
  full, part = tmp_path / 'full', tmp_path / 'part'
  r = _helper(full, '--total_steps', 6, '--demo', data, devices=2)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _helper(part, '--total_steps', 6, '--demo', data, '--kill_at', 5,
              devices=2)
  assert r.returncode == -9, r.stderr[-3000:]
  r = _helper(part, '--total_steps', 6, '--demo', data, devices=2)
  assert r.returncode == 0, r.stderr[-3000:]
  _check_same_run(full, part)
