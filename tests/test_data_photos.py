"""Real-image proxy generator: packaged sources, exact boxes, COCO JSON, determinism, CLI."""
import json
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from mimicdet_jax.data import coco
from mimicdet_jax.data import photos
from mimicdet_jax.data import validation


def test_sources_are_shipped_files_and_object_boxes_lie_inside_them():
  loaded = photos.photos()
  assert set(loaded) == set(photos.PHOTO_FILES)
  for name, photo in loaded.items():
    package, rel = photos.PHOTO_FILES[name]
    assert os.path.isfile(os.path.join(photos.package_dir(package), rel))
    assert photo.image.mode == 'RGB' and min(photo.image.size) >= 100
  names = {c['name'] for c in photos.CATEGORIES}
  assert {o[0] for o in photos.OBJECTS} == names  # every class has a source
  for _, name, (x1, y1, x2, y2) in photos.OBJECTS:
    pw, ph = loaded[name].image.size
    assert 0 <= x1 < x2 <= pw and 0 <= y1 < y2 <= ph and min(x2 - x1, y2 - y1) >= 20
  assert len([o for o in photos.OBJECTS if o[0] == 'coin']) == 24


def test_render_is_deterministic_and_index_dependent():
  a = photos.render_example(3, 'train', 5, 128, 192)
  b = photos.render_example(3, 'train', 5, 128, 192)
  c = photos.render_example(3, 'train', 6, 128, 192)
  d = photos.render_example(3, 'val', 5, 128, 192)
  e = photos.render_example(4, 'train', 5, 128, 192)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  same = lambda x, y: x.shape == y.shape and np.array_equal(x, y)
  for other in (c, d, e):
    assert not same(a['image'], other['image'])


def test_boxes_are_the_pasted_extent_and_the_pixels_there_are_pasted():
  diffs = []
  for index in range(12):
    ex = photos.render_example(0, 'train', index, return_layers=True)
    img, bg = ex['image'].astype(np.float32), ex['background'].astype(np.float32)
    h, w = img.shape[:2]
    assert 192 <= h <= 384 and 192 <= w <= 384
    n = len(ex['boxes'])
    assert n >= 1 and ex['masks'].shape == ex['visible'].shape == (n, h, w)
    for i in range(n):
      ys, xs = np.nonzero(ex['masks'][i] >= 0.5)
      expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # end exclusive
      np.testing.assert_array_equal(ex['boxes'][i], expected)
      x1, y1, x2, y2 = ex['boxes'][i]
      assert 0 <= x1 and 0 <= y1 and x2 <= w and y2 <= h
      assert min(x2 - x1, y2 - y1) >= photos.MIN_BOX_SIDE
      assert ex['areas'][i] == len(xs)
      assert (ex['visible'][i] <= ex['masks'][i] + 1e-6).all()
      assert ex['visible'][i].sum() >= photos.MIN_VISIBLE * ex['masks'][i].sum()
      # Where the object shows, the image is not the background photo.
      shown = ex['visible'][i] > 0.95
      if shown.sum() >= 30:
        diffs.append(np.abs(img[shown] - bg[shown]).mean())
  diffs = np.array(diffs)
  assert len(diffs) >= 20
  assert np.median(diffs) > 40 and diffs.min() > 10


def test_pixels_outside_every_paste_are_the_background_photo():
  checked = 0
  for index in range(10):
    ex = photos.render_example(1, 'val', index, return_layers=True)
    diff = ex['image'].astype(np.float32) - ex['background']
    outside = ex['pasted'] == 0
    assert outside.mean() > 0.1
    # Only the final noise (sigma <= 4, then rounding and clipping) is left.
    assert np.abs(diff[outside].mean()) < 1 and diff[outside].std() < 4.5
    # Each labelled object lies within the pasted area.
    for mask in ex['masks']:
      assert (ex['pasted'][mask > 0] > 0).all()
    checked += len(ex['masks'])
  assert checked >= 10


def test_classes_are_balanced_and_sizes_span_small_to_large():
  counts = np.zeros(len(photos.CATEGORIES), int)
  rel_sizes, areas = [], []
  for index in range(80):
    ex = photos.render_example(2, 'train', index)
    h, w = ex['image'].shape[:2]
    b = ex['boxes']
    rel_sizes += list(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / min(h, w))
    areas += list(ex['areas'])
    for c in ex['category_ids']:
      counts[c - 1] += 1
  assert counts.sum() >= 200
  assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
  areas, rel_sizes = np.array(areas), np.array(rel_sizes)
  assert areas.min() < 16 ** 2 and rel_sizes.max() > 0.6
  small, large = (areas < 32 ** 2).mean(), (areas >= 96 ** 2).mean()
  assert 0.2 < small < 0.5 and 0.08 < large < 0.35  # COCO's APs / APl buckets


def test_written_split_loads_in_pycocotools_and_the_coco_source(tmp_path):
  p1 = photos.write_split(str(tmp_path / 'a'), 'val', 4, seed=5,
                          min_size=128, max_size=192, image_format='png')
  p2 = photos.write_split(str(tmp_path / 'b'), 'val', 4, seed=5,
                          min_size=128, max_size=192, image_format='png',
                          workers=2)
  d1, d2 = json.load(open(p1)), json.load(open(p2))
  assert d1['images'] == d2['images'] and d1['annotations'] == d2['annotations']
  api = COCO(p1)
  assert sorted(api.getCatIds()) == list(range(1, 13))
  assert len(api.getAnnIds()) == len(d1['annotations']) >= 4
  # 'fail': any problem validation finds raises instead of being skipped.
  source = coco.CocoSource(p1, str(tmp_path / 'a' / 'val'), bad_input='fail')
  assert source.bad_input_counts == {}
  assert source.class_names == [c['name'] for c in photos.CATEGORIES]
  images, _ = validation.check_coco_dataset(
      d1, p1, validation.BadInputPolicy('fail', 'val.json'))
  assert sum(len(i['annotations']) for i in images) == len(d1['annotations'])
  for i in range(len(source)):
    ex = photos.render_example(5, 'val', i, 128, 192)
    got = source[i]
    np.testing.assert_array_equal(got['image'], ex['image'])  # png: lossless
    np.testing.assert_array_equal(got['boxes'], ex['boxes'])
    np.testing.assert_array_equal(
        [source.label_to_category_id[int(c)] for c in got['classes']],
        ex['category_ids'])


def test_cli_writes_train_val_and_viz(tmp_path):
  out = str(tmp_path / 'proxy')
  photos.main([out, '--num-train', '3', '--num-val', '2', '--seed', '0',
               '--min-size', '128', '--max-size', '160', '--workers', '1',
               '--viz', '2'])
  assert len(json.load(open(os.path.join(out, 'annotations', 'train.json')))['images']) == 3
  assert len(json.load(open(os.path.join(out, 'annotations', 'val.json')))['images']) == 2
  assert sorted(os.listdir(os.path.join(out, 'train'))) == ['000000.jpg', '000001.jpg', '000002.jpg']
  assert sorted(os.listdir(os.path.join(out, 'viz'))) == ['train_000.png', 'train_001.png']
  raw = np.asarray(Image.open(os.path.join(out, 'train', '000000.jpg')), np.float32)
  ex = photos.render_example(0, 'train', 0, 128, 160)
  assert raw.shape == ex['image'].shape
  assert np.abs(raw - ex['image']).mean() < 4  # the same picture, JPEG-coded
