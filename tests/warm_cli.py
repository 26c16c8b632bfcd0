"""Runs command lines as child processes of one warm interpreter.

A command-line test pays ~3.5 s of CPU per process, ~2.8 s of it importing
jax, flax, orbax, grain... before the entry point runs. `WarmRunner` starts
one interpreter that imports those third-party libraries (none of
mimicdet_jax, so every entry point still imports the project's own code, and
defines its own flags, from scratch) and forks a child per command line. The
child points fds 0-2 at /dev/null and two files, sets sys.argv and
sys.path[0] as `python SCRIPT` / `python -m MODULE` do, runs the entry point
as __main__ and exits the way the interpreter does: an uncaught exception
prints its traceback and exits 1, SystemExit gives its code, atexit and
non-daemon threads are waited for.

What a fresh process would show and this does not: output the third-party
imports print. Those imports ran in the warm interpreter, whose output
`server_stderr()` returns: tests/test_cli_errors.py asserts it is empty,
and runs one case in a fresh process too, for comparison.

jax must not have started a backend before the fork (it is multithreaded
then); importing it does not, and the server checks that it has not.
"""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The third-party modules the entry points import (what takes the time).
PRELOAD = ('numpy', 'scipy', 'PIL.Image', 'absl.app', 'absl.flags',
           'absl.logging', 'ml_collections', 'ml_collections.config_flags',
           'jax', 'jax.numpy', 'flax', 'flax.linen', 'optax',
           'orbax.checkpoint', 'grain', 'pycocotools.coco',
           'pycocotools.cocoeval')

_SERVER = r'''
import importlib, json, os, sys, threading
replies = os.fdopen(int(sys.argv[2]), 'w')
for name in json.loads(sys.argv[1]):
  importlib.import_module(name)
from jax._src import xla_bridge
assert not xla_bridge._backends, 'a preload started a jax backend'
assert threading.active_count() == 1, threading.enumerate()
sys.stdout.flush()
sys.stderr.flush()
request = None
for line in sys.stdin:
  pid = os.fork()
  if pid == 0:
    request = json.loads(line)
    replies.close()
    break
  _, status = os.waitpid(pid, 0)
  print(os.waitstatus_to_exitcode(status), file=replies, flush=True)
else:
  sys.exit(0)
# The child: a command line, as the interpreter runs it.
import runpy
fd = os.open(os.devnull, os.O_RDONLY)
os.dup2(fd, 0)
for target, path in ((1, request['stdout']), (2, request['stderr'])):
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(fd, target)
  os.close(fd)
sys.stdin = open(0, closefd=False)
argv = request['argv']
if argv[0] == '-m':
  sys.argv = argv[1:]  # runpy puts the module's path in sys.argv[0]
  sys.path[0] = os.getcwd()
  runpy._run_module_as_main(argv[1])
else:
  sys.argv = argv
  sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
  runpy.run_path(argv[0], run_name='__main__')
'''


class WarmRunner:
  """run(*argv) ~ subprocess.run([sys.executable, *argv], cwd=ROOT, env=env,
  capture_output=True, text=True), from a forked warm interpreter."""

  def __init__(self, env, preload=PRELOAD):
    self._dir = tempfile.mkdtemp(prefix='warm_cli_')
    # The server's own stdout and stderr (what its imports print) go to one
    # file; the exit statuses come back on a pipe of their own.
    self._stderr = open(os.path.join(self._dir, 'server.err'), 'w+')
    read, write = os.pipe()
    self._server = subprocess.Popen(
        [sys.executable, '-c', _SERVER, json.dumps(list(preload)), str(write)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=self._stderr,
        stderr=self._stderr, text=True, start_new_session=True,
        pass_fds=(write,))
    os.close(write)
    self._replies = os.fdopen(read)
    self._count = 0

  def run(self, *argv, timeout=300):
    self._count += 1
    out = os.path.join(self._dir, f'{self._count}.out')
    err = os.path.join(self._dir, f'{self._count}.err')
    self._server.stdin.write(
        json.dumps(dict(argv=list(argv), stdout=out, stderr=err)) + '\n')
    self._server.stdin.flush()
    if not select.select([self._replies], [], [], timeout)[0]:
      os.killpg(self._server.pid, signal.SIGKILL)  # and the child
      self._server.wait()
      raise subprocess.TimeoutExpired(argv, timeout)
    line = self._replies.readline()
    if not line:
      self._stderr.seek(0)
      raise RuntimeError(f'warm interpreter died: {self._stderr.read()}')
    with open(out) as f_out, open(err) as f_err:
      return subprocess.CompletedProcess(
          [sys.executable, *argv], int(line), f_out.read(), f_err.read())

  def server_stderr(self) -> str:
    """What the warm interpreter itself printed (its imports), on stdout
    or stderr."""
    self._stderr.flush()
    with open(self._stderr.name) as f:
      return f.read()

  def close(self) -> None:
    self._server.stdin.close()
    self._server.wait(timeout=60)
    self._replies.close()
    self._stderr.close()
    shutil.rmtree(self._dir, ignore_errors=True)
