"""Resolving a recipe config into the frozen config every module reads, and
command-line overrides of its keys."""
import ast
import os
from typing import Any, Sequence

import ml_collections

from mimicdet_jax import checkpoint
from mimicdet_jax import errors
from mimicdet_jax.data import pipeline
from mimicdet_jax.data import transforms
from mimicdet_jax.data import validation
from mimicdet_jax.errors import ConfigError
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import tta
from mimicdet_jax.losses import detection
from mimicdet_jax.losses import mimic
from mimicdet_jax.losses import total
from mimicdet_jax.models import backbones
from mimicdet_jax.models import heads
from mimicdet_jax.models import mimicdet
from mimicdet_jax.ops import grouped_conv
from mimicdet_jax.ops.nms import NMS_KINDS
from mimicdet_jax.targets import roi_sampling
from mimicdet_jax.training import ema
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel

# Every key with a fixed set of values -> those values, each list defined once
# beside the code that implements the choices (a new choice is one entry
# there, none here); `resolve` checks the config against them. One line a key.
CHOICES = {
    'data.source': pipeline.SOURCES,
    'data.bad_input': validation.POLICIES,
    'data.augment': transforms.AUGMENTS,
    'model.dtype': mimicdet.DTYPES,
    'model.backbone.arch': tuple(backbones.ARCHS),
    'model.backbone.norm': backbones.NORMS,
    'model.backbone.grouped_conv': grouped_conv.IMPLS,
    'refine.cls_loss': detection.REFINE_CLS_LOSSES,
    't_head.level_rule': mimicdet.T_HEAD_LEVEL_RULES,
    't_head.roi_align_impl': tuple(heads.ROI_ALIGN_IMPLS),
    't_head.norm': heads.HEAD_NORMS,
    's_head.offset_mode': heads.OFFSET_MODES,
    's_head.sampling': roi_sampling.S_HEAD_SAMPLINGS,
    's_head.norm': heads.HEAD_NORMS,
    'mimic.paths': mimic.PATHS,
    'mimic.cls_distance': mimic.PATH_DISTANCES['cls'],
    'mimic.reg_distance': mimic.PATH_DISTANCES['reg'],
    'mimic.teacher_grad': mimic.TEACHER_GRADS,
    'mimic.samples': total.MIMIC_SAMPLES,
    'optim.optimizer': optim.OPTIMIZERS,
    'train.parallelism': parallel.PARALLELISMS,
    'train.keep_best': checkpoint.KEEP_BEST,
    'eval.head': tuple(postprocess.EVAL_HEADS),
    'eval.nms': NMS_KINDS,
    'eval.tta': tta.TTA_MODES,
    'eval.weights': checkpoint.WEIGHTS,
}


def resolve(config: ml_collections.ConfigDict,
            num_classes: int) -> ml_collections.FrozenConfigDict:
  """Fills the keys left at -1 and checks the values that must agree.

  Args:
    config: a recipe config (configs/*.py), possibly with overrides.
    num_classes: foreground classes of the training annotation file; used
      when `data.num_classes` (and `model.num_classes`) are -1.

  Returns:
    A FrozenConfigDict (hashable, so Flax modules can hold it).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  for old in REPLACED_KEYS:
    section, name = old.split('.')
    if name in c[section]:  # a recipe written for older code
      raise _replaced(old)
  # Keys added after some WORKDIR/config.json files were written (eval.py
  # reads those): absent means the behaviour of the time (LEGACY_VALUES).
  for key, value in LEGACY_VALUES.items():
    section, name = key.split('.')
    if name not in c[section]:
      c[section][name] = value
  if c.data.num_classes == -1:
    c.data.num_classes = int(num_classes)
  if c.model.num_classes == -1:
    c.model.num_classes = c.data.num_classes
  if c.s_head.num_logits == -1:
    c.s_head.num_logits = c.model.num_classes + 1
  if c.model.num_classes < 1:
    raise ConfigError(f'model.num_classes must be >= 1, got {c.model.num_classes}')
  for key, allowed in CHOICES.items():
    check_choice(key, get_key(c, key), allowed)
  if c.mimic.enabled and 'cls' in mimic.mimic_paths(c.mimic.paths) and (
      c.s_head.num_logits != c.model.num_classes + 1):
    raise ConfigError(
        f's_head.num_logits={c.s_head.num_logits} differs from the T-head '
        f'({c.model.num_classes + 1} logits): the cls mimic needs equal widths')
  ema.check_config(c.optim)
  if not float(c.eval.soft_nms_sigma) > 0:
    raise ConfigError(f'eval.soft_nms_sigma={c.eval.soft_nms_sigma}; '
                      'expected > 0')
  optim.lr_mults(c.optim)  # ConfigError unless each is > 0
  transforms.check_lsj_config(c.data)
  k = c.train.grad_accum_steps
  if not isinstance(k, int) or k < 1 or c.train.batch_size % k:
    raise ConfigError(f'train.grad_accum_steps={k!r}; expected an integer >= 1 '
                      f'dividing train.batch_size={c.train.batch_size}')
  finish = c.train.s_head_finish_steps
  if not isinstance(finish, int) or not 0 <= finish < c.train.total_steps:
    raise ConfigError(f'train.s_head_finish_steps={finish!r}; expected an '
                      'integer from 0 to train.total_steps '
                      f'({c.train.total_steps}) - 1')
  if not float(c.train.s_head_finish_lr_mult) > 0:
    raise ConfigError('train.s_head_finish_lr_mult='
                      f'{c.train.s_head_finish_lr_mult}; expected > 0')
  for h, w in c.data.canvas_buckets:
    if h % c.data.size_divisor or w % c.data.size_divisor:
      raise ConfigError(f'data.canvas_buckets entry {(h, w)} is not divisible by '
                       f'data.size_divisor={c.data.size_divisor}')
  return ml_collections.FrozenConfigDict(c)


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
  """ConfigError naming the key, the value and the allowed ones (CHOICES)."""
  if value not in allowed:
    raise ConfigError(f'{key}={value!r}; expected one of {tuple(allowed)}')


def check_override_keys(argv: list[str], flag_name: str = 'config') -> None:
  """Fails early, naming the key, on `--config.<key>=...` for a key that does not exist.

  ml_collections' own error is a bare KeyError with only the last component;
  this names the whole dotted key and the config file. Call it with sys.argv
  before absl parses the flags (`run_absl` does).

  Raises:
    ConfigError: an unknown key, or a --config file that does not load.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  prefix = f'--{flag_name}.'
  overrides = [a for a in argv if a.startswith(prefix)]
  if not overrides:
    return
  path = None
  for i, a in enumerate(argv):
    if a.startswith(f'--{flag_name}='):
      path = a.split('=', 1)[1]
    elif a == f'--{flag_name}' and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return
  path = path.split(':', 1)[0]  # config_flags allows "file.py:arg"
  if not os.path.isfile(path):
    raise ConfigError(f'--{flag_name} {path}: config file not found')
  spec = importlib.util.spec_from_file_location('_mimicdet_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for override in overrides:
    key = override[len(prefix):].split('=', 1)[0]
    if key in REPLACED_KEYS:
      raise _replaced(key)
    try:
      get_key(config, key)
    except ConfigError:
      raise ConfigError(f'Unknown config key {key!r} (from {override!r}) in '
                        f'{path}; the keys are listed in configs/common.py'
                        ) from None


# Keys added after runs were already trained, with the value that reproduces
# what a run made before the key existed did. A WORKDIR/config.json without
# one of these keys gets this value, not today's default (`fill_missing_keys`).
LEGACY_VALUES = {
    't_head.level_rule': 'fpn',
    'mimic.include_gt': True,
    'proposals.inside_image': False,
    's_head.offset_mode': 'learned',
    's_head.sampling': 'ohem',
    't_head.roi_align_impl': 'gather',
    'train.parallelism': 'pmap',
    'train.compile_cache': '',
    'data.device_normalize': False,
    'mimic.cls_distance': 'cosine',  # before mimic.distance existed
    'mimic.reg_distance': 'cosine',
}


def _legacy_mimic_distance(d: str) -> dict[str, str]:
  # One distance for both paths, where kl fell back to cosine on reg.
  return {'mimic.cls_distance': d,
          'mimic.reg_distance': 'cosine' if d in mimic.CLS_ONLY else d}


# Keys replaced by others: old key -> (the new keys, f(old value) = {new key:
# the value that reproduces what the old one did}). A WORKDIR/config.json with
# the old key gets the new ones (`fill_missing_keys`); a recipe, an override
# or a grid entry naming it is an error that names the new keys.
REPLACED_KEYS = {
    'mimic.distance': (('mimic.cls_distance', 'mimic.reg_distance'),
                       _legacy_mimic_distance),
}


def _replaced(old: str) -> ConfigError:
  return ConfigError(f'{old} was replaced by '
                     f'{" and ".join(REPLACED_KEYS[old][0])} '
                     '(configs/common.py, docs/LOSSES.md)')


def fill_missing_keys(saved: dict, defaults: dict, prefix: str = '') -> dict:
  """A saved config (plain dict) with the keys it lacks added.

  A run's WORKDIR/config.json holds the keys of the code that trained it;
  newer code reads more. Each missing key takes LEGACY_VALUES' value (the
  behaviour of that older code) when listed there, else `defaults`' (today's
  base config, for keys that change nothing a trained model depends on).
  A key of REPLACED_KEYS becomes the keys that replaced it. Keys the saved
  config has are kept as they are.
  """
  out = dict(saved)
  for old, (_, replace) in REPLACED_KEYS.items() if not prefix else ():
    section, name = old.split('.')
    if name in out.get(section, {}):
      out[section] = dict(out[section])
      for new, value in replace(out[section].pop(name)).items():
        out[section].setdefault(new.split('.')[1], value)
  for key, default in defaults.items():
    name = f'{prefix}{key}'
    if isinstance(default, dict):
      out[key] = fill_missing_keys(out.get(key, {}), default, f'{name}.')
    elif key not in out:
      out[key] = LEGACY_VALUES.get(name, default)
  return out


def parse_value(text: str, current: Any) -> Any:
  """A command-line value for a config key whose current value is `current`.

  bool keys take true/false (any case) or 1/0; str keys take the text as is;
  numbers and tuples are Python literals (lists become tuples).
  """
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ConfigError(f'expected true or false, got {text!r}')
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  return _tuples(value)


def _tuples(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config[key] = value for a dotted key that must already exist."""
  *path, last = key.split('.')
  node = config
  for part in path:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f'unknown config key {key!r} (see configs/common.py)')
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or last not in node:
    raise ConfigError(f'unknown config key {key!r} (see configs/common.py)')
  try:
    node[last] = value
  except TypeError as e:  # ml_collections refuses a value of another type
    raise ConfigError(f'{key}={value!r}: expected a value like '
                      f'{node[last]!r}') from e


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
  """config[key] for a dotted key; ConfigError naming it when it is absent."""
  if key in REPLACED_KEYS:
    raise _replaced(key)
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f'unknown config key {key!r} (see configs/common.py)')
    node = node[part]
  return node


def parse_overrides(argv: Sequence[str], config: ml_collections.ConfigDict
                    ) -> dict[str, Any]:
  """`--config.key=value` (or `--config.key value`) flags -> {key: value}.

  Values are typed by the key's current value in `config` (`parse_value`);
  apply them with `set_key`. For scripts that take overrides outside
  absl's config_flags (experiments/ablate.py).
  """
  out, i = {}, 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith('--config.'):
      raise ConfigError(f'unexpected argument {arg!r}')
    body = arg[len('--config.'):]
    if '=' in body:
      key, text = body.split('=', 1)
    else:
      if i + 1 >= len(argv):
        raise ConfigError(f'{arg} needs a value')
      key, text = body, argv[i + 1]
      i += 1
    out[key] = parse_value(text, get_key(config, key))
    i += 1
  return out


def run_absl(main, check_config_flags: bool = True) -> None:
  """`absl.app.run(main)` for an entry point with a `--config` file flag.

  Checks the `--config.<key>=...` overrides first (absl would otherwise stop
  with ml_collections' bare KeyError), then runs `main` under `errors.cli`.
  """
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  if check_config_flags:
    errors.cli(check_override_keys)(sys.argv)
  app.run(errors.cli(main))
