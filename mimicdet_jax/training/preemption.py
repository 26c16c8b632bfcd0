"""Preemption: SIGTERM / SIGINT, and the multi-host preemption sync point.

`StopSignal` (one process) and `PreemptionSync` (every process agrees on
the step) ask the loop to checkpoint and stop at the next step boundary.
"""
import signal

from absl import logging


class StopSignal:
  """Turns SIGTERM / SIGINT into a request to stop at the next step boundary.

  Only for single-process runs: in a multi-process run every process must
  stop at the same step, which JAX's preemption service provides
  (`multihost_utils.reached_preemption_sync_point`), and its SIGTERM
  notifier must not be replaced.
  """

  def __init__(self):
    self.requested = None  # the signal's name once received
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint at the next step '
                    'boundary, then stopping', self.requested)
    # A second signal acts immediately (default behaviour).
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class PreemptionSync:
  """All processes agree to stop at the same step after a preemption notice.

  Wraps `multihost_utils.reached_preemption_sync_point`; where JAX runs no
  preemption service (it raises), it is disabled after the first call.
  """

  def __init__(self):
    self.available = True

  def __call__(self, step: int) -> bool:
    if not self.available:
      return False
    try:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('no preemption service (%s): SIGTERM is not handled '
                      'gracefully in this multi-process run', e)
      self.available = False
      return False
