"""The two further real-image sets (data/glyphs.py, data/crowds.py): shipped
sources, exact boxes, COCO JSON, determinism, the loader under the documented
overrides, and the statistics that set them apart from each other and from
the proxy (data/photos.py)."""
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from configs import photos as photos_recipe
from mimicdet_jax.data import coco
from mimicdet_jax.data import crowds
from mimicdet_jax.data import glyphs
from mimicdet_jax.data import photos
from mimicdet_jax.data import pipeline

SETS = (glyphs, crowds)
# The keys docs/DATA.md tells a user to add to the four data paths.
OVERRIDES = {glyphs: {}, crowds: {'max_boxes': 40}}
_ids = lambda m: m.__name__.rsplit('.', 1)[-1]


def _sizes(module):
  """Small images, within each set's drawable range (the defaults' lower end)."""
  return {glyphs: (128, 192), crowds: (128, 160)}[module]


def test_sources_are_shipped_files_that_render():
  for name, (package, rel) in glyphs.FONT_FILES.items():
    assert os.path.isfile(os.path.join(photos.package_dir(package), rel)), name
    for ch in glyphs.CHARACTERS + glyphs.DISTRACTOR_CHARACTERS + (
        glyphs.GREEK_CHARACTERS if name in glyphs._GREEK_FONTS else ''):
      fill, shape = glyphs._glyph_masks(np.random.default_rng(0), ch, name, 30, 2)
      # Drawn, not a missing-glyph box: strokes cover a part of the box only.
      assert 0.05 < (fill >= 0.5).mean() < 0.8, (name, ch)
      assert (shape >= fill - 1e-6).all()
  faces, non_faces = crowds.lfw()
  assert faces.shape == non_faces.shape == (100, 25, 25) and faces.dtype == np.uint8
  assert len(set(glyphs.CHARACTERS)) == len(glyphs.CATEGORIES) == 24
  assert not set(glyphs.CHARACTERS) & set(glyphs.DISTRACTOR_CHARACTERS)
  assert [c['name'] for c in crowds.CATEGORIES] == ['face', 'coin', 'gravel', 'grass']


@pytest.mark.parametrize('module', SETS, ids=_ids)
def test_render_is_deterministic_and_index_dependent(module):
  lo, hi = _sizes(module)
  a = module.render_example(3, 'train', 5, lo, hi)
  b = module.render_example(3, 'train', 5, lo, hi)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for other in (module.render_example(3, 'train', 6, lo, hi),
                module.render_example(3, 'val', 5, lo, hi),
                module.render_example(4, 'train', 5, lo, hi)):
    assert a['image'].shape != other['image'].shape or not np.array_equal(
        a['image'], other['image'])


@pytest.mark.parametrize('module', SETS, ids=_ids)
def test_boxes_are_the_pasted_extent_and_the_pixels_there_are_pasted(module):
  diffs, checked = [], 0
  for index in range(6):
    ex = module.render_example(0, 'train', index, return_layers=True)
    img, bg = ex['image'].astype(np.float32), ex['background'].astype(np.float32)
    h, w = img.shape[:2]
    n = len(ex['boxes'])
    assert n >= 1 and ex['masks'].shape == (n, h, w)
    for i in range(n):
      mask = ex['masks'][i]
      ys, xs = np.nonzero(mask >= 0.5)
      expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # end exclusive
      np.testing.assert_array_equal(ex['boxes'][i], expected)
      assert ex['areas'][i] == len(xs)
      x1, y1, x2, y2 = (int(v) for v in ex['boxes'][i])
      assert min(x2 - x1, y2 - y1) >= module.MIN_BOX_SIDE
      # Tight against the union of all pastes, a layer kept apart from the
      # masks: every side of the box has pasted pixels on it.
      inside = ex['pasted'][y1:y2, x1:x2] >= 0.5
      assert inside[0].any() and inside[-1].any()
      assert inside[:, 0].any() and inside[:, -1].any()
      assert ex['visible'][i].sum() >= module.MIN_VISIBLE * mask.sum() - 1e-3
      shown = ex['visible'][i] > 0.95
      if shown.sum() >= 20:
        diffs.append(np.abs(img[shown] - bg[shown]).mean())
      checked += 1
    # Pixels under no paste are the background photo plus the final noise.
    outside = ex['pasted'] == 0
    diff = (img - bg)[outside]
    assert outside.mean() > 0.3 and abs(diff.mean()) < 1 and diff.std() < 4.5
  assert checked >= 20 and len(diffs) >= 10
  assert np.median(diffs) > 25


def test_each_glyph_label_is_the_character_drawn_there(monkeypatch):
  """The class of every box is the character whose pasted strokes give it."""
  drawn = []
  real_glyph = glyphs._glyph

  def recording_glyph(rng, img, character, fonts, h, w):
    made = real_glyph(rng, img, character, fonts, h, w)
    if made is not None:
      _, alpha, y0, x0 = made
      ys, xs = np.nonzero(alpha >= 0.5)
      ys, xs = ys + y0, xs + x0
      keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
      ys, xs = ys[keep], xs[keep]
      if ys.size:
        drawn.append((character, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
    return made

  monkeypatch.setattr(glyphs, '_glyph', recording_glyph)
  checked = 0
  for index in range(6):
    drawn.clear()
    ex = glyphs.render_example(2, 'val', index)
    for box, cat in zip(ex['boxes'].tolist(), ex['category_ids'].tolist()):
      names = [ch for ch, b in drawn if b == box]
      assert names == [glyphs.CHARACTERS[cat - 1]], (index, box, cat, names)
      checked += 1
  assert checked >= 20


def test_each_crowd_class_is_cut_from_its_own_source():
  faces, _ = crowds.lfw()
  loaded = photos.photos()
  coin_boxes = [o[2] for o in photos.OBJECTS if o[0] == 'coin']
  rng = np.random.default_rng(0)
  for _ in range(5):
    (kind, face), _ = crowds._source(rng, 'face')
    assert kind == 'grey' and any(np.array_equal(face, f) for f in faces)
    (kind, photo, box), _ = crowds._source(rng, 'coin')
    assert photo is loaded['coins'] and tuple(box) in coin_boxes
    for name in ('gravel', 'grass'):
      (kind, photo, box), _ = crowds._source(rng, name)
      assert photo is loaded[name] and box is not None
    (kind, *src), _ = crowds._source(rng, None)  # a distractor: no class source
    assert kind == 'grey' or src[0] not in (loaded['coins'], loaded['gravel'],
                                            loaded['grass'])


def _stats(render, count):
  """Objects per image, sqrt(w h) of each box, class ids, visible share of
  each object's alpha, and the mean Clark-Evans ratio of the box centres
  (mean nearest-neighbour distance over 0.5 / sqrt(density): 1 for
  uniformly scattered points, below 1 for clustered ones)."""
  per_image, side, classes, visible, clark_evans = [], [], [], [], []
  for index in range(count):
    ex = render(7, 'train', index, return_layers=True)
    b = ex['boxes']
    h, w = ex['image'].shape[:2]
    per_image.append(len(b))
    side += list(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
    classes += ex['category_ids'].tolist()
    visible += list(ex['visible'].sum((1, 2)) / ex['masks'].sum((1, 2)))
    if len(b) >= 3:
      centres = (b[:, :2] + b[:, 2:]) / 2
      d = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
      np.fill_diagonal(d, np.inf)
      clark_evans.append(d.min(1).mean() / (0.5 * np.sqrt(h * w / len(b))))
  return (np.array(per_image), np.array(side), np.array(classes),
          np.array(visible), np.mean(clark_evans))


def test_sets_differ_in_class_count_object_size_and_crowding():
  p_n, p_side, p_cls, _, _ = _stats(photos.render_example, 25)
  g_n, g_side, g_cls, g_vis, g_ce = _stats(glyphs.render_example, 25)
  c_n, c_side, c_cls, c_vis, c_ce = _stats(crowds.render_example, 15)
  # Class counts: 12, 24, 4, each class drawn.
  assert len(photos.CATEGORIES) == 12
  assert set(g_cls) == set(range(1, 25)) and set(c_cls) == set(range(1, 5))
  counts = np.bincount(c_cls)[1:]
  assert counts.min() > 0.6 * counts.mean()
  # Object sizes: medians about 50, 20 and 15 px; the proxy has large ones,
  # the glyphs few, the crowds none.
  assert np.median(p_side) > 35 and (p_side >= 96).mean() > 0.1
  assert 12 < np.median(g_side) < 30 and (g_side >= 96).mean() < 0.02
  assert np.median(c_side) < np.median(g_side) and c_side.max() <= 29
  assert (c_side < 32).all() and (g_side < 32).mean() > 0.6 > (p_side < 32).mean()
  # Objects per image: about 5, 9 and 27; crowds gather (0.92 against 1.1
  # without the clusters) and overlap (27 % of objects partly hidden, 15 %
  # without the clusters), the glyphs scatter and rarely touch.
  assert p_n.mean() < 6 < g_n.mean() < 11 < 15 < c_n.mean()
  assert c_ce < 1.0 < g_ce
  assert (c_vis < 0.9).mean() > 0.2 > 0.05 > (g_vis < 0.9).mean()


@pytest.mark.parametrize('module', SETS, ids=_ids)
def test_written_split_loads_in_pycocotools_and_the_coco_source(module, tmp_path):
  lo, hi = _sizes(module)
  p1 = module.write_split(str(tmp_path / 'a'), 'val', 4, seed=5, min_size=lo,
                          max_size=hi, image_format='png')
  p2 = module.write_split(str(tmp_path / 'b'), 'val', 4, seed=5, min_size=lo,
                          max_size=hi, image_format='png', workers=2)
  d1, d2 = json.load(open(p1)), json.load(open(p2))
  assert d1['images'] == d2['images'] and d1['annotations'] == d2['annotations']
  api = COCO(p1)
  assert sorted(api.getCatIds()) == list(range(1, len(module.CATEGORIES) + 1))
  assert len(api.getAnnIds()) == len(d1['annotations']) >= 4
  source = coco.CocoSource(p1, str(tmp_path / 'a' / 'val'), bad_input='fail')
  assert source.bad_input_counts == {}
  assert source.class_names == [c['name'] for c in module.CATEGORIES]
  for i in range(len(source)):
    ex = module.render_example(5, 'val', i, lo, hi)
    got = source[i]
    np.testing.assert_array_equal(got['image'], ex['image'])  # png: lossless
    np.testing.assert_array_equal(got['boxes'], ex['boxes'])


@pytest.mark.parametrize('module', SETS, ids=_ids)
def test_the_own_photos_recipe_reads_the_set_with_the_documented_overrides(
    module, tmp_path):
  """configs/photos.py + the four data paths (+ OVERRIDES): the loader's
  batches hold every box of the JSON, scaled to the resized image."""
  out = str(tmp_path / 'set')
  module.main([out, '--num-train', '0', '--num-val', '6', '--seed', '1',
               '--workers', '1'])
  config = photos_recipe.get_config()
  config.data.val_annotations = os.path.join(out, 'annotations', 'val.json')
  config.data.val_images = os.path.join(out, 'val')
  config.data.update(OVERRIDES[module])
  assert config.data.max_boxes >= module.MAX_OBJECTS  # nothing truncated
  source = pipeline.build_source(config.data, 'val')
  want = {}
  for a in json.load(open(config.data.val_annotations))['annotations']:
    want.setdefault(a['image_id'], []).append(a['bbox'])
  seen = 0
  for batch in pipeline.make_eval_batches(config, source, batch_size=4):
    for j in np.flatnonzero(batch['example_valid']):
      h, w = batch['orig_size'][j]
      nh, nw = batch['image_size'][j]
      assert max(nh, nw) <= config.data.max_size
      boxes = batch['boxes'][j][batch['box_mask'][j]]
      x, y, bw, bh = np.array(want.get(int(batch['image_id'][j]), []),
                              np.float32).reshape(-1, 4).T
      expected = np.stack([x, y, x + bw, y + bh], 1) * np.float32(
          [nw / w, nh / h, nw / w, nh / h])
      np.testing.assert_allclose(boxes, expected, rtol=1e-5, atol=1e-3)
      seen += 1
  assert seen == 6


@pytest.mark.parametrize('module', SETS, ids=_ids)
def test_cli_writes_train_val_and_viz(module, tmp_path):
  out = str(tmp_path / 'set')
  lo, hi = _sizes(module)
  module.main([out, '--num-train', '3', '--num-val', '2', '--seed', '0',
               '--min-size', str(lo), '--max-size', str(hi), '--workers', '1',
               '--viz', '2'])
  for split, n in (('train', 3), ('val', 2)):
    d = json.load(open(os.path.join(out, 'annotations', f'{split}.json')))
    assert len(d['images']) == n
    assert sorted(os.listdir(os.path.join(out, split))) == [
        f'{i:06d}.jpg' for i in range(n)]
  assert sorted(os.listdir(os.path.join(out, 'viz'))) == ['train_000.png', 'train_001.png']
