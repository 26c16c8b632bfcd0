"""Training checkpoints: one orbax CheckpointManager, two items per step.

A checkpoint directory `WORKDIR/checkpoints/<step>/` holds
  state/      the train state pytree (step, params, frozen, optimiser state,
              PRNG key, non-finite counters, EMA weights or None) as host
              NumPy arrays,
  data_iter/  the grain iterator state, one JSON file per process
              (`process_<i>-of-<n>.json`, grain's own orbax handler).

`BestCheckpoint` keeps the weights of the best evaluation so far in
`WORKDIR/checkpoints_best/<step>/` (train.keep_best), apart from the rotation
above; `model_variables` picks the raw or the EMA weights (eval.weights).

Atomicity comes from orbax: a step is written into a temporary directory
and renamed (committed) only when every item and every process finished, so
a process killed mid-save leaves a temporary directory that `latest_step`
ignores, never a checkpoint that restores wrongly. Saves are asynchronous:
`save` returns after the arrays are copied to host memory; the files are
written by a background thread while training continues.
"""
import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mimicdet_jax import errors
from mimicdet_jax.evaluation import coco

# eval.weights: which weights of a checkpoint detect (`model_variables`).
WEIGHTS = ('ema', 'raw')
# train.keep_best: '' (off) or the metrics.json key `BestCheckpoint` compares
# (every one of them is better higher).
KEEP_BEST = ('',) + coco.SUMMARY_KEYS
BEST_DIR = 'checkpoints_best'  # WORKDIR/checkpoints_best/<step>/ (BestCheckpoint)
BEST_FILE = 'best.json'  # WORKDIR/checkpoints_best/best.json: metric, value, step


def _field(state: Any, name: str) -> Any:
  """`name` of a TrainState or of a restored state dict; None when absent."""
  if isinstance(state, Mapping):
    return state.get(name)
  return getattr(state, name, None)


def model_variables(state: Any, weights: str = 'ema') -> tuple[dict, str]:
  """The model variables {'params', 'frozen'} of a train state, and which.

  Args:
    state: a TrainState or a restored state dict.
    weights: 'ema' (the EMA weights when the state has them, else the raw
      ones) | 'raw' (eval.weights).

  Returns:
    (variables, 'ema' or 'raw': the weights returned).
  """
  ema = _field(state, 'ema_params')
  used = weights_used(ema is not None, weights)
  params = ema if used == 'ema' else _field(state, 'params')
  return {'params': params, 'frozen': _field(state, 'frozen') or {}}, used


class _IteratorSnapshot:
  """The state of a grain iterator frozen at `save` time.

  Grain's handler calls `get_state()` when orbax runs it, which may be on a
  background thread after the training loop has already pulled more batches;
  handing it this snapshot instead records the position at the step saved.
  """

  def __init__(self, iterator: Any):
    state = iterator.get_state()
    # DataLoaderIterator states are bytes, DatasetIterator states are dicts;
    # grain's handler writes bytes for anything that is not a DatasetIterator.
    self._state = state if isinstance(state, bytes) else json.dumps(
        state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class _IteratorRestorer:
  """Forwards grain's handler's `set_state(bytes)` to the real iterator."""

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def set_state(self, state: bytes) -> None:
    # Hand the iterator the type its own get_state() returns.
    if isinstance(self.iterator.get_state(), bytes):
      self.iterator.set_state(state)
    else:
      self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self.iterator, 'start_prefetch'):
      self.iterator.start_prefetch()


def _check_like(restored: Any, template: Any, where: str) -> None:
  """Raises, naming every leaf, when shapes or dtypes differ from the template.

  Orbax restores the saved shape whatever the template says; a config change
  that alters a width would otherwise surface later as an obscure error.
  """
  problems = []
  got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  for path, want in jax.tree_util.tree_flatten_with_path(template)[0]:
    name = jax.tree_util.keystr(path)
    have = got.get(path)
    if have is None:
      problems.append(f'{name}: missing')
    elif np.shape(have) != np.shape(want) or (
        np.asarray(have).dtype != np.asarray(want).dtype):
      problems.append(f'{name}: checkpoint {np.shape(have)} '
                      f'{np.asarray(have).dtype}, model {np.shape(want)} '
                      f'{np.asarray(want).dtype}')
  if problems:
    raise ValueError(f'checkpoint {where} does not match this config '
                     f'({len(problems)} leaves):\n  ' + '\n  '.join(problems[:30]))


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs under a directory.

  Every process of a multi-host run must make the same calls in the same
  order (orbax synchronises them); the state arrays are written by the
  primary process, each process writes its own iterator state.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int,
               async_save: bool = True):
    """Args:
      directory: e.g. WORKDIR/checkpoints (created when missing).
      save_every: `save` without force writes only when step % save_every == 0.
      keep: the newest `keep` checkpoints are kept, older ones deleted.
      async_save: write files on a background thread.
    """
    self.directory = os.path.abspath(directory)
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)),
        enable_async_checkpointing=async_save,
        # Temporary directories of saves killed midway are deleted at start.
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data_iter': grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` (host arrays) and the iterator position.

    Args:
      step: the number of optimiser steps taken (the checkpoint's name).
      state: pytree of NumPy arrays (not mutated afterwards by the caller).
      data_iterator: the training iterator positioned after `step` batches;
        None saves no data state.
      force: save even when `step` is not a multiple of `save_every`.

    Returns:
      Whether a save was started.
    """
    # The interval is decided here, not by orbax (which would also save the
    # first step it sees).
    if not force and step % self.save_every:
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(
          _IteratorSnapshot(data_iterator))
    saved = self._manager.save(step, args=ocp.args.Composite(**items),
                               force=True)
    if saved:
      logging.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, state_template: Any,
              data_iterator: Any = None) -> Any:
    """Restores the state at `step`; repositions `data_iterator` in place.

    Args:
      step: a committed step (`latest_step()`).
      state_template: pytree with the structure, shapes and dtypes of the
        saved state (e.g. a freshly initialised state on the host).
      data_iterator: the iterator to reposition; None leaves data alone.

    Returns:
      The state as host NumPy arrays.
    """
    # NumPy scalars (np.int32(0)) are not a type orbax restores into.
    template = jax.tree.map(np.asarray, state_template)
    fields = self._saved_fields(step, template)
    items = {'state': ocp.args.StandardRestore(fields)}
    if data_iterator is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(
          _IteratorRestorer(data_iterator))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = (template.replace(**restored['state'])
             if dataclasses.is_dataclass(template)
             else {**template, **restored['state']})
    _check_like(state, template, f'{self.directory}/{step}')
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    return state

  def _saved_fields(self, step: int, template: Any) -> dict:
    """The template's top-level fields that checkpoint `step` holds.

    A field that is None in the template (no EMA) may be absent from a
    checkpoint written before it existed; one that holds arrays on one side
    only (optim.ema_decay changed between runs) is a ConfigError.
    """
    saved = dict(self._manager.item_metadata(step)['state'])
    fields = ({f.name: getattr(template, f.name)
               for f in dataclasses.fields(template)}
              if dataclasses.is_dataclass(template) else dict(template))
    for name, value in fields.items():
      has, had = bool(jax.tree.leaves(value)), bool(
          jax.tree.leaves(saved.get(name)))
      if has != had:
        raise errors.ConfigError(
            f'checkpoint {self.directory}/{step} {"has no" if has else "has"} '
            f'{name} and this config {"does" if has else "does not"} keep '
            f'them (optim.ema_decay changed since the run started?); use the '
            'run\'s setting or a new workdir')
    return {k: v for k, v in fields.items() if k in saved}

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def weights_used(has_ema: bool, weights: str) -> str:
  """'ema' when eval.weights asks for the EMA and there is one, else 'raw'."""
  if weights not in WEIGHTS:
    raise errors.ConfigError(f'eval.weights={weights!r}; expected one of '
                             f'{WEIGHTS}')
  return 'ema' if weights == 'ema' and has_ema else 'raw'


class BestCheckpoint:
  """The weights of the best evaluation so far, out of the rotation's reach.

  `directory` (WORKDIR/checkpoints_best) has its own orbax manager keeping
  one step, `<step>/` with
    state/  {'step', 'params', 'frozen', 'ema_params'} (what evaluation,
            predict and export read; no optimiser state),
    best/   {'metric', 'value', 'step'} as JSON, committed with the state,
  and `best.json` beside it, the same JSON for people and tools. The
  checkpoints of WORKDIR/checkpoints rotate in their own directory and never
  touch this one. A new best is committed before orbax deletes the old one,
  so a kill leaves one of them. A restarted run reads the stored best (the
  committed `best/` item) and keeps comparing with it. Every process of a
  multi-host run calls `update` (orbax synchronises the save); the metrics
  of process 0 decide.
  """

  def __init__(self, directory: str, metric: str):
    """Args:
      directory: e.g. WORKDIR/checkpoints_best (created when missing).
      metric: a metrics.json key, higher is better (train.keep_best).
    """
    self.directory = os.path.abspath(directory)
    self.metric = metric
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, cleanup_tmp_directories=True, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'best': ocp.JsonCheckpointHandler()})
    self.best: Optional[dict] = None
    step = self._manager.latest_step()
    if step is not None:
      best = self._manager.restore(
          step, args=ocp.args.Composite(best=ocp.args.JsonRestore()))['best']
      if best['metric'] == metric:
        self.best = best
      else:  # train.keep_best changed: the next evaluation replaces it
        logging.warning('best checkpoint: %s holds the best %s, not %s; the '
                        'next evaluation replaces it', self.directory,
                        best['metric'], metric)

  def update(self, step: int, metrics: Optional[Mapping[str, Any]],
             state: Any) -> bool:
    """Saves `state`'s weights when metrics[metric] beats the stored best.

    Args:
      step: the step evaluated.
      metrics: the evaluation's metrics (process 0; None elsewhere).
      state: the TrainState (host arrays) that was evaluated.

    Returns:
      Whether `step` is the new best. A tie keeps the earlier step; a step not
      after the stored best's (a run resumed from before it re-evaluates
      what it already judged) never replaces it.
    """
    if metrics is None and jax.process_count() == 1:
      return False  # an evaluation that returned nothing to judge
    value = float(metrics[self.metric]) if metrics is not None else 0.0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      value = float(multihost_utils.broadcast_one_to_all(np.float32(value)))
    if self.best is not None and not (value > self.best['value'] and
                                      step > self.best['step']):
      return False
    best = {'metric': self.metric, 'value': value, 'step': int(step)}
    weights = {name: _field(state, name)
               for name in ('step', 'params', 'frozen', 'ema_params')}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(weights), best=ocp.args.JsonSave(best)),
                       force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      path = os.path.join(self.directory, BEST_FILE)
      with open(path + '.tmp', 'w') as f:
        json.dump(best, f, indent=1)
      os.replace(path + '.tmp', path)
    logging.info('best checkpoint: step %d, %s %.4f, in %s', step,
                 self.metric, value, self.directory)
    self.best = best
    return True

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
