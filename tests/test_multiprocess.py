"""tests/multiprocess.py, the runner of the multi-process tests: a port taken
between its probe and the coordinator's bind is retried, and children are
killed on a timeout. The children here are plain Python (no JAX) that act
as a coordinator would: bind the port or fail saying so."""
import os
import socket
import subprocess

import pytest

from tests import multiprocess

_BIND = """
import socket, sys
host, port = sys.argv[1].split(':')
try:
  socket.socket().bind((host, int(port)))
except OSError as e:
  sys.exit(f'coordinator: failed to bind {port}: {e}')
print('bound', port)
"""


def test_a_taken_port_is_retried_on_a_new_one(monkeypatch):
  with socket.socket() as taken:
    taken.bind(('localhost', 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real_free_port = multiprocess.free_port
    # The first probe hands out a port that someone else holds by now.
    monkeypatch.setattr(multiprocess, 'free_port',
                        lambda: ports.pop() if ports else real_free_port())
    results = multiprocess.run(lambda coordinator, i: ['-c', _BIND, coordinator],
                               1, timeout=60, env=dict(os.environ))
  (rc, out, err), = results
  assert rc == 0, err
  assert out.startswith('bound') and not ports


def test_children_are_killed_on_timeout(tmp_path):
  pid_file = tmp_path / 'pid'
  sleeper = ('import os, sys, time; open(sys.argv[1], "w").write('
             'str(os.getpid())); time.sleep(600)')
  with pytest.raises(subprocess.TimeoutExpired):
    multiprocess.run(lambda coordinator, i: ['-c', sleeper, str(pid_file)], 1,
                     timeout=3, env=dict(os.environ))
  pid = int(pid_file.read_text())
  with pytest.raises(ProcessLookupError):  # gone, and reaped
    os.kill(pid, 0)
