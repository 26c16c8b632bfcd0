import os
import re

import pytest

# Tests run on the CPU with 8 virtual devices (the multi-device tests need
# them). Set, not defaulted: an inherited JAX_PLATFORMS or a device count in
# an inherited XLA_FLAGS would break them; other inherited XLA flags are kept.
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = ' '.join(
    re.sub(r'--xla_force_host_platform_device_count=\S*', '',
           os.environ.get('XLA_FLAGS', '')).split() +
    ['--xla_force_host_platform_device_count=8'])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under MIMICDET_REQUIRE_EXTRAS=1 (`make test-extras`), a torch or tfds
  test that skips (the extra is missing) fails instead."""
  del call
  outcome = yield
  report = outcome.get_result()
  if (report.skipped and os.environ.get('MIMICDET_REQUIRE_EXTRAS') == '1' and
      (item.get_closest_marker('torch') or item.get_closest_marker('tfds'))):
    report.outcome = 'failed'
    report.longrepr = (f'{item.nodeid} skipped, but MIMICDET_REQUIRE_EXTRAS=1 '
                       f'asks for it to run: {report.longrepr}')
