"""Every bad input gets a message naming the file and the id; skip vs fail."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from mimicdet_jax.data import coco
from mimicdet_jax.data import validation
from mimicdet_jax.data.validation import BadInputError


def _dataset(tmp_path, annotations=(), images=None, categories=None, write=True):
  """Two 40x50 images (ids 10, 11) and categories 3 ('a'), 8 ('b')."""
  if write:
    for name, value in (('x.png', 50), ('y.png', 200)):
      Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(tmp_path / name)
  ann = {
      'images': images if images is not None else [
          {'id': 10, 'file_name': 'x.png', 'width': 50, 'height': 40},
          {'id': 11, 'file_name': 'y.png', 'width': 50, 'height': 40}],
      'annotations': list(annotations),
      'categories': categories if categories is not None else [
          {'id': 3, 'name': 'a'}, {'id': 8, 'name': 'b'}],
  }
  path = tmp_path / 'ann.json'
  path.write_text(json.dumps(ann))
  return str(path)


def _ann(ann_id, bbox, category_id=3, image_id=10):
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id,
          'bbox': bbox, 'iscrowd': 0}


GOOD = _ann(1, [2, 3, 10, 12])


@pytest.mark.parametrize('bad, kind, words', [
    (_ann(7, [5, 5, 0, 10]), validation.NON_POSITIVE_BOX,
     ['annotation 7', 'image 10', 'non-positive size', 'w=0']),
    (_ann(7, [5, 5, 10, -3]), validation.NON_POSITIVE_BOX,
     ['annotation 7', 'image 10', 'non-positive size']),
    (_ann(7, [60, 5, 10, 10]), validation.BOX_OUTSIDE_IMAGE,
     ['annotation 7', 'image 10', 'outside the image', 'width 50']),
    (_ann(7, [5, -30, 10, 20]), validation.BOX_OUTSIDE_IMAGE,
     ['annotation 7', 'outside the image']),
    (_ann(7, [5, 5, 10, 10], category_id=4), validation.UNKNOWN_CATEGORY,
     ['annotation 7', 'image 10', 'unknown category id 4', '[3, 8]']),
    (_ann(7, [5, 5, 10, 10], image_id=99), validation.UNKNOWN_IMAGE,
     ['annotation 7', 'image 99']),
    (_ann(7, [5, 5, 10]), validation.MALFORMED_BOX, ['annotation 7', 'bbox']),
])
def test_bad_annotation_fail_and_skip(tmp_path, caplog, bad, kind, words):
  path = _dataset(tmp_path, [GOOD, bad])
  with pytest.raises(BadInputError) as err:
    coco.CocoSource(path, str(tmp_path), bad_input='fail')
  for w in [path] + words:
    assert w in str(err.value)

  with caplog.at_level(logging.WARNING):
    source = coco.CocoSource(path, str(tmp_path), bad_input='skip')
  assert source.bad_input_counts == {kind: 1}
  np.testing.assert_array_equal(source[0]['boxes'], [[2, 3, 12, 15]])  # good one kept
  logged = caplog.text
  assert all(w in logged for w in words)  # the first case is logged in full
  assert f'ann.json: skipped 1 x {kind}' in logged  # one-line summary


def test_small_overshoot_is_clipped_not_rejected(tmp_path):
  path = _dataset(tmp_path, [_ann(1, [-0.5, 30, 51, 10.7])])
  source = coco.CocoSource(path, str(tmp_path), bad_input='fail')
  np.testing.assert_allclose(source[0]['boxes'], [[0, 30, 50, 40]])


def test_skip_counts_every_case_and_logs_one_line_each(tmp_path, caplog):
  bad = [_ann(i, [5, 5, 0, 3]) for i in range(2, 6)]
  path = _dataset(tmp_path, [GOOD] + bad)
  with caplog.at_level(logging.WARNING):
    source = coco.CocoSource(path, str(tmp_path))
  assert source.bad_input_counts == {validation.NON_POSITIVE_BOX: 4}
  assert caplog.text.count('non-positive size w=') == 1
  assert 'skipped 4 x box with non-positive size' in caplog.text


@pytest.mark.parametrize('content, words', [
    ('{}', ['has no images']),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
     ['has no images']),
    ('', ['cannot read the annotation file as JSON']),
    ('{"images": [', ['cannot read the annotation file as JSON']),
    ('[1, 2]', ['has no images']),
    ('{"images": [{"id": 1, "file_name": "x.png", "width": 5, "height": 5}]}',
     ['has no categories']),
])
def test_unusable_annotation_file_fails_under_both_policies(tmp_path, content, words):
  path = tmp_path / 'bad.json'
  path.write_text(content)
  for policy in validation.POLICIES:  # every policy, a new one too
    with pytest.raises(BadInputError) as err:
      coco.CocoSource(str(path), str(tmp_path), bad_input=policy)
    assert str(path) in str(err.value)
    assert all(w in str(err.value) for w in words)


def test_missing_annotation_file(tmp_path):
  with pytest.raises(BadInputError, match='nope.json: annotation file not found'):
    coco.CocoSource(str(tmp_path / 'nope.json'), str(tmp_path))


def test_bad_image_entries(tmp_path):
  images = [{'id': 10, 'file_name': 'x.png', 'width': 50, 'height': 40},
            {'id': 12, 'file_name': 'z.png', 'width': 0, 'height': 40},
            {'id': 10, 'file_name': 'y.png', 'width': 50, 'height': 40}]
  path = _dataset(tmp_path, [GOOD], images=images)
  with pytest.raises(BadInputError, match='image 12: entry needs'):
    coco.CocoSource(path, str(tmp_path), bad_input='fail')
  source = coco.CocoSource(path, str(tmp_path))
  assert len(source) == 1
  assert source.bad_input_counts == {validation.BAD_IMAGE_ENTRY: 1,
                                     validation.DUPLICATE_IMAGE_ID: 1}


@pytest.mark.parametrize('break_image, kind, words', [
    (lambda p: p.unlink(), validation.MISSING_IMAGE,
     ['x.png', 'image 10', 'missing or unreadable', 'FileNotFoundError']),
    (lambda p: p.write_bytes(b'not an image at all'), validation.MISSING_IMAGE,
     ['x.png', 'image 10', 'missing or unreadable']),
    (lambda p: Image.fromarray(np.zeros((41, 50, 3), np.uint8)).save(p),
     validation.IMAGE_SIZE_MISMATCH, ['x.png', 'image 10', 'size differs']),
])
def test_bad_image_at_load_time(tmp_path, caplog, break_image, kind, words):
  path = _dataset(tmp_path, [GOOD, _ann(2, [1, 1, 5, 5], image_id=11)])
  break_image(tmp_path / 'x.png')
  source = coco.CocoSource(path, str(tmp_path), bad_input='fail')
  with pytest.raises(BadInputError) as err:
    source[0]
  assert all(w in str(err.value) for w in words)
  assert source[1]['image_id'] == 11  # others still load

  source = coco.CocoSource(path, str(tmp_path), bad_input='skip')
  with caplog.at_level(logging.WARNING):
    ex = source[0]  # the next readable image instead, counted
  assert ex['image_id'] == 11 and (ex['image'] == 200).all()
  assert source.bad_input_counts == {kind: 1}
  assert all(w in caplog.text for w in words)


def test_no_readable_image_at_all(tmp_path):
  path = _dataset(tmp_path, [GOOD], write=False)
  source = coco.CocoSource(path, str(tmp_path))
  with pytest.raises(BadInputError, match='none of the 2 images'):
    source[0]


def test_unknown_policy_is_rejected(tmp_path):
  path = _dataset(tmp_path, [GOOD])
  with pytest.raises(ValueError, match='data.bad_input must be one of'):
    coco.CocoSource(path, str(tmp_path), bad_input='ignore')
