r"""Runs a MimicDet checkpoint, or an exported detector, on a folder of images.

  python predict.py --workdir DIR --images FOLDER --out OUT \
      [--config configs/demo.py] [--checkpoint latest|best|STEP|PATH] \
      [--weights ema|raw] [--config.eval.viz_score_threshold=0.5]
  # an exported detector (serving/export.py) instead of a checkpoint
  python predict.py --exported EXPORTED --images FOLDER --out OUT

Writes OUT/<name>.png per image (the detections scoring at least
eval.viz_score_threshold drawn) and OUT/detections.json (every detection,
original-image pixels); the schema is in mimicdet_jax/evaluation/predict.py
and docs/EVAL.md. Without --config, the config the training run wrote
(DIR/config.json) is used.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import restore

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config (default: WORKDIR/config.json).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training WORKDIR.')
_EXPORTED = flags.DEFINE_string(
    'exported', None, 'An exported detector directory (serving/export.py) '
    'instead of a checkpoint; --config then only sets eval.*.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of images.',
                              required=True)
_OUT = flags.DEFINE_string('out', None, 'Output folder.', required=True)
_CHECKPOINT, _WEIGHTS = restore.define_checkpoint_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not (_WORKDIR.value or _EXPORTED.value):
    raise app.UsageError('--workdir (a checkpoint) or --exported (an '
                         'exported detector) is required')
  from mimicdet_jax.evaluation import predict  # pylint: disable=g-import-not-at-top
  if _EXPORTED.value:
    result = predict.predict_exported(_EXPORTED.value, _IMAGES.value,
                                      _OUT.value, _CONFIG.value)
  else:
    result = predict.predict_checkpoint(
        _WORKDIR.value, _IMAGES.value, _OUT.value, _CONFIG.value,
        _CHECKPOINT.value, _WEIGHTS.value)
  logging.info('%d images, %d detections', len(result['images']),
               sum(len(im['detections']) for im in result['images']))
  for line in predict.summary(result, _OUT.value):
    print(line)


if __name__ == '__main__':
  config_lib.run_absl(main)  # missing files, unreadable folders: one line, exit 1
