r"""XLA's memory analysis of the training step at several train.grad_accum_steps.

  JAX_PLATFORMS=cpu python benchmarks/grad_accum_memory.py \
      --config configs/mimicdet_r50_fpn_1x.py --size 512x512 --batch 4 \
      --dtype f32 --ks 1,2,4

Builds the step `train.py` runs (benchmarks/step.py: the real model, loss and
optimiser; one device, `--batch` images on it) for each k of `--ks` at the
same per-device batch, compiles it (nothing is run) and prints
`compiled.memory_analysis()`: arguments (state + batch), outputs, and the
peak of the step's temporaries, which the micro-batches shrink
(docs/TRAINING.md, "Gradient accumulation").
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common as bench
from benchmarks import step as step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=False)
_BATCH = flags.DEFINE_integer('batch', 4, 'Per-device batch (every k the same).')
_KS = flags.DEFINE_string('ks', '1,4', 'train.grad_accum_steps values.')
_DTYPE = flags.DEFINE_enum('dtype', None, sorted(bench.DTYPES),
                           "Compute dtype (default: the config's).")
_SIZE = flags.DEFINE_string('size', None, 'Canvas HxW (default: the '
                            "config's first canvas bucket).")
flags.mark_flags_as_required(['config'])

GIB = 2.0**30


def main(argv):
  del argv
  if jax.local_device_count() != 1:
    raise app.UsageError('run on one device (the figures are per device)')
  print(f'{"k":>3} {"images/micro":>12} {"args GiB":>9} {"out GiB":>8} '
        f'{"temp GiB":>9} {"compile s":>9}')
  for k in (int(v) for v in _KS.value.split(',')):
    raw = _CONFIG.value
    raw.train.grad_accum_steps = k
    config, per_device = step_lib.step_config(
        raw, batch=_BATCH.value, size=_SIZE.value, dtype=_DTYPE.value,
        num_classes=-1)
    p_step, rstate, batch, _ = step_lib.build_step(
        config, per_device, count_flops=False)
    t0 = time.perf_counter()
    m = bench.memory_analysis(p_step.lower(rstate, batch).compile())
    print(f'{k:>3} {per_device // k:>12} '
          f'{m["argument_size_in_bytes"] / GIB:>9.3f} '
          f'{m["output_size_in_bytes"] / GIB:>8.3f} '
          f'{m["temp_size_in_bytes"] / GIB:>9.3f} '
          f'{time.perf_counter() - t0:>9.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)
