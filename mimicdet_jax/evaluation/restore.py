"""What evaluation and predict restore from a training WORKDIR.

- `restore_checkpoint` / `restore_variables`: model variables of a checkpoint
  (latest, best, a step or a path), the EMA or the raw weights
  (eval.weights); `checkpoint_steps` lists the committed steps.
- `load_config` / `resolve_config`: the resolved config, from a recipe or
  WORKDIR/config.json, with the number of classes the run trained with.
- `training_categories` / `check_categories`: the categories labels 1..K
  stand for (WORKDIR/categories.json, written by training) and the check
  that validation data has the same ones, by id and name.
- `define_checkpoint_flags`: --checkpoint and --weights, the command-line
  choice of what is restored (eval.py, predict.py, serving/export.py).

A missing workdir file or checkpoint is an errors.MissingFileError: the
command-line tools report it as one line.
"""
import json
import logging
import os
from typing import Any, Optional

from absl import flags
import jax
import numpy as np

from mimicdet_jax import errors


def checkpoint_steps(workdir: str, folder: str = 'checkpoints') -> list[int]:
  """Committed steps under WORKDIR/checkpoints (or WORKDIR/`folder`), ascending.

  Orbax writes a step into a temporary directory and renames it to the bare
  step number when complete, so only all-digit names are finished steps.
  Read-only: unlike a CheckpointManager, this never cleans up temporary
  directories of a training run that is still saving.
  """
  ckpt_dir = os.path.join(workdir, folder)
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(name) for name in os.listdir(ckpt_dir)
                if name.isdigit() and
                os.path.isdir(os.path.join(ckpt_dir, name, 'state')))


# The flags define_checkpoint_flags defines belong to its caller: listed by
# the caller's --help, as if the caller had defined them.
flags.disclaim_key_flags()


def define_checkpoint_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """Defines --checkpoint and --weights (restore_checkpoint's two choices).

  Returns their holders (checkpoint, weights); --weights None means the
  config's eval.weights.
  """
  checkpoint = flags.DEFINE_string(
      'checkpoint', 'latest', "'latest', 'best' (train.keep_best), a step "
      'number or a checkpoint path.')
  weights = flags.DEFINE_string(
      'weights', None, "'ema' (the EMA weights when the run kept them) or "
      "'raw' (default eval.weights of the config).")
  return checkpoint, weights


def restore_variables(workdir: str, checkpoint: str = 'latest',
                      weights: str = 'ema') -> tuple[dict, Optional[int]]:
  """`restore_checkpoint` without saying which weights: (variables, step)."""
  variables, step, _ = restore_checkpoint(workdir, checkpoint, weights)
  return variables, step


def restore_checkpoint(workdir: str, checkpoint: str = 'latest',
                       weights: str = 'ema'
                       ) -> tuple[dict, Optional[int], str]:
  """Model variables {'params', 'frozen'} of a training checkpoint.

  Args:
    workdir: the training WORKDIR (checkpoints under WORKDIR/checkpoints,
      written by mimicdet_jax.checkpoint.Checkpointer; the best one under
      WORKDIR/checkpoints_best, by checkpoint.BestCheckpoint).
    checkpoint: 'latest', 'best' (train.keep_best), a step number, a step
      directory (WORKDIR/checkpoints/1500) or its 'state' item directory.
    weights: eval.weights: 'ema' (the EMA weights when the run kept them,
      else the raw ones) | 'raw'.
  Returns:
    (variables as host arrays, step or None when a path was given,
    'ema' or 'raw': the weights returned).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mimicdet_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  step, folder = None, 'checkpoints'
  if checkpoint in (None, '', 'latest', 'best'):
    if checkpoint == 'best':
      folder = checkpoint_lib.BEST_DIR
    steps = checkpoint_steps(workdir, folder)
    if not steps:
      raise errors.MissingFileError(
          f'{os.path.join(workdir, folder)}: no checkpoint ' + (
              '(train with train.eval_every > 0 and train.keep_best)'
              if checkpoint == 'best' else
              '(train first, or pass --checkpoint PATH)'))
    step = steps[-1]
  elif str(checkpoint).isdigit():
    step = int(checkpoint)
  if step is not None:
    path = os.path.join(workdir, folder, str(step), 'state')
  else:
    path = str(checkpoint)
    if os.path.isdir(os.path.join(path, 'state')):
      path = os.path.join(path, 'state')
    base = os.path.basename(os.path.dirname(os.path.abspath(path)))
    step = int(base) if base.isdigit() else None
  if not os.path.isdir(path):
    raise errors.MissingFileError(f'{path}: checkpoint not found')
  # No template: the saved tree comes back as nested dicts; only the model
  # variables are kept (the optimiser state is not needed).
  state = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  variables, used = checkpoint_lib.model_variables(state, weights)
  variables = jax.tree.map(np.asarray, variables)
  logging.info('restored the %s weights of step %s from %s', used, step, path)
  return variables, step, used


def resolve_config(config, workdir: Optional[str] = None):
  """Resolves a recipe config for inference (number of classes).

  The number of classes is, in order: data.num_classes when set; the one the
  training run recorded in WORKDIR/config.json; the training annotation
  file's categories; the validation file's.
  """
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  if isinstance(config, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    config = ml_collections.ConfigDict(config)
  num_classes = int(config.data.num_classes)
  if num_classes == -1 and workdir:
    saved = os.path.join(workdir, 'config.json')
    if os.path.exists(saved):
      with open(saved) as f:
        num_classes = int(json.load(f)['model']['num_classes'])
  if num_classes == -1:
    for split in ('train', 'val'):
      names = class_names_from_annotations(config.data, split)
      if names is not None:
        num_classes = len(names)
        break
  if num_classes == -1:
    raise errors.ConfigError(
        'cannot tell the number of classes: set --config.data.num_classes '
        'or data.*_annotations')
  return config_lib.resolve(config, num_classes)


def load_config(workdir: str, config=None, head: Optional[str] = None,
                weights: Optional[str] = None):
  """The resolved config: `config` (a recipe) or WORKDIR/config.json.

  `head` ('s', 't', 'both') replaces eval.head, `weights` ('ema', 'raw')
  eval.weights, when given.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  if config is None:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise errors.MissingFileError(
          f'{path}: not found (not a training workdir?); pass --config')
    with open(path) as f:
      config = json.load(f)
  if isinstance(config, dict):
    # A run trained before some keys existed: fill them as that code behaved.
    from configs import common  # pylint: disable=g-import-not-at-top
    from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
    config = _tuples(config_lib.fill_missing_keys(
        config, common.base_config().to_dict()))
  config = ml_collections.ConfigDict(
      config if isinstance(config, dict) else config.to_dict())
  if head is not None:
    config.eval.head = head
  if weights is not None:
    config.eval.weights = weights
  return resolve_config(config, workdir)


def _tuples(obj):
  """JSON lists back to the tuples the configs use."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


CATEGORIES_FILE = 'categories.json'  # WORKDIR/categories.json, written by training


def training_categories(config, workdir: Optional[str]
                        ) -> tuple[Optional[list[dict[str, Any]]], str]:
  """The categories labels 1..K of the model stand for, and their origin.

  WORKDIR/categories.json (written by training) when present, else the
  training annotation file's categories; (None, '') when neither is there
  (a TFDS source: its categories are fixed by the data set).
  """
  path = os.path.join(workdir, CATEGORIES_FILE) if workdir else ''
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f), path
  data = config.data
  if (data.source == 'coco_json' and data.train_annotations and
      os.path.exists(data.train_annotations)):
    from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
    return coco.read_categories(data.train_annotations), data.train_annotations
  return None, ''


def check_categories(config, workdir: Optional[str], source) -> None:
  """Raises unless `source` (validation data) has the model's categories.

  Ids and names must agree with the training categories
  (`training_categories`); without those, at least the count must match.
  """
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  name = getattr(source, 'annotation_file', repr(source))
  expected, expected_name = training_categories(config, workdir)
  if expected is not None:
    validation.check_same_categories(expected, expected_name,
                                     source.categories, name)
  if source.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'{name} has {source.num_classes} categories but the model '
        f'{config.model.num_classes} classes: labels would map to the wrong '
        'category ids')


def class_names_from_annotations(data, split: str) -> Optional[list[str]]:
  """Class names of labels 1..K from a COCO JSON's categories, or None.

  Labels follow increasing category id, as data/coco.py maps them.
  """
  if data.source != 'coco_json':
    return None
  path = data.train_annotations if split == 'train' else data.val_annotations
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    categories = json.load(f).get('categories', [])
  return [c['name'] for c in sorted(categories, key=lambda c: c['id'])]
