r"""Exports a checkpoint's S-head detector as jax.export artifacts.

  python -m mimicdet_jax.serving.export --workdir W --out DIR \
      [--config configs/C.py] [--checkpoint latest|best|STEP|PATH] \
      [--weights ema|raw] [--platforms cpu,cuda,tpu] [--max_batch 32]

DIR gets one self-contained artifact per canvas of data.canvas_buckets,
DIR/detector_{H}x{W}.jaxexport (jax.export serialization, weights baked in),
and DIR/signature.json describing them (docs/EXPORT.md). Each artifact is
one function

  (images uint8 [b, H, W, 3], image_sizes int32 [b, 2])
      -> {boxes float32 [b, D, 4], scores float32 [b, D],
          classes int32 [b, D], num_detections int32 [b]}

with b symbolic (any batch from one artifact) and D = eval.max_detections:
normalisation on device (transforms.normalize_on_device), backbone,
refinement, S-head, decoding, score threshold, per-class NMS and the top D
(postprocess.make_predict_fn, with the config's eval.nms and eval.tta baked
in and recorded in signature.json), then labels -> category ids through a
constant table. Boxes are canvas pixels; rows past num_detections are
zero with class -1. serving/detector.py loads and runs the directory.
"""
import hashlib
import importlib.metadata
import json
import os
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimicdet_jax import config_lib
from mimicdet_jax import errors
from mimicdet_jax.data import transforms
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import restore
from mimicdet_jax.serving import detector as detector_lib

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
# The most images per call the loader accepts (signature max_batch): the
# artifact has no limit of its own, but memory grows with the batch.
DEFAULT_MAX_BATCH = 32


def artifact_name(canvas: Sequence[int]) -> str:
  return f'detector_{int(canvas[0])}x{int(canvas[1])}.jaxexport'


def s_head_config(config) -> ml_collections.FrozenConfigDict:
  """The config with eval.head='s': the artifact is the one-stage detector."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.eval.head != 's':
    logging.warning('eval.head=%r: the exported detector is the S-head',
                    c.eval.head)
  c.eval.head = 's'
  return ml_collections.FrozenConfigDict(c)


# MimicDet.setup's attribute holding the T-head: its weights stay out of
# the artifact (the S-head detector never calls it).
T_HEAD_MODULE = 't_head_net'


def s_head_variables(variables) -> dict:
  """{'params', 'frozen'} without the T-head's subtrees (host arrays).

  Flax reads a module's parameters only when the module runs, so the
  S-head predictor applies without them; constants the graph receives but
  does not use would otherwise still be serialized.
  """
  return {col: jax.tree.map(np.asarray, {k: v for k, v in tree.items()
                                         if k != T_HEAD_MODULE})
          for col, tree in variables.items()}


def category_table(categories: Sequence[dict]) -> np.ndarray:
  """int32 [K + 1]: label -> category id; index 0 (no detection) -> -1."""
  ids = [int(c['id']) for c in categories]
  if any(not -2**31 <= i < 2**31 for i in ids):
    raise errors.ConfigError(f'category ids {ids} do not fit int32')
  return np.array([-1] + ids, np.int32)


def detector_function(config, variables, categories: Sequence[dict]
                      ) -> Callable[..., dict[str, jax.Array]]:
  """The exported function (module docstring), weights as constants.

  The in-repo predictor itself (postprocess.make_predict_fn) on the
  normalised canvases, then the label -> category id table.
  """
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
  predict = postprocess.make_predict_fn(mimicdet.MimicDet(config), config)
  table = jnp.asarray(category_table(categories))

  def detector(images, image_sizes):
    image_sizes = image_sizes.astype(jnp.int32)
    x = transforms.normalize_on_device(images, image_sizes, config.data)
    dets = predict(variables, x, image_sizes)
    valid = dets['valid']
    return dict(boxes=dets['boxes'], scores=dets['scores'],
                classes=jnp.where(valid, table[dets['classes']], -1),
                num_detections=jnp.sum(valid, axis=1, dtype=jnp.int32))

  return detector


def config_hash(config) -> str:
  """sha256 of the resolved config as sorted JSON."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  platforms = tuple(platforms)
  unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
  if unknown or not platforms:
    raise errors.ConfigError(f'--platforms {",".join(platforms)}: expected '
                             f'some of {",".join(KNOWN_PLATFORMS)}')
  return platforms


def _write_bytes(path: str, blob: bytes) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(blob)
  os.replace(tmp, path)


def export_detector(config, variables, categories: Sequence[dict],
                    out_dir: str, *, step: Optional[int] = None,
                    weights: Optional[str] = None,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS,
                    max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, Any]:
  """Writes DIR/detector_{H}x{W}.jaxexport per canvas and DIR/signature.json.

  Args:
    config: the resolved config the checkpoint trained with.
    variables: {'params', 'frozen'}; all but the T-head's are baked into
      the artifacts.
    categories: [{'id', 'name'}] of labels 1..K, in label order.
    out_dir: created if missing; signature.json is written last.
    step: the checkpoint step, recorded.
    weights: which weights `variables` are ('ema' | 'raw'), recorded.
    platforms: jax.export platforms to lower for (all in every artifact).
    max_batch: the most images per call (the loader enforces it).
  Returns:
    The signature dict.
  """
  platforms = check_platforms(platforms)
  if max_batch < 1:
    raise errors.ConfigError(f'--max_batch {max_batch}: must be >= 1')
  categories = [dict(id=int(c['id']), name=str(c['name'])) for c in categories]
  if len(categories) != config.model.num_classes:
    raise errors.ConfigError(
        f'{len(categories)} categories for a model of '
        f'{config.model.num_classes} classes')
  config = s_head_config(config)
  variables = s_head_variables(variables)
  fn = jax.jit(detector_function(config, variables, categories))
  os.makedirs(out_dir, exist_ok=True)
  (batch,) = jax.export.symbolic_shape('b')
  artifacts = []
  for h, w in [(int(b[0]), int(b[1])) for b in config.data.canvas_buckets]:
    exported = jax.export.export(fn, platforms=platforms)(
        jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32))
    blob = bytes(exported.serialize())
    name = artifact_name((h, w))
    _write_bytes(os.path.join(out_dir, name), blob)
    artifacts.append(dict(file=name, canvas=[h, w], bytes=len(blob),
                          sha256=hashlib.sha256(blob).hexdigest()))
    logging.info('%s: %.1f MB, %s', name, len(blob) / 1e6, platforms)
  signature = _signature(config, categories, artifacts, step, platforms,
                         max_batch, exported, weights)
  _write_bytes(os.path.join(out_dir, detector_lib.SIGNATURE_FILE),
               json.dumps(signature, indent=1).encode())
  return signature


def _signature(config, categories, artifacts, step, platforms, max_batch,
               exported, weights) -> dict[str, Any]:
  d = int(config.eval.max_detections)
  data = config.data
  return dict(
      format=detector_lib.FORMAT,
      calling_convention_version=detector_lib.CALLING_CONVENTION_VERSION,
      artifacts=artifacts,
      canvases=[a['canvas'] for a in artifacts],
      inputs=[
          dict(name='images', dtype='uint8', shape=['b', 'H', 'W', 3],
               doc='RGB pixels resized by `resize`, zero-padded to one of '
               '`canvases` (top-left aligned)'),
          dict(name='image_sizes', dtype='int32', shape=['b', 2],
               doc='(h, w) of each resized image inside the canvas')],
      outputs=[
          dict(name='boxes', dtype='float32', shape=['b', d, 4],
               doc='x1, y1, x2, y2 in canvas pixels; 0 past num_detections'),
          dict(name='scores', dtype='float32', shape=['b', d],
               doc='descending; 0 past num_detections'),
          dict(name='classes', dtype='int32', shape=['b', d],
               doc='category ids of `categories`; -1 past num_detections'),
          dict(name='num_detections', dtype='int32', shape=['b'])],
      max_batch=int(max_batch),
      max_detections=d,
      platforms=list(platforms),
      pixel_mean=[float(v) for v in data.pixel_mean],
      pixel_std=[float(v) for v in data.pixel_std],
      resize=dict(
          min_size=int(data.min_size), max_size=int(data.max_size),
          size_divisor=int(data.size_divisor), interpolation='PIL bilinear',
          rule='scale = min(min_size / min(h, w), max_size / max(h, w)); '
          'new = clamp(round(side * scale), 1, max_size); the batch is padded '
          'to the smallest canvas (by area, then listed order) holding it; '
          'original = canvas * orig / new, per axis'),
      categories=categories,
      head='s',
      score_threshold=float(config.eval.score_threshold),
      nms_threshold=float(config.eval.nms_threshold),
      nms=str(config.eval.nms),
      soft_nms_sigma=float(config.eval.soft_nms_sigma),
      tta=str(config.eval.tta),
      pre_nms_topk=int(config.eval.pre_nms_topk),
      score_times_objectness=bool(config.eval.score_times_objectness),
      model_dtype=str(config.model.dtype),
      checkpoint_step=step,
      checkpoint_weights=weights,
      config_hash=config_hash(config),
      jax_version=jax.__version__,
      jaxlib_version=importlib.metadata.version('jaxlib'),
      jax_export_calling_convention_version=int(
          exported.calling_convention_version))


def export_workdir(workdir: str, out_dir: str, config=None,
                   checkpoint: str = 'latest', weights: Optional[str] = None,
                   **kwargs) -> dict[str, Any]:
  """`export_detector` on a training WORKDIR's checkpoint and categories.

  `checkpoint` as evaluation/restore.py's ('latest', 'best', a step, a
  path); `weights` ('ema' | 'raw') replaces the config's eval.weights.
  """
  config = restore.load_config(workdir, config, weights=weights)
  variables, step, used = restore.restore_checkpoint(
      workdir, checkpoint, config.eval.weights)
  logging.info('exporting the %s weights of step %s', used, step)
  categories, origin = restore.training_categories(config, workdir)
  if categories is None:
    raise errors.MissingFileError(
        f'{os.path.join(workdir, restore.CATEGORIES_FILE)}: not found, and '
        'no data.train_annotations to read the categories from; the artifact '
        'maps labels to category ids and needs them')
  if len(categories) != config.model.num_classes:
    raise errors.ConfigError(
        f'{origin} has {len(categories)} categories but the model '
        f'{config.model.num_classes} classes')
  return export_detector(config, variables, categories, out_dir, step=step,
                         weights=used, **kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  platforms = check_platforms(
      p.strip() for p in _PLATFORMS.value.split(',') if p.strip())
  sig = export_workdir(_WORKDIR.value, _OUT.value, _CONFIG.value,
                       _CHECKPOINT.value, _WEIGHTS.value, platforms=platforms,
                       max_batch=_MAX_BATCH.value)
  total = sum(a['bytes'] for a in sig['artifacts'])
  print(f'{len(sig["artifacts"])} artifact(s) ({total / 1e6:.1f} MB, '
        f'{",".join(sig["platforms"])}; step {sig["checkpoint_step"]}, '
        f'{sig["checkpoint_weights"]} weights) and '
        f'{detector_lib.SIGNATURE_FILE} in {_OUT.value}')


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Recipe config (default: WORKDIR/config.json).',
      lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Training WORKDIR.',
                                 required=True)
  _OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)
  _CHECKPOINT, _WEIGHTS = restore.define_checkpoint_flags()
  _PLATFORMS = flags.DEFINE_string(
      'platforms', ','.join(DEFAULT_PLATFORMS),
      'Comma-separated jax.export platforms, all lowered into each artifact.')
  _MAX_BATCH = flags.DEFINE_integer(
      'max_batch', DEFAULT_MAX_BATCH, 'The most images per call.')
  config_lib.run_absl(main)
