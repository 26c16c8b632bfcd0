"""EMA of the weights (training/ema.py): the closed form, exact resume, and
which weights evaluation gets (eval.weights), on the toy model of
tests/train_helper.py.
"""
import jax
import numpy as np
import pytest

from mimicdet_jax import checkpoint
from mimicdet_jax import config_lib
from mimicdet_jax import errors
from mimicdet_jax.evaluation import restore
from mimicdet_jax.training import ema as ema_lib
from mimicdet_jax.training import loop as loop_lib
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib
from tests import train_helper as th

# The cap (0.6) is reached at the 5th applied update ((1 + 5) / (5 + 5)):
# the closed form covers the warm-up and the capped decay.
DECAY, WARMUP = 0.6, 5.0


def _ema_config(**train):
  c = th.toy_config(**train)
  c.optim.ema_decay, c.optim.ema_warmup = DECAY, WARMUP
  return c


def _reference_ema(initial, applied, decay, warmup):
  """The EMA over `applied` (params after each applied update), float64."""
  ema = np.asarray(initial, np.float64)
  for n, params in enumerate(applied, start=1):
    d = min(decay, (1.0 + n) / (warmup + n))
    ema = d * ema + (1.0 - d) * np.asarray(params, np.float64)
  return ema


def test_decay_warm_up_is_the_published_formula():
  for n in (1, 2, 5, 10, 1000, 100000):
    for decay, warmup in ((0.9999, 10.0), (0.6, 5.0), (0.99, 0.0)):
      want = min(decay, (1.0 + n) / (warmup + n))
      np.testing.assert_allclose(ema_lib.ema_decay_at(n, decay, warmup), want,
                                 rtol=1e-6)


def test_ema_after_k_steps_equals_the_closed_form_over_the_recorded_params():
  """Six steps, the third non-finite (skipped: it neither moves the EMA nor
  counts as an update of the warm-up)."""
  config = _ema_config()
  variables = th.toy_variables()
  mask = th.toy_frozen_mask(variables['params'])
  state, tx = state_lib.create_train_state(config, variables, mask,
                                           jax.random.PRNGKey(3))
  step = step_lib.make_train_step(
      th.toy_loss, tx, mask, lr_schedule=optim.make_lr_schedule(config),
      ema_decay=DECAY, ema_warmup=WARMUP)
  parallel = parallel_lib.DataParallel('pmap', jax.local_devices()[:2])
  p_step = parallel.wrap(step)
  dstate = parallel.put_state(state)
  applied = []
  for i in range(6):
    ex = [th._example(8 * i + j, nan_from=-1) for j in range(8)]
    batch = {k: np.stack([e[k] for e in ex]).reshape((2, 4) + ex[0][k].shape)
             for k in ex[0]}
    if i == 2:
      batch['image'][1, 3, 0, 0, 0] = np.nan
    dstate, metrics = p_step(dstate, parallel.put_batch(batch))
    if parallel.host(metrics)['finite']:
      applied.append(parallel.host(dstate).params)
  final = parallel.host(dstate)
  assert len(applied) == 5 and int(final.num_updates) == 5
  initial = jax.tree.leaves(variables['params'])
  for k, (leaf, frozen) in enumerate(zip(jax.tree.leaves(final.ema_params),
                                         jax.tree.leaves(mask))):
    want = _reference_ema(initial[k], [jax.tree.leaves(p)[k] for p in applied],
                          DECAY, WARMUP)
    np.testing.assert_allclose(leaf, want, rtol=2e-6, atol=1e-7)
    if frozen:  # never moved: bitwise the initial weights
      np.testing.assert_array_equal(leaf, initial[k])
  # The average is not the last weights (the test would be blind otherwise).
  gap = max(np.max(np.abs(a - b)) for a, b in zip(
      jax.tree.leaves(final.ema_params), jax.tree.leaves(final.params)))
  assert gap > 1e-3


def test_ema_off_keeps_no_average():
  state, _ = state_lib.create_train_state(
      th.toy_config(), th.toy_variables(), th.toy_frozen_mask(
          th.toy_variables()['params']), jax.random.PRNGKey(0))
  assert state.ema_params is None
  assert ema_lib.update_ema(None, state.params, 0, 0.9, 10.0) is None


class _Crash(Exception):
  pass


def test_run_crashed_and_resumed_has_bitwise_the_ema_of_an_uninterrupted_one(
    tmp_path):
  full = th.run_toy(tmp_path / 'full', _ema_config(total_steps=6))[0]

  def crash_at_5(step):
    if step == 5:  # after the step-4 checkpoint (checkpoint_every=2)
      raise _Crash()

  part = tmp_path / 'part'
  with pytest.raises(_Crash):
    th.run_toy(part, _ema_config(total_steps=6), on_step_end=crash_at_5)
  assert restore.checkpoint_steps(str(part)) == [2, 4]
  resumed = th.run_toy(part, _ema_config(total_steps=6))[0]
  assert int(resumed.step) == 6
  assert full.ema_params is not None
  for a, b in zip(jax.tree.leaves(resumed.ema_params),
                  jax.tree.leaves(full.ema_params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(resumed.params),
                  jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(a, b)

  # eval.weights: the checkpoint's EMA (default) or its raw weights.
  variables, step, used = restore.restore_checkpoint(str(part), 'latest')
  assert (step, used) == (6, 'ema')
  for a, b in zip(jax.tree.leaves(variables['params']),
                  jax.tree.leaves(full.ema_params)):
    np.testing.assert_array_equal(a, b)
  variables, _, used = restore.restore_checkpoint(str(part), 'latest', 'raw')
  assert used == 'raw'
  for a, b in zip(jax.tree.leaves(variables['params']),
                  jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(a, b)

  # Resuming with the EMA switched off is a one-line ConfigError.
  with pytest.raises(errors.ConfigError, match='ema_params'):
    th.run_toy(part, th.toy_config(total_steps=8))


def test_checkpoint_without_ema_restores_raw_and_resumes_without_ema(tmp_path):
  """A checkpoint written before TrainState had ema_params (no such field)
  resumes with the EMA off; evaluation gets its raw weights; switching the
  EMA on for it is a ConfigError."""
  variables = th.toy_variables()
  mask = th.toy_frozen_mask(variables['params'])
  state, _ = state_lib.create_train_state(th.toy_config(), variables, mask,
                                          jax.random.PRNGKey(0))
  old = {k: v for k, v in vars(state).items() if k != 'ema_params'}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every=1,
                                 keep=1)
  ckpt.save(0, old)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every=1,
                                 keep=1)
  restored = ckpt.restore(0, state)
  assert restored.ema_params is None
  with_ema, _ = state_lib.create_train_state(_ema_config(), variables, mask,
                                             jax.random.PRNGKey(0))
  with pytest.raises(errors.ConfigError, match='has no ema_params'):
    ckpt.restore(0, with_ema)
  ckpt.close()
  got, step, used = restore.restore_checkpoint(str(tmp_path), 'latest', 'ema')
  assert (step, used) == (0, 'raw')
  for a, b in zip(jax.tree.leaves(got['params']),
                  jax.tree.leaves(variables['params'])):
    np.testing.assert_array_equal(a, b)


def test_in_training_evaluation_gets_the_ema_weights(tmp_path):
  config = _ema_config(total_steps=4, eval_every=2)
  config.train.keep_best = ''
  assert config.eval.weights == 'ema'  # the default
  seen = {}

  def eval_fn(variables, step):
    seen[step] = jax.tree.map(np.copy, variables['params'])
    return {'AP': 0.0}

  variables = th.toy_variables()
  final = loop_lib.run_training(
      config, str(tmp_path), variables=variables,
      frozen_mask=th.toy_frozen_mask(variables['params']),
      loss_fn=th.toy_loss, train_iter=th.toy_iterator(
          8, num_local_devices=jax.local_device_count()), eval_fn=eval_fn)
  assert sorted(seen) == [2, 4]
  for a, b in zip(jax.tree.leaves(seen[4]), jax.tree.leaves(final.ema_params)):
    np.testing.assert_array_equal(a, b)


def test_model_variables_picks_the_weights():
  state = {'params': {'w': np.ones(2)}, 'frozen': {},
           'ema_params': {'w': np.zeros(2)}}
  for weights in checkpoint.WEIGHTS:
    variables, used = checkpoint.model_variables(state, weights)
    assert used == weights
    np.testing.assert_array_equal(variables['params']['w'],
                                  state[f'{"ema_" if used == "ema" else ""}'
                                        'params']['w'])
  variables, used = checkpoint.model_variables(
      dict(state, ema_params=None), 'ema')
  assert used == 'raw'
  with pytest.raises(errors.ConfigError, match='eval.weights'):
    checkpoint.model_variables(state, 'average')


@pytest.mark.parametrize('key,value,match', [
    ('ema_decay', 1.0, 'optim.ema_decay=1.0'),
    ('ema_decay', -0.1, 'optim.ema_decay=-0.1'),
    ('ema_warmup', -1.0, 'optim.ema_warmup=-1.0')])
def test_bad_ema_settings_are_config_errors_naming_the_key(key, value, match):
  c = th.toy_config()
  setattr(c.optim, key, value)
  with pytest.raises(errors.ConfigError, match=match):
    config_lib.resolve(c, 2)
  setattr(c.optim, key, 0.5)
  config_lib.resolve(c, 2)
