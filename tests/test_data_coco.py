"""CocoSource: round trip against the generator's in-memory examples, category
mapping, crowd boxes, pickling."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from mimicdet_jax.data import coco
from mimicdet_jax.data import synthetic

SEED, N, MIN, MAX = 4, 6, 64, 112


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('syn')
  paths = {}
  for fmt in ('png', 'jpg'):
    ann = synthetic.write_split(str(out / fmt), 'train', N, SEED, MIN, MAX,
                                image_format=fmt)
    paths[fmt] = (ann, str(out / fmt / 'train'))
  return paths


def _expected(index):
  """The raw example dict the generator drew, in the source's conventions."""
  ex = synthetic.render_example(SEED, 'train', index, MIN, MAX)
  cat_ids = sorted(c['id'] for c in synthetic.CATEGORIES)
  labels = np.array([cat_ids.index(c) + 1 for c in ex['category_ids']], np.int32)
  h, w = ex['image'].shape[:2]
  return {'image': ex['image'], 'boxes': ex['boxes'], 'classes': labels,
          'is_crowd': np.zeros(len(labels), bool), 'image_id': index + 1,
          'orig_size': np.array([h, w])}


def test_png_round_trip_is_identical(written):
  source = coco.CocoSource(*written['png'])
  assert len(source) == N
  for i in range(N):
    got, want = source[i], _expected(i)
    assert set(got) == {'image', 'boxes', 'classes', 'is_crowd', 'image_id',
                        'orig_size'}
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got['image'].dtype == np.uint8 and got['boxes'].dtype == np.float32
    assert got['classes'].dtype == np.int32 and got['is_crowd'].dtype == bool
    assert got['image_id'].dtype == np.int64 and got['orig_size'].dtype == np.int32


def test_jpeg_round_trip_boxes_exact_pixels_close(written):
  source = coco.CocoSource(*written['jpg'])
  for i in range(N):
    got, want = source[i], _expected(i)
    for k in ('boxes', 'classes', 'is_crowd', 'image_id', 'orig_size'):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    diff = np.abs(got['image'].astype(np.int32) - want['image'].astype(np.int32))
    assert got['image'].shape == want['image'].shape
    assert diff.mean() < 6.0  # JPEG quality 92 on noisy images


def test_category_mapping_is_contiguous_in_id_order(written):
  source = coco.CocoSource(*written['png'])
  assert source.num_classes == 6
  assert source.categories == [dict(c) for c in synthetic.CATEGORIES]
  assert source.class_names == ['circle', 'square', 'triangle', 'star', 'cross', 'ring']
  assert source.label_to_category_id == {1: 1, 2: 3, 3: 5, 4: 7, 5: 9, 6: 11}
  assert source.category_id_to_label == {1: 1, 3: 2, 5: 3, 7: 4, 9: 5, 11: 6}
  np.testing.assert_array_equal(source.image_ids, np.arange(1, N + 1))


def test_any_category_set_crowd_kept_and_grey_images(tmp_path):
  Image.fromarray(np.full((20, 30), 77, np.uint8)).save(tmp_path / 'g.png')  # grey
  Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / 'c.png')
  ann = {
      'images': [{'id': 42, 'file_name': 'g.png', 'width': 30, 'height': 20},
                 {'id': 7, 'file_name': 'c.png', 'width': 10, 'height': 10}],
      'annotations': [
          {'id': 1, 'image_id': 42, 'category_id': 90, 'bbox': [1, 2, 3, 4],
           'iscrowd': 0},
          {'id': 2, 'image_id': 42, 'category_id': 17, 'bbox': [5.5, 0, 10, 8.25],
           'iscrowd': 1},
      ],
      'categories': [{'id': 90, 'name': 'toothbrush'}, {'id': 17, 'name': 'cat'}],
  }
  path = tmp_path / 'a.json'
  path.write_text(json.dumps(ann))
  source = coco.CocoSource(str(path), str(tmp_path))
  assert source.class_names == ['cat', 'toothbrush']  # sorted by category id
  ex = source[0]
  assert ex['image'].shape == (20, 30, 3) and (ex['image'] == 77).all()
  np.testing.assert_array_equal(ex['boxes'], [[1, 2, 4, 6], [5.5, 0, 15.5, 8.25]])
  np.testing.assert_array_equal(ex['classes'], [2, 1])
  np.testing.assert_array_equal(ex['is_crowd'], [False, True])
  assert ex['image_id'] == 42
  empty = source[1]  # an image without annotations is kept, with n = 0
  assert empty['boxes'].shape == (0, 4) and empty['classes'].shape == (0,)


def test_source_pickles_with_stable_repr(written):
  source = coco.CocoSource(*written['png'])
  clone = pickle.loads(pickle.dumps(source))
  assert repr(clone) == repr(source) and 'CocoSource(' in repr(source)
  np.testing.assert_array_equal(clone[3]['image'], source[3]['image'])
  np.testing.assert_array_equal(clone[3]['boxes'], source[3]['boxes'])
  assert len(pickle.dumps(source)) < 20_000  # plain arrays, no pixels


def test_coco_api_reads_the_same_file(written):
  source = coco.CocoSource(*written['png'])
  api = source.coco_api()
  assert sorted(api.getImgIds()) == list(range(1, N + 1))
  anns = api.loadAnns(api.getAnnIds(imgIds=[2]))
  boxes = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                     a['bbox'][1] + a['bbox'][3]] for a in anns], np.float32)
  np.testing.assert_array_equal(boxes, source[1]['boxes'])
