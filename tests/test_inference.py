"""inference: detections gathered across two processes."""
import json

import numpy as np
from tests import subprocess_env


def test_gather_across_two_processes(tmp_path):
  """Two CPU processes (jax.distributed, gloo) with 2 and 5 images."""
  import os
  from tests import eval_helper
  from tests import multiprocess
  out = tmp_path / 'gathered.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=subprocess_env.xla_flags(1))
  results = multiprocess.run(
      lambda coordinator, i: [
          os.path.join('tests', 'eval_helper.py'), '--coordinator',
          coordinator, '--num_processes', '2', '--process_id', str(i),
          '--out', str(out)], 2, timeout=240, env=env)
  assert all(rc == 0 for rc, _, _ in results), [
      (o + e)[-2000:] for _, o, e in results]
  gathered = {k: np.asarray(v) for k, v in json.loads(out.read_text()).items()}
  expected = [eval_helper.host_detections(i) for i in range(2)]
  for key in expected[0]:
    np.testing.assert_array_equal(
        gathered[key], np.concatenate([e[key] for e in expected]), key)
  assert len(gathered['image_id']) == 7
  assert gathered['image_id'].max() > 2**40  # 64-bit ids are not truncated
