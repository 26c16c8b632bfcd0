"""Configs: every recipe loads and resolves; overrides work; unknown keys fail loudly."""
import ast
import glob
import json
import os
import re
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from mimicdet_jax import config_lib
from mimicdet_jax import errors

RECIPES = sorted(p for p in glob.glob('configs/*.py')
                 if os.path.basename(p) not in ('__init__.py', 'common.py'))


def _parse(argv):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  flag_values(['prog'] + argv)
  return flag_values.config


_APP = """
from ml_collections import config_flags
from mimicdet_jax import config_lib
_CONFIG = config_flags.DEFINE_config_file('config')
config_lib.run_absl(
    lambda _: print(_CONFIG.value.optim.base_lr, _CONFIG.value.mimic.paths))
"""


def _run_app(*args):
  """Parses flags exactly as train.py / eval.py do, in a fresh interpreter."""
  return subprocess.run([sys.executable, '-c', _APP, *args], capture_output=True,
                        text=True, check=False)


def test_all_recipes_present():
  names = {os.path.basename(p) for p in RECIPES}
  assert {'mimicdet_r50_fpn_1x.py', 'mimicdet_r101_fpn_2x.py',
          'mimicdet_x101_64x4d_fpn_2x.py', 'demo.py'} <= names


@pytest.mark.parametrize('path', RECIPES)
def test_recipe_loads_and_resolves(path):
  config = _parse([f'--config={path}'])
  resolved = config_lib.resolve(config, num_classes=80)
  assert resolved.model.num_classes == 80
  assert resolved.s_head.num_logits == 81
  assert isinstance(resolved, ml_collections.FrozenConfigDict)
  hash(resolved)  # Flax modules hold it: must be hashable


def test_proxy_recipe_is_the_demo_recipe_on_other_data():
  """configs/proxy_real.py changes only the data paths (a fair comparison)."""
  demo = _parse(['--config=configs/demo.py']).to_dict()
  proxy = _parse(['--config=configs/proxy_real.py']).to_dict()
  paths = ('train_annotations', 'train_images', 'val_annotations', 'val_images')
  for key in paths:
    assert proxy['data'][key].startswith('data/photos/')
    del demo['data'][key], proxy['data'][key]
  assert proxy == demo


def _recipe_source(path):
  """(the configs modules a recipe file imports, the dotted keys it sets)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  parents, assigned = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == 'configs':
      parents += [a.name for a in node.names]
    elif isinstance(node, ast.Assign):
      for target in node.targets:
        parts = []
        while isinstance(target, ast.Attribute):
          parts.append(target.attr)
          target = target.value
        if isinstance(target, ast.Name) and target.id == 'c' and parts:
          assigned.add('.'.join(reversed(parts)))
  return parents, assigned


def _flat(d, prefix=''):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


@pytest.mark.parametrize('path', RECIPES)
def test_recipe_is_one_parent_plus_the_keys_it_sets(path):
  """A recipe is base_config() or one recipe built on it, plus the keys its
  own file sets as `c.section.key = value`: every key where it differs from
  its parent is set in plain sight, it adds no key, and nothing chains
  further (docs/ARCHITECTURE.md; configs/common.py's docstring)."""
  parents, assigned = _recipe_source(path)
  assert len(parents) == 1, f'{path} imports {parents}: one parent'
  if parents[0] == 'common':
    from configs import common  # pylint: disable=g-import-not-at-top
    parent = common.base_config().to_dict()
  else:
    grand, _ = _recipe_source(f'configs/{parents[0]}.py')
    assert grand == ['common'], (
        f'{path} builds on configs/{parents[0]}.py, which builds on {grand}: '
        'one level only')
    parent = _parse([f'--config=configs/{parents[0]}.py']).to_dict()
  mine = _flat(_parse([f'--config={path}']).to_dict())
  parent = _flat(parent)
  assert set(mine) == set(parent), f'{path} adds keys: they belong in common.py'
  changed = {k for k in mine if mine[k] != parent[k]}
  assert changed <= assigned, f'{path} changes {sorted(changed - assigned)} out of sight'


def test_spec_numbers_in_r50_recipe():
  c = _parse(['--config=configs/mimicdet_r50_fpn_1x.py'])
  assert c.refine.pos_shrink == 0.3
  assert c.refine.num_samples == 256 and c.refine.pos_fraction == 0.5
  assert c.proposals.nms_threshold == 0.8 and c.proposals.num_proposals == 2000
  assert c.t_head.num_samples == 128 and c.t_head.fg_fraction == 0.25
  assert c.s_head.ohem_samples == 128
  assert c.eval.score_threshold == 0.005 and c.eval.nms_threshold == 0.6
  assert c.eval.max_detections == 100 and c.eval.pre_nms_topk == 1000
  assert c.optim.base_lr == 0.02 and c.optim.momentum == 0.9
  assert c.optim.weight_decay == 1e-4 and c.optim.warmup_steps == 500
  assert c.train.total_steps == 90000 and tuple(c.optim.decay_steps) == (60000, 80000)
  assert c.data.min_size == 800 and c.data.max_size == 1333
  for h, w in c.data.canvas_buckets:
    assert h % 128 == 0 and w % 128 == 0


def test_override_changes_value():
  out = _run_app('--config=configs/demo.py', '--config.optim.base_lr=0.01',
                 '--config.mimic.paths=cls')
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['0.01', 'cls']


def test_unknown_key_names_the_key():
  out = _run_app('--config', 'configs/demo.py', '--config.optim.no_such_key=1')
  assert out.returncode == 1
  # One line, no traceback (config_lib.run_absl), naming the key and the file.
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "'optim.no_such_key'" in out.stderr
  assert 'configs/demo.py' in out.stderr
  with pytest.raises(errors.ConfigError, match='nosection.lr'):
    config_lib.check_override_keys(
        ['train.py', '--config=configs/demo.py', '--config.nosection.lr=1'])


def test_bad_enum_value_names_the_key():
  c = _parse(['--config=configs/demo.py'])
  c.mimic.cls_distance = 'hamming'
  with pytest.raises(ValueError, match='mimic.cls_distance'):
    config_lib.resolve(c, num_classes=3)
  for key, bad in (('train.parallelism', 'pjit'),
                   ('t_head.roi_align_impl', 'loop')):
    c = _parse(['--config=configs/demo.py'])
    section, name = key.split('.')
    c[section][name] = bad
    with pytest.raises(ValueError, match=fr"{key}='{bad}'; expected one of"):
      config_lib.resolve(c, num_classes=3)


def test_fill_missing_keys_legacy_and_defaults():
  from configs import common as common_config
  base = common_config.base_config().to_dict()
  saved = json.loads(json.dumps(base))  # a config.json of today's code
  del saved['t_head']['level_rule']  # added with the SPEC fix
  del saved['s_head']['fg_fraction']  # added with s_head.sampling
  saved['s_head']['channels'] = 7  # a value of the run: kept
  filled = config_lib.fill_missing_keys(saved, base)
  assert filled['t_head']['level_rule'] == 'fpn'  # what older code did
  assert filled['s_head']['fg_fraction'] == base['s_head']['fg_fraction']
  assert filled['s_head']['channels'] == 7
  # Nothing else moved.
  del filled['t_head']['level_rule'], filled['s_head']['fg_fraction']
  assert filled == saved


def test_config_json_from_before_the_new_keys_still_resolves():
  """eval.py resolves old WORKDIR/config.json files that lack later keys."""
  c = _parse(['--config=configs/demo.py']).to_dict()
  del c['train']['parallelism'], c['train']['compile_cache']
  del c['t_head']['roi_align_impl'], c['data']['device_normalize']
  import ml_collections  # pylint: disable=g-import-not-at-top
  r = config_lib.resolve(ml_collections.ConfigDict(c), num_classes=3)
  assert r.train.parallelism == 'pmap' and r.train.compile_cache == ''
  assert r.t_head.roi_align_impl == 'gather'
  assert r.data.device_normalize is False


def test_parse_overrides_types_values_by_the_current_ones():
  base = _parse(['--config=configs/demo.py'])
  got = config_lib.parse_overrides(
      ['--config.data.canvas_buckets=((128,128),)', '--config.eval.head', 't',
       '--config.model.staggered=False', '--config.train.batch_size=2',
       '--config.optim.base_lr=1'], base)
  assert got == {'data.canvas_buckets': ((128, 128),), 'eval.head': 't',
                 'model.staggered': False, 'train.batch_size': 2,
                 'optim.base_lr': 1.0}
  assert isinstance(got['optim.base_lr'], float)
  with pytest.raises(errors.ConfigError, match="'nope.x'"):
    config_lib.parse_overrides(['--config.nope.x=1'], base)
  with pytest.raises(errors.ConfigError, match='true or false'):
    config_lib.parse_overrides(['--config.model.staggered=maybe'], base)
  config_lib.set_key(base, 'eval.head', 'both')
  assert config_lib.get_key(base, 'eval.head') == 'both'


# ------------------------------------------- allowed values (config_lib.CHOICES)


def _base():
  from configs import common  # pylint: disable=g-import-not-at-top
  return common.base_config()


@pytest.mark.parametrize('key', sorted(config_lib.CHOICES))
def test_every_allowed_value_resolves_and_a_bad_one_is_named(key):
  allowed = config_lib.CHOICES[key]
  assert allowed and len(set(allowed)) == len(allowed), allowed
  assert config_lib.get_key(_base(), key) in allowed, 'the default is allowed'
  for value in allowed:
    c = _base()
    config_lib.set_key(c, key, value)
    assert config_lib.get_key(config_lib.resolve(c, 3), key) == value
  c = _base()
  config_lib.set_key(c, key, 'no_such_value')
  with pytest.raises(errors.ConfigError) as e:
    config_lib.resolve(c, 3)
  message = str(e.value)
  assert message.startswith(f"{key}='no_such_value'; expected one of ")
  for value in allowed:
    assert repr(value) in message


def _common_lines(key):
  """configs/common.py's assignment of `key` and the comments just above it."""
  with open('configs/common.py') as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if line.strip().startswith(f'c.{key} ='):
      j = i
      while j > 0 and lines[j - 1].strip().startswith('#'):
        j -= 1
      return '\n'.join(lines[j:i + 1])
  raise AssertionError(f'{key} is not set in configs/common.py')


@pytest.mark.parametrize('key', sorted(config_lib.CHOICES))
def test_every_allowed_value_is_documented(key):
  """common.py's comment on the key names each allowed value (lists of up
  to 8; a longer one, e.g. train.keep_best's metrics.json keys, only in the
  docs), and a doc of docs/ (history aside) names the key and each value,
  as whole words: a new entry in a list shows up where a reader looks for
  the choices."""
  allowed = [str(v) for v in config_lib.CHOICES[key]]

  def names(text, value):  # a whole word: 'l1' is not named by 'smooth_l1'
    return re.search(rf'(?<!\w){re.escape(value)}(?!\w)', text) is not None

  block = _common_lines(key)
  if len(allowed) <= 8:
    assert [v for v in allowed if not names(block, v)] == [], block
  docs = {}
  for path in glob.glob('docs/*.md'):
    if os.path.basename(path) != 'HISTORY.md':
      with open(path) as f:
        docs[path] = f.read()
  naming = [p for p, text in docs.items() if key in text]
  assert naming, f'no doc names {key}'
  assert any(all(names(docs[p], v) for v in allowed) for p in naming), (
      key, {p: [v for v in allowed if not names(docs[p], v)] for p in naming})


def test_choices_are_the_owners_lists():
  """The lists config_lib checks are the owners' objects, not copies."""
  from mimicdet_jax.losses import mimic  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import heads  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.targets import roi_sampling  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.training import optim  # pylint: disable=g-import-not-at-top
  assert config_lib.CHOICES['mimic.paths'] is mimic.PATHS
  assert config_lib.CHOICES['mimic.cls_distance'] is mimic.PATH_DISTANCES['cls']
  assert config_lib.CHOICES['mimic.reg_distance'] is mimic.PATH_DISTANCES['reg']
  assert config_lib.CHOICES['s_head.sampling'] is roi_sampling.S_HEAD_SAMPLINGS
  assert config_lib.CHOICES['s_head.offset_mode'] is heads.OFFSET_MODES
  assert config_lib.CHOICES['optim.optimizer'] is optim.OPTIMIZERS
  assert tuple(config_lib.CHOICES['t_head.roi_align_impl']) == tuple(
      heads.ROI_ALIGN_IMPLS)


def test_old_mimic_distance_reads_back_as_the_pair_that_reproduces_it():
  from mimicdet_jax.losses import mimic  # pylint: disable=g-import-not-at-top
  base = _base().to_dict()
  for old in mimic.DISTANCES:
    saved = json.loads(json.dumps(base))  # a config.json of the older code
    del saved['mimic']['cls_distance'], saved['mimic']['reg_distance']
    saved['mimic']['distance'] = old
    filled = config_lib.fill_missing_keys(saved, base)
    want_reg = 'cosine' if old in mimic.CLS_ONLY else old
    assert filled['mimic']['cls_distance'] == old
    assert filled['mimic']['reg_distance'] == want_reg
    assert 'distance' not in filled['mimic']
    r = config_lib.resolve(ml_collections.ConfigDict(filled), 3)
    assert (r.mimic.cls_distance, r.mimic.reg_distance) == (old, want_reg)
  # Older still (no distance key at all): cosine on both paths.
  saved = json.loads(json.dumps(base))
  del saved['mimic']['cls_distance'], saved['mimic']['reg_distance']
  filled = config_lib.fill_missing_keys(saved, base)
  assert (filled['mimic']['cls_distance'],
          filled['mimic']['reg_distance']) == ('cosine', 'cosine')


def test_old_mimic_distance_in_a_recipe_or_override_names_the_new_keys():
  c = _base()
  c.mimic.distance = 'kl'  # a fork's recipe written for the older code
  with pytest.raises(errors.ConfigError,
                     match='mimic.distance was replaced by mimic.cls_distance '
                     'and mimic.reg_distance'):
    config_lib.resolve(c, 3)
  with pytest.raises(errors.ConfigError, match='replaced by mimic.cls_distance'):
    config_lib.check_override_keys(
        ['train.py', '--config=configs/demo.py', '--config.mimic.distance=kl'])
  with pytest.raises(errors.ConfigError, match='replaced by mimic.cls_distance'):
    config_lib.get_key(_base(), 'mimic.distance')
