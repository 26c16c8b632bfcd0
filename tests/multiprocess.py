"""Runs a few local processes that meet at a jax.distributed coordinator.

Used by tests/test_multihost.py and tests/test_inference.py. Two hazards of
such tests are handled here, once:
- the free port is found by binding port 0 and closing the socket, so another
  program can take it before the coordinator binds it: a run whose output
  says the address was in use is retried on a new port;
- on a timeout (or any error) every child is killed and reaped, so a hung
  collective does not leave processes behind.
"""
import os
import socket
import subprocess
import sys
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PORT_TAKEN = ('address already in use', 'failed to add port',
               'failed to bind', 'could not bind')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def kill_all(procs: Sequence[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass


def run(argv_of: Callable[[str, int], list[str]], num_processes: int, *,
        timeout: float, env: dict, attempts: int = 3
        ) -> list[tuple[int, str, str]]:
  """Starts `num_processes` copies of `argv_of('localhost:PORT', i)`.

  Returns [(returncode, stdout, stderr)] per process. Raises
  subprocess.TimeoutExpired (after killing every child) when they do not
  finish within `timeout` seconds.
  """
  results = []
  for _ in range(attempts):
    coordinator = f'localhost:{free_port()}'
    procs = [subprocess.Popen(
        [sys.executable, *argv_of(coordinator, i)], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    try:
      results = []
      for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    finally:
      kill_all(procs)
    logs = ' '.join(out + err for _, out, err in results).lower()
    if all(rc == 0 for rc, _, _ in results) or not any(
        s in logs for s in _PORT_TAKEN):
      return results
  return results
