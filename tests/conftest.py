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
    ['--xla_force_host_platform_device_count=8'] +
    # The suite compiles hundreds of small programs and runs each a few
    # times: XLA:CPU's LLVM optimisation passes cost more than they save
    # here, and its loop fusions compile in less than half the time by the
    # older elemental emitters (the tiny train step of test_end_to_end:
    # backend compile 19.5 -> 8.2 s; docs/BENCHMARKS.md, "Test suite").
    # They change float results in the last bits (FMA contraction), so
    # every subprocess gets the same flags (tests/subprocess_env.py);
    # MIMICDET_TEST_FULL_OPT=1 runs the suite as the programs run.
    ([] if os.environ.get('MIMICDET_TEST_FULL_OPT') == '1' else
     ['--xla_backend_optimization_level=0',
      '--xla_llvm_disable_expensive_passes=true',
      '--xla_cpu_use_fusion_emitters=false']))


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


# The files that take longest (seconds summed over their tests, `pytest
# --durations=0` on the loaded 2-core AMD machine, 2026-12-07, less what the
# warm command-line runner and the jitted heads test saved that day), run
# first. `make test` runs two xdist workers that take one file at a time in
# collection order (`--dist loadfile`): a long file collected late leaves one
# worker running it alone at the end; longest first lets the short files
# fill in around the long ones.
LONGEST_FIRST = (
    'test_end_to_end.py',  # ~105 s: every user command as a subprocess chain
    'test_training.py',  # 46 s
    'test_serving.py',  # ~40 s
    'test_switches.py',  # 30 s
    'test_multihost.py',  # 27 s
    'test_heads_offsets.py',  # ~25 s
    'test_losses_total.py',  # 24 s
    'test_cli_errors.py',  # ~19 s
    'test_checkpoint.py',  # 18 s
    'test_models.py',  # 17 s
    'test_ops_deform_conv.py',  # 12 s
    'test_ema.py',  # 12 s
    'test_eval_cli.py',  # ~10 s
)


def pytest_collection_modifyitems(items):
  """Longest files first; the tests of a file keep their order."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
