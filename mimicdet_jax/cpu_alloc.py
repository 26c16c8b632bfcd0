"""mimalloc for CPU training: where the library is, and the environment that preloads it.

XLA:CPU allocates a step's temporaries (~170 MiB for the demo step) afresh
on every call. Under glibc, blocks over its mmap threshold are fresh
mappings whose pages the kernel faults in and zeroes on every step, even
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (which makes the faults 100x
fewer, not zero). mimalloc told to keep freed memory
(`MIMALLOC_PURGE_DELAY=-1`) hands the next step the same, already mapped
pages: no faults and no zeroing. The cmeel-mimalloc wheel (requirements.txt)
ships the shared library; it has to be preloaded (LD_PRELOAD) when the
process starts, so the Makefile sets it for `make demo` and `make test`
(`python -m mimicdet_jax.cpu_alloc` prints the assignments) and a training
process can only report whether it runs under it. Results are identical:
only where the bytes live changes (docs/BENCHMARKS.md, "Memory allocation
on CPU").
"""
import glob
import os
import sys
import sysconfig
from typing import Optional

# mimalloc's options (its docs, "Environment Options"): keep freed memory
# instead of returning it to the OS, and back segments with huge pages.
MIMALLOC_OPTIONS = {'MIMALLOC_PURGE_DELAY': '-1',
                    'MIMALLOC_ALLOW_LARGE_OS_PAGES': '1'}


def mimalloc_library(site_packages: Optional[str] = None) -> Optional[str]:
  """libmimalloc.so of the cmeel-mimalloc wheel in this environment, or None."""
  root = site_packages or sysconfig.get_paths()['purelib']
  found = sorted(glob.glob(os.path.join(root, 'cmeel.prefix', 'lib',
                                        'libmimalloc.so')))
  return found[0] if found else None


def mimalloc_env(site_packages: Optional[str] = None) -> dict[str, str]:
  """{LD_PRELOAD: the library, MIMALLOC_*: ...}, or {} without the wheel."""
  lib = mimalloc_library(site_packages)
  return dict(LD_PRELOAD=lib, **MIMALLOC_OPTIONS) if lib else {}


def running_under_mimalloc(maps: str = '/proc/self/maps') -> bool:
  """Whether libmimalloc is mapped into this process (Linux; False elsewhere)."""
  try:
    with open(maps) as f:
      return 'libmimalloc' in f.read()
  except OSError:
    return False


def main() -> int:
  """Prints `KEY=value ...` for the shell (nothing without the wheel)."""
  print(' '.join(f'{k}={v}' for k, v in mimalloc_env().items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
