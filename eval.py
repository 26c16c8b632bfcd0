r"""Evaluates a MimicDet checkpoint with pycocotools, or scores a result file.

  # detect on the validation split and score (DIR/eval/detections.json,
  # DIR/eval/metrics.json, DIR/eval/viz/*.png with --viz N)
  python eval.py --config configs/mimicdet_r50_fpn_1x.py --workdir DIR \
      [--checkpoint latest|best|STEP|PATH] [--weights ema|raw] [--viz N] \
      [--head s|t|both]
  # an exported detector (serving/export.py) on the validation split of
  # --config (or of DIR/config.json with --workdir); writes EXPORTED/eval/
  python eval.py --exported EXPORTED (--config C | --workdir DIR) [--out OUT]
  # only score an existing COCO results file
  python eval.py --detections dets.json --annotations instances_val2017.json \
      [--metrics-out metrics.json]

Without --config, the config the training run wrote (DIR/config.json) is
used. The metrics.json schema is in docs/EVAL.md.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mimicdet_jax import config_lib
from mimicdet_jax import errors
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import restore

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training WORKDIR.')
_CHECKPOINT, _WEIGHTS = restore.define_checkpoint_flags()
_VIZ = flags.DEFINE_integer(
    'viz', None, 'Draw the first N validation images (default eval.viz).')
_HEAD = flags.DEFINE_enum(
    'head', None, list(postprocess.EVAL_HEADS),
    'Which head detects (default eval.head of the config): the S-head, the '
    'T-head on the same refined boxes, the mean of both, or one head\'s '
    'scores on the other\'s boxes (s_cls+t_box, t_cls+s_box; diagnostics).')
_DETECTIONS = flags.DEFINE_string(
    'detections', None, 'Scoring only: a COCO results JSON file.')
_ANNOTATIONS = flags.DEFINE_string(
    'annotations', None, 'Scoring only: the COCO-format ground-truth JSON.')
_METRICS_OUT = flags.DEFINE_string(
    'metrics-out', None,
    'Scoring only: where metrics.json goes (default: beside --detections).')
flags.DEFINE_alias('metrics_out', 'metrics-out')
_EXPORTED = flags.DEFINE_string(
    'exported', None, 'An exported detector directory (serving/export.py) to '
    'evaluate instead of a checkpoint; the validation data comes from --config '
    'or WORKDIR/config.json.')
_OUT = flags.DEFINE_string(
    'out', None, 'With --exported: where detections.json and metrics.json go '
    '(default EXPORTED/eval).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _DETECTIONS.value or _ANNOTATIONS.value:
    if not (_DETECTIONS.value and _ANNOTATIONS.value):
      raise app.UsageError('--detections and --annotations go together')
    # Scoring only needs pycocotools, not JAX or the model.
    from mimicdet_jax.evaluation import coco as coco_eval  # pylint: disable=g-import-not-at-top
    coco_eval.score_file(_DETECTIONS.value, _ANNOTATIONS.value,
                         _METRICS_OUT.value)
    return
  if _EXPORTED.value:
    if not (_WORKDIR.value or _CONFIG.value):
      raise app.UsageError('--exported needs --config or --workdir (the '
                           'validation data)')
    # pylint: disable=g-import-not-at-top
    from mimicdet_jax.evaluation import exported
    # pylint: enable=g-import-not-at-top
    detector = exported.load_detector(_EXPORTED.value)
    config = restore.load_config(_WORKDIR.value, _CONFIG.value)
    exported.evaluate_exported(config, detector, _OUT.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (or --detections/--annotations)')
  # pylint: disable=g-import-not-at-top
  import jax
  from mimicdet_jax.evaluation import evaluate as evaluate_lib
  from mimicdet_jax.training import launch
  # pylint: enable=g-import-not-at-top
  launch.initialize_distributed()  # no-op for one process
  config = restore.load_config(_WORKDIR.value, _CONFIG.value,
                               head=_HEAD.value, weights=_WEIGHTS.value)
  variables, step, weights = restore.restore_checkpoint(
      _WORKDIR.value, _CHECKPOINT.value, config.eval.weights)
  # After the checks a user's mistake fails (no checkpoint): its log line
  # would come before their one-line error.
  launch.enable_compile_cache(config.train.compile_cache, _WORKDIR.value)
  logging.info('evaluating step %s (%s weights) on %d devices (%d processes)',
               step, weights, jax.device_count(), jax.process_count())
  evaluate_lib.evaluate(config, variables, _WORKDIR.value, step, viz=_VIZ.value,
                        weights=weights)


if __name__ == '__main__':
  config_lib.run_absl(main)  # missing files, unknown ids or keys: one line, exit 1
