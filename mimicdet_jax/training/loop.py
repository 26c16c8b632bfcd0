"""The training loop: resume, step, log, check, checkpoint, evaluate, stop.

`run_training` trains until train.total_steps from WORKDIR/checkpoints;
`summarize_window` averages the fetched metrics of a log window, which the
caller's `monitors` read (warnings, e.g. dead ReLUs);
`NonFiniteLossError` ends a run after too many skipped steps in a row.
"""
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from mimicdet_jax import checkpoint as checkpoint_lib
from mimicdet_jax import errors
from mimicdet_jax.training import metrics as metrics_lib
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import preemption
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib

PyTree = Any


def summarize_window(window: list[dict], elapsed: float,
                     global_batch: int) -> dict:
  """Averages fetched per-step metrics over the finite steps of a window.

  Counters and lr are taken from the last step; images_per_sec and
  step_time from the wall time of the window (the first window includes
  compilation).
  """
  last = window[-1]
  finite = [m for m in window if m['finite'] > 0]
  out = {}
  for k in last:
    if k in ('finite', 'nonfinite_streak', 'nonfinite_total', 'lr'):
      continue
    out[k] = (float(np.mean([m[k] for m in finite])) if finite
              else float(last[k]))
  out['lr'] = float(last['lr'])
  out['nonfinite_steps'] = float(len(window) - len(finite))
  out['nonfinite_total'] = float(last['nonfinite_total'])
  out['step_time'] = elapsed / len(window)
  out['images_per_sec'] = global_batch * len(window) / max(elapsed, 1e-9)
  return out


# A monitor: monitor(step, scalars) -> warnings, called with each log
# window's averaged metrics (`summarize_window`). The loop knows only that
# dict; what a model wants watched, and what to say, is its caller's
# (training/launch.py passes the loss's, losses/total.py `DeadUnitMonitor`).
Monitor = Callable[[int, Mapping[str, float]], Sequence[str]]


class NonFiniteLossError(errors.UserError, RuntimeError):
  """Raised after train.max_consecutive_nonfinite skipped steps in a row.

  A UserError (the fix is in the config or data: lower the lr, clip the
  gradients): train.py reports it as one line and exits with status 1.
  """


def run_training(config: ml_collections.ConfigDict, workdir: str, *,
                 variables: Mapping[str, PyTree],
                 frozen_mask: PyTree,
                 loss_fn: step_lib.LossFn,
                 train_iter: Iterator[Mapping[str, np.ndarray]],
                 eval_fn: Optional[Callable[[PyTree, int], Any]] = None,
                 on_step_end: Optional[Callable[[int], None]] = None,
                 monitors: Sequence[Monitor] = (),
                 finish_module: Optional[str] = None
                 ) -> state_lib.TrainState:
  """Trains until train.total_steps, resuming from WORKDIR/checkpoints.

  Args:
    config: the resolved config (train.*, optim.*, seed).
    workdir: output directory (checkpoints/, metrics.jsonl, tensorboard/).
    variables: initial {'params', 'frozen'} (overwritten by a checkpoint).
    frozen_mask: like variables['params'], True = not trained.
    loss_fn: see `step.LossFn`; called on one device's batch.
    train_iter: yields this process's batches, every leaf shaped
      [local_device_count, per_device_batch, ...]; must have
      get_state()/set_state() (a grain iterator) for exact resume.
    eval_fn: eval_fn(variables, step) -> metrics (process 0), run every
      train.eval_every steps and at the end when eval.at_end
      (process-collective), on the eval.weights (EMA or raw); with
      train.keep_best the best is kept in WORKDIR/checkpoints_best.
    on_step_end: called with the step number after each step's bookkeeping.
    monitors: `Monitor`s, run on every log window; each warning they return
      is logged and shown on the progress bar.
    finish_module: the top-level params key that the last
      train.s_head_finish_steps steps train alone (`step.make_train_step`'s
      only_module; the caller's model names it).

  Returns:
    The final TrainState as host arrays (replica 0).

  Raises:
    NonFiniteLossError: train.max_consecutive_nonfinite skipped steps in a row.
  """
  t = config.train
  is_main = jax.process_index() == 0
  num_devices = jax.device_count()
  if t.batch_size % num_devices:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'the {num_devices} devices')
  step_lib.check_grad_accum(t.batch_size // num_devices, t.grad_accum_steps)

  state, tx = state_lib.create_train_state(config, variables, frozen_mask,
                                 jax.random.PRNGKey(config.seed))
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), save_every=t.checkpoint_every,
      keep=t.keep_checkpoints)
  best = (checkpoint_lib.BestCheckpoint(  # reads the stored best on resume
      os.path.join(workdir, checkpoint_lib.BEST_DIR), t.keep_best)
          if eval_fn is not None and t.keep_best and t.eval_every > 0 else None)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, state, train_iter)
    logging.info('resumed from step %d', latest)
  start_step = int(state.step)

  parallel = parallel_lib.DataParallel(t.parallelism)
  logging.info('train.parallelism=%s', t.parallelism)
  p_step = parallel.wrap(step_lib.make_train_step_for(config, loss_fn, tx,
                                                     frozen_mask))
  finish_from = t.total_steps - t.s_head_finish_steps
  if t.s_head_finish_steps and finish_module is None:
    raise errors.ConfigError(
        f'train.s_head_finish_steps={t.s_head_finish_steps}: this model names '
        'no module to finish alone')
  p_finish = (parallel.wrap(step_lib.make_train_step_for(
      config, loss_fn, tx, frozen_mask, only_module=finish_module))
              if t.s_head_finish_steps else None)
  rstate = parallel.put_state(state)
  del state

  writer = metrics_lib.MetricWriter(workdir, start_step, enabled=is_main)
  stop = preemption.StopSignal()
  multi_process = jax.process_count() > 1
  preemption_sync = preemption.PreemptionSync()
  if not multi_process:
    stop.install()
  check_every = max(1, min(t.log_every, t.max_consecutive_nonfinite))
  bar = tqdm.tqdm(total=t.total_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, disable=not is_main)
  window, last_metrics = [], None
  window_start = time.time()
  step = start_step
  try:
    while step < t.total_steps:
      batch = next(train_iter)
      step_fn = p_step if step < finish_from else p_finish
      rstate, last_metrics = step_fn(rstate, parallel.put_batch(batch))
      window.append(last_metrics)
      step += 1
      bar.update(1)
      is_last = step == t.total_steps

      if step % t.log_every == 0 or is_last:
        fetched = [parallel.host(m) for m in window]
        now = time.time()
        scalars = summarize_window(fetched, now - window_start, t.batch_size)
        writer.write(step, scalars)
        for message in (m for monitor in monitors
                        for m in monitor(step, scalars)):
          logging.warning(message)
          if is_main:
            bar.write('WARNING: ' + message)
        bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                        img_s=f"{scalars['images_per_sec']:.1f}")
        window, window_start = [], now

      if step % check_every == 0 or is_last:
        terms = parallel.host(last_metrics)
        streak = int(terms['nonfinite_streak'])
        if streak >= t.max_consecutive_nonfinite:
          msg = (f'training stopped at step {step}: {streak} consecutive '
                 f'non-finite losses (steps {step - streak + 1}..{step}); '
                 'loss terms at step {}: {}'.format(step, ', '.join(
                     f'{k}={float(v):.6g}' for k, v in sorted(terms.items()))))
          logging.error(msg)
          raise NonFiniteLossError(msg)

      stop_now = (stop.requested is not None if not multi_process
                  else preemption_sync(step))
      if step % t.checkpoint_every == 0 or is_last or stop_now:
        ckpt.save(step, parallel.host(rstate), train_iter,
                  force=is_last or stop_now)

      if eval_fn is not None and t.eval_every > 0 and (
          step % t.eval_every == 0) and not is_last:
        _evaluate(eval_fn, best, config.eval.weights, parallel.host(rstate),
                  step)

      if on_step_end is not None:
        on_step_end(step)
      if stop_now:
        logging.warning('stopped at step %d after a checkpoint', step)
        break

    final = parallel.host(rstate)
    if (eval_fn is not None and step == t.total_steps and
        step > start_step and (config.eval.at_end or t.eval_every > 0)):
      ckpt.wait()
      _evaluate(eval_fn, best, config.eval.weights, final, step)
    return final
  finally:
    bar.close()
    stop.uninstall()
    writer.close()
    ckpt.close()
    if best is not None:
      best.close()


def _evaluate(eval_fn, best, weights: str, state: state_lib.TrainState,
              step: int) -> None:
  """eval_fn on `state`'s eval.weights; `best` (or None) keeps the best."""
  metrics = eval_fn(checkpoint_lib.model_variables(state, weights)[0], step)
  if best is not None:
    best.update(step, metrics, state)
