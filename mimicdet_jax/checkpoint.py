"""Training checkpoints: one orbax CheckpointManager, two items per step.

A checkpoint directory `WORKDIR/checkpoints/<step>/` holds
  state/      the train state pytree (step, params, frozen, optimiser state,
              PRNG key, non-finite counters) as host NumPy arrays,
  data_iter/  the grain iterator state, one JSON file per process
              (`process_<i>-of-<n>.json`, grain's own orbax handler).

Atomicity comes from orbax: a step is written into a temporary directory
and renamed (committed) only when every item and every process finished, so
a process killed mid-save leaves a temporary directory that `latest_step`
ignores, never a checkpoint that restores wrongly. Saves are asynchronous:
`save` returns after the arrays are copied to host memory; the files are
written by a background thread while training continues.
"""
import json
import os
from typing import Any, Optional

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


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
    items = {'state': ocp.args.StandardRestore(template)}
    if data_iterator is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(
          _IteratorRestorer(data_iterator))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    _check_like(restored['state'], template, f'{self.directory}/{step}')
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    return restored['state']

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
