"""restore: the categories a model was trained on, and the check that the
validation data has the same ones (same count is not enough)."""
import json
import types

import pytest

from configs import demo
from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import restore
from mimicdet_jax.data import validation


def _config(train_annotations):
  c = demo.get_config()
  c.data.train_annotations = str(train_annotations)
  return config_lib.resolve(c, 2)


def _source(path, categories):
  return types.SimpleNamespace(annotation_file=str(path),
                               categories=categories,
                               num_classes=len(categories))


def test_categories_from_the_workdir_then_the_training_file(tmp_path):
  train = tmp_path / 'train.json'
  train.write_text(json.dumps(dict(images=[], categories=[
      dict(id=7, name='b'), dict(id=3, name='a')])))
  config = _config(train)
  got, origin = restore.training_categories(config, str(tmp_path / 'none'))
  assert got == [dict(id=3, name='a'), dict(id=7, name='b')]
  assert origin == str(train)
  (tmp_path / restore.CATEGORIES_FILE).write_text(json.dumps(
      [dict(id=1, name='x'), dict(id=2, name='y')]))
  got, origin = restore.training_categories(config, str(tmp_path))
  assert [c['id'] for c in got] == [1, 2]
  assert origin == str(tmp_path / restore.CATEGORIES_FILE)


def test_same_count_other_ids_is_an_error_naming_both_files(tmp_path):
  (tmp_path / restore.CATEGORIES_FILE).write_text(json.dumps(
      [dict(id=1, name='a'), dict(id=2, name='b')]))
  config = _config(tmp_path / 'missing.json')
  same = _source(tmp_path / 'val.json', [dict(id=1, name='a'),
                                         dict(id=2, name='b')])
  restore.check_categories(config, str(tmp_path), same)
  shifted = _source(tmp_path / 'val.json', [dict(id=1, name='a'),
                                            dict(id=5, name='b')])
  with pytest.raises(validation.BadInputError) as e:
    restore.check_categories(config, str(tmp_path), shifted)
  msg = str(e.value)
  assert str(tmp_path / 'val.json') in msg
  assert str(tmp_path / restore.CATEGORIES_FILE) in msg
  assert "2='b'" in msg and "5='b'" in msg
  renamed = _source(tmp_path / 'val.json', [dict(id=1, name='a'),
                                            dict(id=2, name='c')])
  with pytest.raises(validation.BadInputError, match="2='c'"):
    restore.check_categories(config, str(tmp_path), renamed)
