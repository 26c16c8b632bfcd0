"""The best checkpoint (train.keep_best, checkpoint.BestCheckpoint): kept by
its metric through evaluations whose AP goes up, down and up, out of the
rotation's reach, across a resume, and read back by `--checkpoint best`
(evaluation/restore.py). Real orbax saves, no mocks.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mimicdet_jax import checkpoint
from mimicdet_jax import errors
from mimicdet_jax.evaluation import restore
from mimicdet_jax.training import loop as loop_lib
from tests import train_helper as th


def _state(step):
  """A train state's weights whose every value names its step."""
  return {'step': np.asarray(step, np.int32),
          'params': {'w': np.full((2, 3), step, np.float32)},
          'frozen': {'scale': np.ones(3, np.float32)},
          'ema_params': {'w': np.full((2, 3), -step, np.float32)},
          'opt_state': {'m': np.zeros(3, np.float32)}}


def _best_json(workdir):
  with open(os.path.join(workdir, checkpoint.BEST_DIR,
                         checkpoint.BEST_FILE)) as f:
    return json.load(f)


def test_up_down_up_keeps_the_best_and_restores_it(tmp_path):
  work = str(tmp_path)
  best = checkpoint.BestCheckpoint(
      os.path.join(work, checkpoint.BEST_DIR), 'AP')
  kept = []
  for step, ap in ((1, 0.30), (2, 0.50), (3, 0.40)):  # up, down
    kept.append(best.update(step, {'AP': ap, 'AP50': 0.9}, _state(step)))
  assert kept == [True, True, False]
  assert restore.checkpoint_steps(work, checkpoint.BEST_DIR) == [2]
  assert _best_json(work) == {'metric': 'AP', 'value': 0.5, 'step': 2}
  variables, step, used = restore.restore_checkpoint(work, 'best', 'raw')
  assert (step, used) == (2, 'raw')
  np.testing.assert_array_equal(variables['params']['w'], _state(2)['params']['w'])
  np.testing.assert_array_equal(variables['frozen']['scale'], np.ones(3))
  variables, _, used = restore.restore_checkpoint(work, 'best', 'ema')
  assert used == 'ema'
  np.testing.assert_array_equal(variables['params']['w'], -2 * np.ones((2, 3)))

  assert best.update(4, {'AP': 0.60}, _state(4))  # up again
  assert best.update(5, {'AP': 0.60}, _state(5)) is False  # a tie keeps 4
  best.close()
  assert restore.checkpoint_steps(work, checkpoint.BEST_DIR) == [4]
  assert _best_json(work) == {'metric': 'AP', 'value': 0.6, 'step': 4}
  variables, step = restore.restore_variables(work, 'best', 'raw')
  assert step == 4
  np.testing.assert_array_equal(variables['params']['w'], _state(4)['params']['w'])
  # Only the weights are kept, not the optimiser state.
  saved = ocp.StandardCheckpointer().restore(
      os.path.join(work, checkpoint.BEST_DIR, '4', 'state'))
  assert sorted(saved) == ['ema_params', 'frozen', 'params', 'step']

  # A restart reads the stored best and keeps comparing with it.
  best = checkpoint.BestCheckpoint(
      os.path.join(work, checkpoint.BEST_DIR), 'AP')
  assert best.best == {'metric': 'AP', 'value': 0.6, 'step': 4}
  assert best.update(6, {'AP': 0.55}, _state(6)) is False
  assert best.update(7, {'AP': 0.70}, _state(7))
  # A resumed run re-evaluating a step before the best never replaces it.
  assert best.update(3, {'AP': 0.99}, _state(3)) is False
  assert best.update(8, None, _state(8)) is False  # nothing to judge
  best.close()
  assert restore.checkpoint_steps(work, checkpoint.BEST_DIR) == [7]


def test_no_best_checkpoint_is_a_missing_file_error(tmp_path):
  with pytest.raises(errors.MissingFileError, match='keep_best'):
    restore.restore_checkpoint(str(tmp_path), 'best')


def _run(workdir, total_steps, scores, seen, best_before):
  """The toy run with eval_every=1, keep_checkpoints=1 and an evaluation that
  returns scores[step] as AP and records the variables it was given and the
  best kept before it."""
  config = th.toy_config(total_steps=total_steps, eval_every=1,
                         keep_checkpoints=1)
  assert config.train.keep_best == 'AP'  # the default

  def eval_fn(variables, step):
    seen[step] = jax.tree.map(np.copy, variables)
    if step > 1:
      best_before[step] = _best_json(workdir)
    return {'AP': scores[step]}

  variables = th.toy_variables()
  it = th.toy_iterator(8, num_local_devices=jax.local_device_count())
  return loop_lib.run_training(
      config, str(workdir), variables=variables,
      frozen_mask=th.toy_frozen_mask(variables['params']), loss_fn=th.toy_loss,
      train_iter=it, eval_fn=eval_fn)


def test_training_keeps_the_best_through_rotation_and_resume(tmp_path):
  scores = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.45, 5: 0.60, 6: 0.20}
  seen, best_before = {}, {}
  _run(tmp_path, 3, scores, seen, best_before)
  # keep_checkpoints=1: the rotation kept only step 3; the best is step 2.
  assert restore.checkpoint_steps(str(tmp_path)) == [3]
  assert _best_json(tmp_path) == {'metric': 'AP', 'value': 0.5, 'step': 2}
  variables, step = restore.restore_variables(str(tmp_path), 'best')
  assert step == 2
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(seen[2])):
    np.testing.assert_array_equal(a, b)

  # Resumed: 0.45 at step 4 does not beat the stored 0.50; 0.60 at 5 does.
  _run(tmp_path, 6, scores, seen, best_before)
  assert sorted(seen) == [1, 2, 3, 4, 5, 6]
  assert best_before[5] == {'metric': 'AP', 'value': 0.5, 'step': 2}
  assert restore.checkpoint_steps(str(tmp_path)) == [6]
  assert _best_json(tmp_path) == {'metric': 'AP', 'value': 0.6, 'step': 5}
  variables, step = restore.restore_variables(str(tmp_path), 'best')
  assert step == 5
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(seen[5])):
    np.testing.assert_array_equal(a, b)
