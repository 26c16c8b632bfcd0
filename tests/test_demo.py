"""`make demo` end to end from a fresh clone (slow: ~10-12 min on 2 cores).

The bar (`demo.TARGET_AP50`, `demo.TARGET_AP`; issue 8's AP >= 0.25, raised
since): the demo recipe, trained on the synthetic set that the demo
generates, reaches it on its validation split (pycocotools, S-head). The
clone is what `git clone` of this checkout's HEAD gives; the steps are the
Makefile's (demo-data, then demo) run with this interpreter, so the test
does not build a second virtual environment.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from mimicdet_jax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _makefile_commands():
  """The demo-data and demo recipes' python commands from the Makefile."""
  with open(os.path.join(REPO, 'Makefile')) as f:
    text = f.read()
  data = re.search(r'\$\(PY\) (-m mimicdet_jax\.data\.synthetic [^\n]*)', text)
  run = re.search(r'\$\(PY\) (-m mimicdet_jax\.demo [^\n]*)', text)
  assert data and run, 'Makefile demo-data / demo recipes not found'
  subst = lambda c: (c.replace('$(DEMO_DATA)', 'data/synthetic')  # pylint: disable=g-long-lambda
                     .replace('$(DEMO_DIR)', 'workdirs/demo').split())
  return subst(data.group(1)), subst(run.group(1))


@pytest.mark.slow
def test_make_demo_from_a_fresh_clone_meets_the_bar(tmp_path):
  clone = tmp_path / 'clone'
  subprocess.run(['git', 'clone', '-q', REPO, str(clone)], check=True)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device, as `make demo` runs
  data_cmd, demo_cmd = _makefile_commands()
  subprocess.run([sys.executable, *data_cmd], cwd=clone, env=env, check=True,
                 capture_output=True, timeout=900)
  proc = subprocess.run([sys.executable, *demo_cmd], cwd=clone, env=env,
                        capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  bar = f'target AP50 >= {demo.TARGET_AP50}, AP >= {demo.TARGET_AP}: met'
  assert bar in proc.stdout, proc.stdout
  with open(clone / 'workdirs' / 'demo' / 'eval' / 'metrics.json') as f:
    metrics = json.load(f)
  assert metrics['AP50'] >= demo.TARGET_AP50 and metrics['AP'] >= demo.TARGET_AP
  viz = clone / 'workdirs' / 'demo' / 'eval' / 'viz'
  assert len(list(viz.glob('*.png'))) > 0
  # A second run reuses the checkpoint and the metrics: no training.
  again = subprocess.run([sys.executable, *demo_cmd], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-4000:]
  assert 'not training again' in again.stdout
  assert f"{metrics['AP']:6.3f}" in again.stdout
