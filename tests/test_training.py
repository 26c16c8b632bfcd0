"""Tests of mimicdet_jax.training on a small Flax model (tests/train_helper.py).

The MimicDet end-to-end runs are in tests/test_multihost.py and the slow
tests at the bottom of this file.
"""
import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mimicdet_jax.training import launch
from mimicdet_jax.training import loop as loop_lib
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib
from tests import train_helper as th
from tests import subprocess_env


# ------------------------------------------------------------------ schedule
def _detectron2_lr(step, peak, warmup_steps, warmup_factor, milestones, gamma):
  """Detectron2 WarmupMultiStepLR (linear), written out independently."""
  if step < warmup_steps:
    alpha = step / warmup_steps
    factor = warmup_factor * (1 - alpha) + alpha
  else:
    factor = 1.0
  decays = sum(1 for m in milestones if step >= m)
  return peak * factor * gamma ** decays


def test_lr_schedule_matches_warmup_multistep_reference():
  c = th.toy_config()
  c.optim.base_lr = 0.02
  c.optim.base_batch_size = 16
  c.train.batch_size = 32  # linear scaling: peak 0.04
  c.optim.warmup_steps = 10
  c.optim.warmup_factor = 0.001
  c.optim.decay_steps = (30, 45)
  c.optim.decay_factor = 0.1
  schedule = optim.make_lr_schedule(c)
  for step in [0, 1, 5, 9, 10, 11, 29, 30, 31, 44, 45, 100]:
    want = _detectron2_lr(step, 0.04, 10, 0.001, (30, 45), 0.1)
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5,
                               err_msg=f'step {step}')


# ----------------------------------------------------------------- optimiser
def _toy_params():
  rng = np.random.default_rng(0)
  return {
      'backbone': {'stem': {'kernel': rng.normal(size=(3, 3, 2, 4)),
                            'bias': rng.normal(size=(4,))},
                   'layer2': {'kernel': rng.normal(size=(3, 3, 4, 4)),
                              'bias': rng.normal(size=(4,))}},
      'head': {'kernel': rng.normal(size=(4, 2)),
               'norm_scale': rng.normal(size=(2,))},
  }


def _frozen(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: p[1].key == 'stem' if len(p) > 1 else False, params)


@pytest.mark.parametrize('clip', [0.0, 0.5])
def test_optimizer_matches_pytorch_sgd_reference(clip):
  c = th.toy_config()
  c.optim.base_lr = 0.1
  c.optim.base_batch_size = 8
  c.train.batch_size = 8
  c.optim.warmup_steps = 2
  c.optim.warmup_factor = 0.1
  c.optim.decay_steps = (3,)
  c.optim.decay_factor = 0.5
  c.optim.weight_decay = 0.01
  c.optim.momentum = 0.9
  c.optim.grad_clip_norm = clip
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), _toy_params())
  mask = _frozen(params)
  tx = optim.make_optimizer(c, mask)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  # Frozen leaves hold no optimiser state: the state is the momentum of the
  # trainable leaves plus scalar counters.
  n_trainable = sum(x.size for x, f in zip(jax.tree.leaves(params),
                                           jax.tree.leaves(mask)) if not f)
  n_state = sum(np.size(x) for x in jax.tree.leaves(opt_state)
                if np.size(x) > 1)
  assert n_state == n_trainable

  # NumPy reference: torch.optim.SGD(momentum, weight_decay per group) with
  # clip_grad_norm_ over the trainable leaves.
  ref = {k: np.array(v, np.float64) for k, v in
         zip(range(len(jax.tree.leaves(params))), jax.tree.leaves(params))}
  frozen = jax.tree.leaves(mask)
  buf = {k: np.zeros_like(v) for k, v in ref.items()}
  lrs = [_detectron2_lr(t, 0.1, 2, 0.1, (3,), 0.5) for t in range(5)]
  p = params
  rng = np.random.default_rng(1)
  for t in range(5):
    grads = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    g_leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    if clip:
      norm = np.sqrt(sum(np.sum(g**2) for g, f in zip(g_leaves, frozen)
                         if not f))
      g_leaves = [g * min(1.0, clip / norm) for g in g_leaves]
    for k, g in enumerate(g_leaves):
      if frozen[k]:
        continue
      if ref[k].ndim > 1:
        g = g + 0.01 * ref[k]
      buf[k] = 0.9 * buf[k] + g
      ref[k] = ref[k] - lrs[t] * buf[k]
    updates, opt_state = update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
  for k, leaf in enumerate(jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(leaf), ref[k], rtol=1e-5, atol=1e-6)
  # Frozen leaves did not move at all.
  for leaf, orig, f in zip(jax.tree.leaves(p), jax.tree.leaves(params), frozen):
    if f:
      np.testing.assert_array_equal(np.asarray(leaf), orig)


# ----------------------------------------------------------- pmapped step
def _step_fn(config, variables, per_image=True):
  mask = th.toy_frozen_mask(variables['params'])
  state, tx = state_lib.create_train_state(config, variables, mask,
                                           jax.random.PRNGKey(3))
  step = step_lib.make_train_step(
      th.toy_loss, tx, mask, loss_per_image=per_image,
      lr_schedule=optim.make_lr_schedule(config))
  return state, step


def _batch(n, nan_index=-1):
  ex = [th._example(i, nan_from=-1) for i in range(n)]
  batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
  if nan_index >= 0:
    batch['image'][nan_index, 1, 1, 1] = np.nan
  return batch


def test_eight_devices_batch_one_equals_one_device_batch_eight():
  assert jax.local_device_count() >= 8, 'conftest sets 8 CPU devices'
  config = th.toy_config()
  variables = th.toy_variables()
  state, step = _step_fn(config, variables)
  batch = _batch(8)
  results = {}
  for n_dev in (8, 1):
    devices = jax.local_devices()[:n_dev]
    p_step = parallel_lib.pmap_train_step(step, devices=devices)
    split = jax.tree.map(lambda x: x.reshape((n_dev, 8 // n_dev) + x.shape[1:]),
                         batch)
    rstate = parallel_lib.replicate(state, devices)
    for _ in range(2):  # two steps: momentum and the folded key matter
      rstate, metrics = p_step(rstate, split)
    results[n_dev] = (parallel_lib.first_replica(rstate),
                      parallel_lib.first_replica(metrics))
  p8, m8 = results[8]
  p1, m1 = results[1]
  moved = [np.max(np.abs(a - b)) for a, b in zip(
      jax.tree.leaves(p8.params), jax.tree.leaves(variables['params']))]
  assert max(moved) > 1e-3  # the step did something
  for a, b in zip(jax.tree.leaves(p8.params), jax.tree.leaves(p1.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)


def test_replicas_agree_and_dropout_uses_the_key():
  config = th.toy_config()
  variables = th.toy_variables()
  state, step = _step_fn(config, variables)
  p_step = parallel_lib.pmap_train_step(step)
  batch = jax.tree.map(lambda x: x.reshape((8, 1) + x.shape[1:]), _batch(8))
  rstate, _ = p_step(parallel_lib.replicate(state), batch)
  for leaf in jax.tree.leaves(rstate.params):
    arr = np.asarray(leaf)
    np.testing.assert_array_equal(arr, np.broadcast_to(arr[0], arr.shape))
  # Same batch, another base key: a different dropout mask, other params.
  state2 = state.replace(rng=np.asarray(jax.random.PRNGKey(4), np.uint32))
  rstate2, _ = p_step(parallel_lib.replicate(state2), batch)
  diff = max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(
      jax.tree.leaves(rstate.params), jax.tree.leaves(rstate2.params)))
  assert diff > 1e-6


def test_nonfinite_step_is_skipped_and_counted():
  config = th.toy_config()
  variables = th.toy_variables()
  state, step = _step_fn(config, variables)
  p_step = parallel_lib.pmap_train_step(step, devices=jax.local_devices()[:2])
  shape = lambda b: jax.tree.map(lambda x: x.reshape((2, 4) + x.shape[1:]), b)
  rstate = parallel_lib.replicate(state, jax.local_devices()[:2])
  rstate, _ = p_step(rstate, shape(_batch(8)))
  before = parallel_lib.first_replica(rstate)
  # One NaN pixel in one image on one device poisons the averaged loss.
  rstate, m = p_step(rstate, shape(_batch(8, nan_index=6)))
  after = parallel_lib.first_replica(rstate)
  m = parallel_lib.first_replica(m)
  assert m['finite'] == 0 and not np.isfinite(m['loss'])
  assert int(after.step) == 2
  assert int(after.nonfinite_streak) == 1 and int(after.nonfinite_total) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  rstate, m = p_step(rstate, shape(_batch(8)))
  final = parallel_lib.first_replica(rstate)
  assert int(final.nonfinite_streak) == 0 and int(final.nonfinite_total) == 1
  assert parallel_lib.first_replica(m)['finite'] == 1
  assert not np.array_equal(jax.tree.leaves(final.params)[-1],
                            jax.tree.leaves(after.params)[-1])


# ------------------------------------------------------ pmap vs shard_map
def _relative_gap(a, b) -> float:
  """max |a - b| / max |b| over a leaf (0 for two zero leaves)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _train_steps(parallel, state, step, batch, n_dev, steps=3):
  """`steps` steps on the same global batch; (host state, host metrics list)."""
  wrapped = parallel.wrap(step)
  split = jax.tree.map(lambda x: x.reshape((n_dev, 8 // n_dev) + x.shape[1:]),
                       batch)
  dstate, metrics = parallel.put_state(state), []
  for _ in range(steps):  # momentum, the step key and the lr schedule matter
    dstate, m = wrapped(dstate, parallel.put_batch(split))
    metrics.append(parallel.host(m))
  return parallel.host(dstate), metrics


def test_shard_map_equals_pmap_on_eight_devices():
  """One per-device step under jit(shard_map) and under pmap: same numbers.

  No warm-up and lr 0.05, so a step moves the weights by ~1e-2 and a wrong
  gradient average (no mean, or shard_map's own sum on top of the mean)
  shows far above the 1e-6 tolerance. The 1-device pmap run on the whole
  batch is the reference that needs no cross-device mean at all.
  """
  config = th.toy_config()
  config.optim.warmup_steps = 0
  variables = th.toy_variables()
  state, step = _step_fn(config, variables)
  batch = _batch(8)
  devices = jax.local_devices()[:8]
  runs = {
      'pmap': _train_steps(parallel_lib.DataParallel('pmap', devices), state,
                           step, batch, 8),
      'shard_map': _train_steps(parallel_lib.DataParallel('shard_map', devices),
                                state, step, batch, 8),
      'one_device': _train_steps(
          parallel_lib.DataParallel('pmap', devices[:1]), state, step, batch, 1),
  }
  (sp, sm), (pp, pm) = runs['shard_map'], runs['pmap']
  moved = max(np.max(np.abs(a - b)) for a, b in zip(
      jax.tree.leaves(pp.params), jax.tree.leaves(variables['params'])))
  assert moved > 1e-2
  for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(pp)):
    assert _relative_gap(a, b) <= 1e-6
  for a, b in zip(sm, pm):
    assert a.keys() == b.keys()
    for k in a:
      assert _relative_gap(a[k], b[k]) <= 1e-6, k
  op, om = runs['one_device']
  for a, b in zip(jax.tree.leaves(sp.params), jax.tree.leaves(op.params)):
    assert _relative_gap(a, b) <= 1e-5
  np.testing.assert_allclose([m['loss'] for m in sm],
                             [m['loss'] for m in om], rtol=1e-6)


def test_unknown_parallelism_names_the_key():
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = th.toy_config(parallelism='pjit')
  with pytest.raises(ValueError, match=r"train\.parallelism='pjit'.*'pmap', "
                     r"'shard_map'"):
    config_lib.resolve(config, num_classes=3)


def test_cpu_allocation_hint_names_mimalloc_where_the_wheel_is():
  lib = '/venv/site-packages/cmeel.prefix/lib/libmimalloc.so'
  hint = launch.cpu_allocation_hint('cpu', {}, 'glibc', under_mimalloc=False,
                                    mimalloc_lib=lib)
  assert 'mimicdet_jax.cpu_alloc' in hint and 'mimalloc' in hint
  # No tip when the process already runs under it, or not on CPU.
  assert launch.cpu_allocation_hint('cpu', {}, 'glibc', under_mimalloc=True,
                                    mimalloc_lib=lib) is None
  assert launch.cpu_allocation_hint('gpu', {}, 'glibc', under_mimalloc=False,
                                    mimalloc_lib=lib) is None


def test_cpu_allocation_hint_without_mimalloc_is_the_glibc_tunable():
  hint = functools.partial(launch.cpu_allocation_hint, under_mimalloc=False,
                           mimalloc_lib='')
  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in hint('cpu', {}, 'glibc')
  # No tip where no glibc reads the variable (macOS, musl).
  assert hint('cpu', {}, libc='') is None
  assert hint('cpu', {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},
              'glibc') is None  # a choice
  assert hint('cpu', {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1:glibc.x=1'},
              'glibc') is None
  assert hint('gpu', {}, 'glibc') is None
  # What the Makefile exports is what the hint names.
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         'Makefile')) as f:
    assert (f'export GLIBC_TUNABLES ?= {launch.HUGETLB_TUNABLE}\n'
            in f.read())


# --------------------------------------------------------------- the loop
def _run(workdir, config, *, nan_from=-1, on_step_end=None):
  return th.run_toy(workdir, config, nan_from=nan_from,
                    on_step_end=on_step_end)[0]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The toy run of 6 steps (pmap) that the resume tests must reproduce:
  (final state, its workdir), computed once for them (read only)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  return _run(workdir, th.toy_config(total_steps=6)), workdir


def test_resume_in_process_equals_uninterrupted(tmp_path, uninterrupted):
  full, full_dir = uninterrupted
  part = tmp_path / 'part'
  first = _run(part, th.toy_config(total_steps=3))
  assert int(first.step) == 3
  resumed = _run(part, th.toy_config(total_steps=6))
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  losses = lambda d: [(r['step'], r['loss']) for r in _metrics(d)]
  assert losses(part) == losses(full_dir)
  assert [r['step'] for r in _metrics(part)] == [1, 2, 3, 4, 5, 6]
  # keep_checkpoints=3, checkpoint_every=2, plus the final step 3 of run 1.
  assert sorted(os.listdir(part / 'checkpoints'))[-3:] == ['3', '4', '6']


def _run_from_step4(workdir, uninterrupted_dir, config, **kwargs):
  """One toy step from the uninterrupted run's checkpoint at step 4."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(os.path.join(uninterrupted_dir, 'checkpoints', '4'),
                  os.path.join(workdir, 'checkpoints', '4'))
  return th.run_toy(workdir, config, **kwargs)[0]


def test_s_head_finishing_step_trains_that_module_alone(tmp_path,
                                                        uninterrupted):
  """train.s_head_finish_steps: the last step trains only the module the
  caller names ('head' here), its lr x s_head_finish_lr_mult. Against the
  joint step from the same checkpoint (SGD with momentum, elementwise): the
  head's change is exactly twice the joint step's, the backbone's zero."""
  _, full_dir = uninterrupted
  joint = _run_from_step4(tmp_path / 'joint', full_dir,
                          th.toy_config(total_steps=5))
  finish = _run_from_step4(
      tmp_path / 'finish', full_dir,
      th.toy_config(total_steps=5, s_head_finish_steps=1,
                    s_head_finish_lr_mult=2.0), finish_module='head')
  before = th.flat_params(th.toy_variables()['params'])  # names only
  at4 = _restore_params(full_dir, 4)
  joint_p, finish_p = th.flat_params(joint.params), th.flat_params(finish.params)
  for name in before:
    if name.startswith('head/'):
      np.testing.assert_allclose(finish_p[name] - at4[name],
                                 2.0 * (joint_p[name] - at4[name]),
                                 rtol=1e-5, atol=1e-7)
      assert np.abs(joint_p[name] - at4[name]).max() > 0, name
    else:
      np.testing.assert_array_equal(finish_p[name], at4[name])
      if not name.startswith('backbone/stem'):  # frozen
        assert np.abs(joint_p[name] - at4[name]).max() > 0, name
  assert _metrics(tmp_path / 'finish')[-1]['loss'] == pytest.approx(
      _metrics(tmp_path / 'joint')[-1]['loss'], rel=1e-6)


def _restore_params(workdir, step):
  from mimicdet_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  config = th.toy_config(total_steps=6)
  variables = th.toy_variables()
  mask = th.toy_frozen_mask(variables['params'])
  template, _ = state_lib.create_train_state(config, variables, mask,
                                             jax.random.PRNGKey(0))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     save_every=2, keep=3)
  try:
    return th.flat_params(ckpt.restore(step, template, None).params)
  finally:
    ckpt.close()


def test_s_head_finish_steps_are_checked():
  from mimicdet_jax import config_lib, errors  # pylint: disable=g-import-not-at-top
  for bad in (6, -1):
    with pytest.raises(errors.ConfigError, match='train.s_head_finish_steps'):
      config_lib.resolve(th.toy_config(total_steps=6, s_head_finish_steps=bad), 2)
  with pytest.raises(errors.ConfigError, match='s_head_finish_lr_mult'):
    config_lib.resolve(th.toy_config(s_head_finish_lr_mult=0.0), 2)


@pytest.mark.parametrize('first,second', [('pmap', 'shard_map'),
                                           ('shard_map', 'pmap')])
def test_resume_across_parallelisms_equals_uninterrupted(tmp_path, first,
                                                         second,
                                                         uninterrupted):
  """Checkpoints hold host arrays: a run resumes under the other wrapper."""
  full, full_dir = uninterrupted
  part = tmp_path / 'part'
  _run(part, th.toy_config(total_steps=3, parallelism=first))
  resumed = _run(part, th.toy_config(total_steps=6, parallelism=second))
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
    assert _relative_gap(a, b) <= 1e-6
  for got, want in zip(_metrics(part), _metrics(full_dir)):
    assert got['step'] == want['step']
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)


def test_nan_batches_stop_training_with_a_message(tmp_path):
  config = th.toy_config(total_steps=20, max_consecutive_nonfinite=3,
                         log_every=1)
  # Examples >= 16 are NaN: with batch 8, steps 3, 4, 5, ... are poisoned.
  with pytest.raises(loop_lib.NonFiniteLossError) as err:
    _run(tmp_path, config, nan_from=16)
  msg = str(err.value)
  assert 'step 5' in msg and '3 consecutive' in msg and '(steps 3..5)' in msg
  assert 'loss=nan' in msg and 'err_x=' in msg and 'err_y=' in msg
  rows = _metrics(tmp_path)
  assert [r['nonfinite_total'] for r in rows] == [0, 0, 1, 2, 3]
  assert [r['nonfinite_steps'] for r in rows] == [0, 0, 1, 1, 1]


def test_dead_unit_monitor_once_per_layer_at_the_threshold():
  from mimicdet_jax.losses import total  # pylint: disable=g-import-not-at-top
  monitor = total.DeadUnitMonitor()
  # E18's collapsed proxy run: the T-head's units all dead, the S-head's not.
  got = monitor(450, {'t_reg_alive': 0.0, 's_reg_alive': 0.141})
  assert len(got) == 1
  assert got[0].startswith('step 450: t_reg_alive=0.000: ')
  assert "the T-head's regression features" in got[0]
  # Reported once; the S-head's at the threshold (1 % alive) is dead too.
  got = monitor(500, {'t_reg_alive': 0.0, 's_reg_alive': 0.01})
  assert [m.split(':')[0] for m in got] == ['step 500']
  assert 's_reg_alive=0.010' in got[0]
  assert not monitor(550, {'t_reg_alive': 0.0, 's_reg_alive': 0.0})
  # Just above the threshold, or a loss without the diagnostics: nothing.
  assert not total.DeadUnitMonitor()(1, {'t_reg_alive': 0.011})
  assert not total.DeadUnitMonitor()(1, {'loss': 0.0})


def test_training_runs_the_monitors_its_caller_passes(tmp_path, capsys):
  """The loop knows no model's diagnostics: it warns what the monitors
  it is given return (launch.py passes the loss's DeadUnitMonitor), and
  nothing without them."""
  from mimicdet_jax.losses import total  # pylint: disable=g-import-not-at-top

  def loss_with_monitors(params, frozen, batch, rng):
    loss, aux = th.toy_loss(params, frozen, batch, rng)
    return loss, dict(aux, t_reg_alive=jnp.zeros(()),
                      s_reg_alive=jnp.full((), 0.5))

  seen = []
  def recording(step, scalars):
    seen.append((step, sorted(scalars)))
    return [f'step {step}: recorded'] if step == 2 else []

  config = th.toy_config(total_steps=4, log_every=1)
  th.run_toy(tmp_path / 'with', config, loss_fn=loss_with_monitors,
             monitors=[total.DeadUnitMonitor(), recording])
  out = capsys.readouterr().out
  # The first window shows it, once; the live layer is not named.
  assert out.count('WARNING: step 1: t_reg_alive=0.000') == 1
  assert out.count('t_reg_alive=') == 1 and 's_reg_alive=' not in out
  assert out.count('WARNING: step 2: recorded') == 1
  assert [s for s, _ in seen] == [1, 2, 3, 4]
  assert {'loss', 't_reg_alive', 'err_x', 'lr'} <= set(seen[0][1])
  assert [r['t_reg_alive'] for r in _metrics(tmp_path / 'with')] == [0.0] * 4
  th.run_toy(tmp_path / 'without', config, loss_fn=loss_with_monitors)
  assert 'WARNING' not in capsys.readouterr().out


def test_sigterm_saves_at_the_next_step_boundary(tmp_path):
  def on_step_end(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  config = th.toy_config(total_steps=20, checkpoint_every=10)
  previous = signal.getsignal(signal.SIGTERM)
  final = _run(tmp_path, config, on_step_end=on_step_end)
  # The signal arrives after step 3's stop check: step 4 is the next boundary.
  assert int(final.step) == 4
  assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')) == [4]
  assert signal.getsignal(signal.SIGTERM) == previous  # handler restored


# -------------------------------------------------- compilation cache
_CACHE_PROBE = """
import sys, jax, jax.numpy as jnp
from mimicdet_jax.training import launch
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name))
print(launch.enable_compile_cache(sys.argv[1], sys.argv[2]))
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()
print('HITS', hits.count('/jax/compilation_cache/cache_hits'))
"""


def test_compile_cache_second_process_loads_instead_of_compiling(tmp_path):
  """A relative train.compile_cache lives under the workdir; a second process
  with the same config finds its executables there. '' leaves it off."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo)
  run = lambda cache: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, '-c', _CACHE_PROBE, cache, str(tmp_path)], env=env,
      cwd=repo, capture_output=True, text=True, check=True).stdout.split('\n')
  first, second = run('jax_cache'), run('jax_cache')
  assert first[0] == second[0] == str(tmp_path / 'jax_cache')
  assert first[1] == 'HITS 0' and second[1] != 'HITS 0', (first, second)
  assert os.listdir(tmp_path / 'jax_cache')
  assert launch.enable_compile_cache('', str(tmp_path)) is None


# ------------------------------------------------------ MimicDet (slow, CPU)
@pytest.fixture(scope='module')
def synthetic_data(tmp_path_factory):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp('synthetic')
  subprocess.run([sys.executable, '-m', 'mimicdet_jax.data.synthetic',
                  str(out), '--num-train', '16', '--num-val', '2', '--seed',
                  '0'], check=True)
  return out


@pytest.mark.slow
def test_mimicdet_eight_devices_batch_one_equals_one_device_batch_eight(
    synthetic_data, tmp_path):
  """Acceptance (a) on the real model, losses and data pipeline.

  SGD (the paper's optimiser) at lr 0.01 from the first step (no warm-up):
  the update is lr x the averaged gradient, so the parameters compare the
  gradients themselves, and a replica that stepped on its own image's
  gradient (no pmean) is off by far more than the tolerance. (AdamW's first
  step, g / (|g| + eps), amplifies rounding in near-zero gradients.)
  """
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.losses import total  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top

  config = th.demo_config(str(synthetic_data), batch_size=8)
  config.optim.optimizer = 'sgd'
  config.optim.base_lr = 0.02  # x batch 8 / 16: lr 0.01 from the first step
  config.optim.warmup_steps = 0
  source = pipeline.build_source(config.data, 'train')
  config = config_lib.resolve(config, source.num_classes)
  batch = next(iter(pipeline.make_train_loader(
      config, source, num_local_devices=1, process_index=0, process_count=1)))
  model = mimicdet.MimicDet(config)
  variables = state_lib.init_variables(config, model, jax.random.PRNGKey(0))
  mask = backbones.frozen_param_mask(variables['params'],
                                     config.model.backbone.frozen_stages)
  state, tx = state_lib.create_train_state(config, variables, mask,
                                           jax.random.PRNGKey(1))
  step = step_lib.make_train_step(total.make_loss_fn(model, config), tx, mask,
                                   loss_per_image=True)
  finals = {}
  for n_dev in (8, 1):
    devices = jax.local_devices()[:n_dev]
    split = jax.tree.map(
        lambda x: x.reshape((n_dev, 8 // n_dev) + x.shape[2:]), batch)
    rstate, metrics = parallel_lib.pmap_train_step(step, devices)(
        parallel_lib.replicate(state, devices), split)
    finals[n_dev] = parallel_lib.first_replica((rstate.params, metrics))
  (p8, m8), (p1, m1) = finals[8], finals[1]
  assert m8['finite'] == 1
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  lr = optim.peak_learning_rate(config)
  assert lr == pytest.approx(0.01)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(p8), jax.tree.leaves(variables['params'])))
  assert moved > 1e-3  # 100 x the tolerance
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize('key,value,rtol', [
    ('train.parallelism', 'shard_map', 1e-5),
    ('t_head.roi_align_impl', 'einsum', 1e-4)])
def test_mimicdet_variant_equals_default_over_logged_steps(
    synthetic_data, tmp_path, key, value, rtol):
  """The demo model and data on 8 devices, 3 steps at full lr: the same
  losses and parameters with the variant as with the default."""
  finals, rows = {}, {}
  for name in ('default', value):
    config = th.demo_config(str(synthetic_data), batch_size=8, total_steps=3)
    config.optim.warmup_steps = 0
    # AdamW at 1e-3 per 4 images, one group: the lr these bounds were set
    # at. AdamW moves every parameter by ~lr whatever its gradient, so the
    # rounding-level differences of near-zero gradients grow the parameter
    # difference with the lr (the demo's 3e-3 gives 1.5e-4 relative for the
    # einsum RoIAlign, whose losses still agree to 1e-4).
    config.optim.base_lr = 4e-3
    config.optim.t_head_lr_mult = 1.0
    if name == value:
      section, field = key.split('.')
      config[section][field] = value
    finals[name], _ = th.run_demo(tmp_path / name, config)
    rows[name] = _metrics(tmp_path / name)
  assert [r['step'] for r in rows[value]] == [1, 2, 3]
  for got, want in zip(rows[value], rows['default']):
    for k in ('loss', 'loss_refine_cls', 'loss_t_cls', 'loss_t_reg',
              'loss_s_cls', 'loss_mimic'):
      np.testing.assert_allclose(got[k], want[k], rtol=rtol, err_msg=k)
    # The demo's AdamW divides by sqrt(v): the ~1e-6 differences of the
    # near-zero gradients become visible in later steps' gradient norm
    # (einsum: 1.3e-4 at step 3), not in the losses.
    np.testing.assert_allclose(got['grad_norm'], want['grad_norm'],
                               rtol=10 * rtol)
  # All parameters as one vector (leaves that start at zero, the biases, are
  # all update and no weight, so a per-leaf ratio means little under Adam).
  norm = lambda t: np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                               for x in jax.tree.leaves(t)))
  diff = jax.tree.map(lambda a, b: a - b, finals[value].params,
                      finals['default'].params)
  assert norm(diff) <= rtol * norm(finals['default'].params)


@pytest.mark.slow
def test_train_py_cli_two_steps_then_eval(synthetic_data, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  d = str(synthetic_data)
  flags = [
      f'--config.data.train_annotations={d}/annotations/train.json',
      f'--config.data.train_images={d}/train',
      f'--config.data.val_annotations={d}/annotations/val.json',
      f'--config.data.val_images={d}/val',
      '--config.data.train_min_sizes=(128,)', '--config.data.min_size=128',
      '--config.data.max_size=128', '--config.data.canvas_buckets=((128,128),)',
      '--config.proposals.pre_nms_topk=32', '--config.proposals.num_proposals=32',
      '--config.eval.pre_nms_topk=32', '--config.eval.at_end=True',
      '--config.eval.viz=0',
      '--config.train.batch_size=2', '--config.train.total_steps=2',
      '--config.train.log_every=1', '--config.train.checkpoint_every=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=subprocess_env.xla_flags(1))
  r = subprocess.run([sys.executable, 'train.py', '--config', 'configs/demo.py',
                      '--workdir', str(tmp_path), *flags], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-4000:]
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert saved['model']['num_classes'] >= 1  # resolved from the data
  assert saved['s_head']['num_logits'] == saved['model']['num_classes'] + 1
  rows = _metrics(tmp_path)
  assert [r['step'] for r in rows] == [1, 2]
  for key in ('loss', 'loss_refine_cls', 'loss_t_cls', 'loss_s_cls',
              'loss_mimic', 'lr', 'grad_norm', 'images_per_sec', 'step_time'):
    assert np.isfinite(rows[-1][key]), key
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert os.listdir(tmp_path / 'tensorboard')
  # eval.at_end: the eval library scored the final parameters.
  with open(tmp_path / 'eval' / 'metrics.json') as f:
    assert 0.0 <= json.load(f)['AP'] <= 1.0
