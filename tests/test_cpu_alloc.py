"""mimicdet_jax.cpu_alloc: the preloaded mimalloc the Makefile starts CPU runs under."""
import os
import subprocess
import sys

from mimicdet_jax import cpu_alloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_env_points_at_the_wheels_library_or_is_empty(tmp_path):
  assert cpu_alloc.mimalloc_env(str(tmp_path)) == {}
  lib = tmp_path / 'cmeel.prefix' / 'lib' / 'libmimalloc.so'
  lib.parent.mkdir(parents=True)
  lib.write_bytes(b'')
  env = cpu_alloc.mimalloc_env(str(tmp_path))
  assert env == {'LD_PRELOAD': str(lib), 'MIMALLOC_PURGE_DELAY': '-1',
                 'MIMALLOC_ALLOW_LARGE_OS_PAGES': '1'}


def test_running_under_mimalloc_reads_the_maps(tmp_path):
  maps = tmp_path / 'maps'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n')
  assert not cpu_alloc.running_under_mimalloc(str(maps))
  maps.write_text('7f00-7f01 r-xp 0 08:01 2 /v/cmeel.prefix/lib/'
                  'libmimalloc.so.3.4\n')
  assert cpu_alloc.running_under_mimalloc(str(maps))
  assert not cpu_alloc.running_under_mimalloc(str(tmp_path / 'missing'))


def test_a_process_started_with_the_env_runs_under_mimalloc():
  """The real wheel (requirements.txt), the real preload: what make demo does."""
  env = cpu_alloc.mimalloc_env()
  assert env, 'cmeel-mimalloc is in requirements.txt: its library is missing'
  probe = [sys.executable, '-c',
           'from mimicdet_jax import cpu_alloc; import numpy as np; '
           'x = np.ones((4096, 4096)); '  # 128 MiB through the allocator
           'print(cpu_alloc.running_under_mimalloc(), float(x.sum()))']
  base = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  under = subprocess.run(probe, env=dict(base, **env), cwd=REPO,
                         capture_output=True, text=True, check=True)
  plain = subprocess.run(probe, env=base, cwd=REPO, capture_output=True,
                         text=True, check=True)
  assert under.stdout.split() == ['True', str(4096.0 * 4096)]
  assert plain.stdout.split()[0] == 'False'
  # The command line the Makefile splices in is the same environment.
  printed = subprocess.run([sys.executable, '-m', 'mimicdet_jax.cpu_alloc'],
                           env=base, cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
  assert dict(kv.split('=', 1) for kv in printed) == env
