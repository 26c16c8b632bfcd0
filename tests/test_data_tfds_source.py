"""TFDS source: record conversion (always) and coco/2017 through TFDS (only
with the optional tensorflow extra installed)."""
import importlib.util

import numpy as np
import pytest

from mimicdet_jax.data import tfds_source
from mimicdet_jax.data import validation
from mimicdet_jax.data.validation import BadInputError


def _record():
  h, w = 40, 80
  image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
  return {
      'image': image,
      'image/id': 397133,
      'objects': {
          # (ymin, xmin, ymax, xmax) in [0, 1]
          'bbox': np.array([[0.25, 0.5, 0.75, 1.0],
                            [0.0, 0.0, 0.1, 0.05],
                            [0.5, 0.5, 0.5, 0.6]], np.float32),  # zero height
          'label': np.array([0, 79, 3]),
          'is_crowd': np.array([False, True, False]),
          'id': np.array([11, 12, 13]),
      }}


def test_record_becomes_the_raw_example_dict():
  policy = validation.BadInputPolicy('skip', 'coco/2017:validation')
  ex = tfds_source.example_from_tfds(_record(), policy, 'coco/2017:validation')
  assert set(ex) == {'image', 'boxes', 'classes', 'is_crowd', 'image_id', 'orig_size'}
  np.testing.assert_array_equal(ex['boxes'], [[40, 10, 80, 30], [0, 0, 4, 4]])
  np.testing.assert_array_equal(ex['classes'], [1, 80])  # 0..79 -> 1..80
  np.testing.assert_array_equal(ex['is_crowd'], [False, True])
  assert ex['image_id'] == 397133 and ex['image'].shape == (40, 80, 3)
  np.testing.assert_array_equal(ex['orig_size'], [40, 80])
  assert policy.counts == {validation.NON_POSITIVE_BOX: 1}
  strict = validation.BadInputPolicy('fail', 'coco/2017:validation')
  with pytest.raises(BadInputError, match='image 397133, object 13: box with non-positive'):
    tfds_source.example_from_tfds(_record(), strict, 'coco/2017:validation')


def test_coco_category_ids_are_the_official_80():
  ids = tfds_source.COCO_2017_CATEGORY_IDS
  assert len(ids) == 80 and list(ids) == sorted(set(ids))
  assert ids[0] == 1 and ids[-1] == 90
  assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None,
                    reason='tensorflow is installed')
def test_clear_error_without_the_optional_extra():
  with pytest.raises((ImportError, RuntimeError)) as err:
    tfds_source.TfdsSource('coco/2017', 'validation', '/nonexistent/tfds')
  msg = str(err.value)
  assert 'pip install tensorflow' in msg and 'tfds build coco/2017' in msg
  assert 'data_dir=/nonexistent/tfds' in msg


@pytest.mark.tfds
def test_tfds_coco_source_matches_the_records():
  pytest.importorskip('tensorflow')
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=3,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds_source.TfdsSource('coco/2017', 'validation')
    raw = tfds.data_source('coco/2017', split='validation')
    assert len(source) == len(raw) == 3
    assert source.num_classes == 80 and source.label_to_category_id[80] == 90
    for i in range(3):
      ex, rec = source[i], raw[i]
      h, w = rec['image'].shape[:2]
      assert ex['image_id'] == int(rec['image/id'])
      np.testing.assert_array_equal(ex['orig_size'], [h, w])
      assert (ex['boxes'][:, 2] <= w).all() and (ex['boxes'][:, 3] <= h).all()
      assert ((ex['classes'] >= 1) & (ex['classes'] <= 80)).all()
