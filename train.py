r"""Trains MimicDet; restarting the same command resumes from the last checkpoint.

  python train.py --config configs/mimicdet_r50_fpn_1x.py --workdir DIR \
      [--config.train.batch_size=16 --config.model.backbone_init=weights/r50 ...]

  # several processes without TPU/SLURM auto-detection (one line per host):
  python train.py --config ... --workdir DIR --coordinator_address=HOST0:1234 \
      --num_processes=2 --process_id=0

Writes DIR/config.json (the resolved config), DIR/checkpoints/<step>/,
DIR/metrics.jsonl and DIR/tensorboard/. See docs/TRAINING.md.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from mimicdet_jax import config_lib
from mimicdet_jax import errors
from mimicdet_jax.training import launch

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; an existing run in it is resumed.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '',
    'host:port of process 0, for multi-process runs that JAX does not '
    'auto-detect (TPU pods and SLURM are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', 0, 'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', -1, 'This process, 0..num_processes-1 (with '
    '--coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  launch.quiet_library_logs()
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                   _PROCESS_ID.value)
  launch.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  config_lib.run_absl(main)  # bad input, unknown keys, NaN losses: one line, exit 1
