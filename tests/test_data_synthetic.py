"""Synthetic shapes generator: determinism, exact boxes, COCO JSON, CLI."""
import json
import os

import numpy as np
from PIL import Image

from mimicdet_jax.data import synthetic


def test_render_is_deterministic_and_index_dependent():
  a = synthetic.render_example(3, 'train', 5, 64, 128)
  b = synthetic.render_example(3, 'train', 5, 64, 128)
  c = synthetic.render_example(3, 'train', 6, 64, 128)
  d = synthetic.render_example(3, 'val', 5, 64, 128)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  same = lambda x, y: x.shape == y.shape and np.array_equal(x, y)
  assert not same(a['image'], c['image'])
  assert not same(a['image'], d['image'])


def test_boxes_are_the_exact_extent_of_each_drawn_shape():
  for index in range(12):
    ex = synthetic.render_example(0, 'train', index, 96, 160, return_masks=True)
    img = ex['image'].astype(np.float32)
    h, w = img.shape[:2]
    assert 96 <= h <= 160 and 96 <= w <= 160
    n = len(ex['boxes'])
    assert n >= 1 and ex['masks'].shape == (n, h, w)
    for i in range(n):
      mask = ex['masks'][i]
      ys, xs = np.nonzero(mask)
      expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # end exclusive
      np.testing.assert_array_equal(ex['boxes'][i], expected)
      assert ex['areas'][i] == mask.sum()
      # The visible part (not covered by later shapes) shows one flat colour
      # up to the added noise (sigma <= 10): it really was drawn there.
      visible = mask & ~ex['masks'][i + 1:].any(0)
      if visible.sum() >= 20:
        assert img[visible].std(0).max() < 14.0


def test_object_statistics_cover_classes_sizes_and_aspect_ratios():
  sizes, cats, aspects = [], set(), []
  for index in range(60):
    ex = synthetic.render_example(1, 'train', index)
    h, w = ex['image'].shape[:2]
    aspects.append(w / h)
    b = ex['boxes']
    sizes += list(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / min(h, w))
    sizes_px = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    assert (sizes_px >= 6).all()
    cats |= set(ex['category_ids'].tolist())
  assert cats == {c['id'] for c in synthetic.CATEGORIES}
  sizes = np.array(sizes)
  assert sizes.min() < 0.08 and sizes.max() > 0.6  # ~8 px .. most of the image
  assert min(aspects) < 0.75 and max(aspects) > 1.33


def test_write_split_is_valid_coco_and_independent_of_workers(tmp_path):
  p1 = synthetic.write_split(str(tmp_path / 'a'), 'val', 5, seed=2,
                             min_size=64, max_size=96, image_format='png')
  p2 = synthetic.write_split(str(tmp_path / 'b'), 'val', 5, seed=2,
                             min_size=64, max_size=96, image_format='png',
                             workers=2)
  d1, d2 = json.load(open(p1)), json.load(open(p2))
  assert d1['images'] == d2['images'] and d1['annotations'] == d2['annotations']
  assert [c['id'] for c in d1['categories']] == [1, 3, 5, 7, 9, 11]
  assert [img['id'] for img in d1['images']] == [1, 2, 3, 4, 5]
  ann_ids = [a['id'] for a in d1['annotations']]
  assert len(set(ann_ids)) == len(ann_ids)
  for img in d1['images']:
    pil = Image.open(tmp_path / 'a' / 'val' / img['file_name'])
    assert pil.size == (img['width'], img['height'])
  for a in d1['annotations']:
    x, y, bw, bh = a['bbox']
    assert all(isinstance(v, int) for v in a['bbox']) and bw > 0 and bh > 0
    assert a['iscrowd'] == 0 and a['area'] <= bw * bh


def test_cli_writes_train_val_and_viz(tmp_path):
  out = str(tmp_path / 'syn')
  synthetic.main([out, '--num-train', '3', '--num-val', '2', '--seed', '0',
                  '--min-size', '64', '--max-size', '96', '--workers', '1',
                  '--viz', '2'])
  assert len(json.load(open(os.path.join(out, 'annotations', 'train.json')))['images']) == 3
  assert len(json.load(open(os.path.join(out, 'annotations', 'val.json')))['images']) == 2
  assert sorted(os.listdir(os.path.join(out, 'train'))) == ['000000.jpg', '000001.jpg', '000002.jpg']
  viz = sorted(os.listdir(os.path.join(out, 'viz')))
  assert viz == ['train_000.png', 'train_001.png']
  pic = np.asarray(Image.open(os.path.join(out, 'viz', viz[0])))
  raw = np.asarray(Image.open(os.path.join(out, 'train', '000000.jpg')))
  assert pic.shape == raw.shape and not np.array_equal(pic, raw)  # boxes drawn
