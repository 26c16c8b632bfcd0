"""Gradient accumulation (`train.grad_accum_steps`, training/step.py) on the
toy model of tests/train_helper.py: k micro-batches of B/k images give the
update of one batch of B.

Tolerance: the two programs sum the same per-image terms in another order
(a batch of 8 in one convolution against 4 of 2 summed by the scan), so
float32 rounding differs by a few ulps of the gradient (measured: <= 3e-8
on parameters up to 0.44 after two steps); 1e-6 is 30x that and far
below what a wrong normalisation (x k), a wrong PRNG key (other dropout
masks) or a step counted per micro-batch moves the parameters (>= 1e-3).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax import config_lib
from mimicdet_jax.errors import ConfigError
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib
from tests import train_helper as th

ATOL = 1e-6
GLOBAL_BATCH = 8


def mean_loss_without_dropout(params, frozen, batch, rng):
  """The toy loss with a batch-mean normaliser and no randomness: the case
  where loss_per_image=False is exactly equal under accumulation."""
  del rng
  out = th.ToyNet().apply({'params': params, 'frozen': frozen},
                          batch['image'], train=False)
  err = jnp.square(out - batch['target'])
  return jnp.mean(err), {'err_x': jnp.mean(err[:, 0]),
                         'err_y': jnp.mean(err[:, 1])}


def _batch(n):
  ex = [th._example(i, nan_from=-1) for i in range(n)]  # pylint: disable=protected-access
  return {k: np.stack([e[k] for e in ex]) for k in ex[0]}


@functools.lru_cache(maxsize=None)
def _run(loss_fn, per_image, n_dev, k, steps=2):
  """`steps` steps on the same global batch of 8, split over n_dev devices,
  each device's share in k micro-batches -> (state, metrics) of replica 0."""
  config = th.toy_config()
  variables = th.toy_variables()
  mask = th.toy_frozen_mask(variables['params'])
  state, tx = state_lib.create_train_state(config, variables, mask,
                                           jax.random.PRNGKey(3))
  step = step_lib.make_train_step(
      loss_fn, tx, mask, loss_per_image=per_image,
      lr_schedule=optim.make_lr_schedule(config), grad_accum_steps=k)
  devices = jax.local_devices()[:n_dev]
  p_step = parallel_lib.pmap_train_step(step, devices=devices)
  batch = jax.tree.map(
      lambda x: x.reshape((n_dev, GLOBAL_BATCH // n_dev) + x.shape[1:]),
      _batch(GLOBAL_BATCH))
  rstate = parallel_lib.replicate(state, devices)
  for _ in range(steps):  # momentum and the step-folded key matter
    rstate, metrics = p_step(rstate, batch)
  return (parallel_lib.first_replica(rstate),
          parallel_lib.first_replica(metrics), variables)


@pytest.mark.parametrize('per_image,loss_fn,n_dev,k', [
    # Per image (dropout keyed by the global image index): exactly equal,
    # also when the micro-batches sit on two devices.
    (True, th.toy_loss, 1, 4),
    (True, th.toy_loss, 2, 2),
    # Per device batch: equal when the loss is a batch mean without a key.
    (False, mean_loss_without_dropout, 1, 4),
], ids=['per_image-1dev-k4', 'per_image-2dev-k2',
        'per_batch_mean-1dev-k4'])
def test_k_micro_batches_give_the_update_of_one_batch(per_image, loss_fn,
                                                      n_dev, k):
  want_state, want_m, variables = _run(loss_fn, per_image, 1, 1)  # cached
  got_state, got_m, _ = _run(loss_fn, per_image, n_dev, k)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(want_state.params), jax.tree.leaves(variables['params'])))
  assert moved > 1e-3, moved  # 1000 x ATOL: the steps did something
  for a, b in zip(jax.tree.leaves(got_state.params),
                  jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
  # One optimiser step, one schedule step, per global batch.
  assert int(got_state.step) == int(want_state.step) == 2
  for key in ('loss', 'err_x', 'err_y', 'grad_norm', 'lr'):
    np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-5,
                               err_msg=key)


def test_the_micro_batches_are_a_scan_not_a_python_loop():
  """The loss is traced once for k = 4: one compiled body, run 4 times."""
  traces = []

  def counting_loss(*args):
    traces.append(1)
    return th.toy_loss(*args)

  _run.__wrapped__(counting_loss, True, 1, 4, steps=1)
  assert len(traces) == 1


def test_grad_accum_must_divide_the_per_device_batch():
  step_lib.check_grad_accum(4, 2)
  step_lib.check_grad_accum(4, 1)
  for per_device, k in ((4, 3), (2, 4), (4, 0)):
    with pytest.raises(ConfigError, match='train.grad_accum_steps'):
      step_lib.check_grad_accum(per_device, k)
  c = th.toy_config(grad_accum_steps=3)  # global batch 8
  with pytest.raises(ConfigError, match='train.grad_accum_steps=3'):
    config_lib.resolve(c, num_classes=2)
  with pytest.raises(ConfigError, match='train.grad_accum_steps'):
    _run.__wrapped__(th.toy_loss, True, 1, 3, steps=1)  # 8 images per device, k = 3


def test_the_training_loop_passes_the_key(tmp_path):
  """run_training with train.grad_accum_steps=2 (16 images on the 8 test
  devices, one per micro-batch; the loss on the micro-batch, no dropout)
  feeds the loss micro-batches, logs one row per global batch and ends where
  k = 1 ends."""
  import json  # pylint: disable=g-import-not-at-top
  finals, seen = {}, {1: set(), 2: set()}
  for k in (1, 2):
    def loss_fn(params, frozen, batch, rng, k=k):
      seen[k].add(batch['image'].shape[0])  # at trace time
      return mean_loss_without_dropout(params, frozen, batch, rng)
    config = th.toy_config(total_steps=2, grad_accum_steps=k, batch_size=16,
                           loss_per_image=False)
    finals[k], _ = th.run_toy(tmp_path / str(k), config, loss_fn=loss_fn)
    with open(tmp_path / str(k) / 'metrics.jsonl') as f:
      assert [json.loads(line)['step'] for line in f] == [1, 2]
  assert seen == {1: {2}, 2: {1}}
  for a, b in zip(jax.tree.leaves(finals[2].params),
                  jax.tree.leaves(finals[1].params)):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
