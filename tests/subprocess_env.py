"""XLA_FLAGS for the suite's subprocesses: the suite's own flags (the fast
compile flags of conftest.py) with another virtual device count, so that a
subprocess compiles exactly as the test process does (a run in a subprocess
compared bitwise with one in the test process needs the same flags)."""
import os
import re


def xla_flags(devices: int) -> str:
  kept = re.sub(r'--xla_force_host_platform_device_count=\S*', '',
                os.environ.get('XLA_FLAGS', '')).split()
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={devices}'])
