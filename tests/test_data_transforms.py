"""Transforms: boxes stay on the same pixels through resize/flip, static
shapes, canvas choice, truncation, normalisation, determinism."""
import ml_collections
import numpy as np
import pytest

from configs import common
from mimicdet_jax.data import transforms

MEAN = np.array(common.base_config().data.pixel_mean, np.float32)
STD = np.array(common.base_config().data.pixel_std, np.float32)


def _data(**overrides):
  data = common.base_config().data
  data.train_min_sizes = (96, 128)
  data.min_size = 128
  data.max_size = 256
  data.canvas_buckets = ((128, 256), (256, 128), (256, 256))
  data.size_divisor = 128
  data.max_boxes = 5
  data.update(overrides)
  return data


def _raw(h, w, boxes, classes=None, crowd=None, image=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  return {
      'image': image if image is not None else np.full((h, w, 3), 90, np.uint8),
      'boxes': boxes,
      'classes': np.asarray(classes if classes is not None else np.arange(1, n + 1), np.int32),
      'is_crowd': np.asarray(crowd if crowd is not None else np.zeros(n, bool), bool),
      'image_id': np.int64(5), 'orig_size': np.array([h, w], np.int32)}


def test_resized_size_closed_form():
  assert transforms.resized_size(480, 640, 800, 1333) == (800, 1067, 800 / 480)
  # Longer side would be 800 * 1000 / 300 = 2667 > 1333: bound by max_size.
  h, w, s = transforms.resized_size(300, 1000, 800, 1333)
  assert (h, w) == (400, 1333) and s == pytest.approx(1.333)
  assert transforms.resized_size(256, 256, 256, 256) == (256, 256, 1.0)


@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
@pytest.mark.parametrize('hw', [(70, 150), (150, 70), (97, 101)])
def test_box_covers_the_same_coloured_pixels_after_resize_and_flip(flip_prob, hw):
  h, w = hw
  rng = np.random.default_rng(0)
  image = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)  # dark clutter
  box = np.array([11, 17, 53, 61], np.float32)  # x1, y1, x2, y2 end exclusive
  image[17:61, 11:53] = (250, 20, 240)  # a colour the clutter never has
  data = _data(hflip_prob=flip_prob)
  out = transforms.transform_example(_raw(h, w, [box], image=image), data,
                                     train=True, rng=np.random.default_rng(1))
  nh, nw = out['image_size']
  pixels = out['image'][:nh, :nw] * STD + MEAN  # undo the normalisation
  magenta = (pixels[..., 0] > 185) & (pixels[..., 1] < 70) & (pixels[..., 2] > 185)
  ys, xs = np.nonzero(magenta)
  coloured = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
  # Reference: the box mapped by hand with the per-axis resize factors.
  fx, fy = nw / w, nh / h
  ref = box * np.array([fx, fy, fx, fy])
  if flip_prob:
    ref = np.array([nw - ref[2], ref[1], nw - ref[0], ref[3]])
  np.testing.assert_allclose(out['boxes'][0], ref, atol=1e-4)
  # Bilinear resampling blurs edges by about a pixel.
  np.testing.assert_allclose(out['boxes'][0], coloured, atol=1.01)
  assert out['box_mask'].tolist() == [True] + [False] * 4


@pytest.mark.parametrize('hw', [(20, 30), (480, 640), (640, 480), (300, 1000),
                                (1000, 300), (256, 256), (33, 400)])
def test_static_shapes_for_any_image_size(hw):
  data = _data()
  out = transforms.transform_example(_raw(*hw, [[1, 1, 10, 12]]), data, train=False)
  hc, wc = out['image'].shape[:2]
  assert (hc, wc) in data.canvas_buckets
  assert out['boxes'].shape == (5, 4) and out['classes'].shape == (5,)
  assert out['box_mask'].shape == (5,) and out['is_crowd'].shape == (5,)
  assert out['image_size'].shape == (2,) and out['orig_size'].shape == (2,)
  assert out['scale'].shape == () and out['image_id'].shape == ()
  nh, nw = out['image_size']
  assert min(nh, nw) <= data.min_size and max(nh, nw) <= data.max_size
  assert min(nh, nw) == data.min_size or max(nh, nw) == data.max_size
  # The smallest canvas that holds it, by area.
  areas = [b[0] * b[1] for b in data.canvas_buckets if b[0] >= nh and b[1] >= nw]
  assert hc * wc == min(areas)
  batch = transforms.collate([out, transforms.transform_example(
      _raw(40, 40, []), data, train=False)], data.canvas_buckets)  # 128 x 128
  assert batch['image'].shape[0] == 2 and batch['image'].shape[1:3] == (hc, wc)


def test_collate_pads_to_the_bucket_that_holds_all():
  data = _data()
  wide = transforms.transform_example(_raw(100, 200, []), data, train=False)
  tall = transforms.transform_example(_raw(200, 100, []), data, train=False)
  assert wide['image'].shape[:2] == (128, 256) and tall['image'].shape[:2] == (256, 128)
  batch = transforms.collate([wide, tall], data.canvas_buckets)
  assert batch['image'].shape == (2, 256, 256, 3)
  np.testing.assert_array_equal(batch['image'][0, :128, :], wide['image'])
  assert (batch['image'][0, 128:] == 0).all()
  fixed = transforms.collate([wide], data.canvas_buckets, fixed_canvas=(256, 256))
  assert fixed['image'].shape == (1, 256, 256, 3)


def test_canvas_errors_name_the_config_key():
  with pytest.raises(ValueError, match='data.canvas_buckets'):
    transforms.choose_canvas([(300, 100)], ((256, 256),))
  with pytest.raises(ValueError, match='data.canvas_buckets'):
    transforms.largest_canvas(((128, 256), (256, 128)))
  with pytest.raises(ValueError, match='size_divisor'):
    transforms.check_data_config(_data(canvas_buckets=((100, 256),)))
  with pytest.raises(ValueError, match='data.canvas_buckets'):
    transforms.check_data_config(_data(max_size=300))
  transforms.check_data_config(_data())  # consistent


def test_normalisation_and_zero_padding():
  image = np.random.default_rng(0).integers(0, 256, (64, 96, 3)).astype(np.uint8)
  data = _data(min_size=64, max_size=96)  # no resize
  out = transforms.transform_example(_raw(64, 96, [], image=image), data, train=False)
  assert tuple(out['image_size']) == (64, 96) and out['scale'] == 1.0
  np.testing.assert_allclose(out['image'][:64, :96],
                             (image.astype(np.float64) - MEAN) / STD, rtol=1e-5, atol=1e-5)
  assert (out['image'][64:] == 0).all() and (out['image'][:, 96:] == 0).all()


def test_more_boxes_than_max_keeps_the_largest_in_order():
  sides = [3, 9, 1, 7, 5, 8, 2, 6]  # box i is side x side
  boxes = [[0, 0, s, s] for s in sides]
  crowd = [False, True, False, False, False, False, False, False]
  data = _data(min_size=64, max_size=96)
  before = transforms.truncation_count()
  out = transforms.transform_example(
      _raw(64, 64, boxes, classes=np.arange(1, 9), crowd=crowd), data, train=False)
  assert transforms.truncation_count() == before + 1
  kept_sides = [9, 7, 5, 8, 6]  # the 5 largest, in file order
  np.testing.assert_array_equal(out['boxes'][:, 2], kept_sides)
  np.testing.assert_array_equal(out['classes'], [2, 4, 5, 6, 8])
  np.testing.assert_array_equal(out['is_crowd'], [True] + [False] * 4)
  assert out['box_mask'].all()


def test_padding_slots_and_crowd_flags():
  data = _data(min_size=64, max_size=96)
  out = transforms.transform_example(
      _raw(64, 64, [[1, 1, 5, 5], [2, 2, 9, 9]], classes=[3, 4],
           crowd=[False, True]), data, train=False)
  np.testing.assert_array_equal(out['classes'], [3, 4, 0, 0, 0])
  np.testing.assert_array_equal(out['box_mask'], [True, True, False, False, False])
  np.testing.assert_array_equal(out['is_crowd'], [False, True, False, False, False])
  assert (out['boxes'][2:] == 0).all()


def test_train_randomness_is_deterministic_per_seed_and_uses_all_scales():
  data = _data(hflip_prob=0.5)
  raw = _raw(100, 150, [[10, 10, 30, 40]])
  runs = [transforms.transform_example(raw, data, train=True,
                                       rng=np.random.default_rng(s))
          for s in range(40)]
  again = transforms.transform_example(raw, data, train=True,
                                       rng=np.random.default_rng(7))
  np.testing.assert_array_equal(again['image'], runs[7]['image'])
  np.testing.assert_array_equal(again['boxes'], runs[7]['boxes'])
  shorts = {int(r['image_size'].min()) for r in runs}
  assert shorts == {96, 128}
  flipped = {bool(r['boxes'][0, 0] > r['image_size'][1] / 2) for r in runs}
  assert flipped == {True, False}
  with pytest.raises(ValueError, match='rng'):
    transforms.transform_example(raw, data, train=True)


def test_eval_transform_matches_demo_config():
  from configs import demo  # pylint: disable=g-import-not-at-top
  data = demo.get_config().data
  transforms.check_data_config(data)
  out = transforms.transform_example(_raw(200, 320, [[0, 0, 320, 200]]), data,
                                     train=False)
  assert out['image'].shape == (256, 256, 3)
  assert tuple(out['image_size']) == (160, 256)
  np.testing.assert_allclose(out['boxes'][0], [0, 0, 256, 160])
  assert isinstance(data, ml_collections.ConfigDict)


def test_image_ids_past_int32_survive_transform_and_collate():
  """COCO-format ids are any JSON integer; 2**40 must come out unchanged."""
  big = 2**40 + 7
  raw = dict(_raw(40, 60, [[1, 1, 10, 12]]), image_id=np.int64(big))
  out = transforms.transform_example(raw, _data(), train=False)
  assert int(out['image_id']) == big
  batch = transforms.collate([out, out], _data().canvas_buckets)
  assert batch['image_id'].dtype == np.int64
  assert batch['image_id'].tolist() == [big, big]


@pytest.mark.parametrize('normalize', [False, True])
def test_unpadded_train_examples_collate_to_the_padded_batch(normalize):
  """pad=False (the training loader's path): the batch is the same array as
  padding each example to its own bucket first, and each image sits in the
  top-left corner of a zero canvas (NumPy placement as the reference)."""
  data = _data(hflip_prob=0.5)
  rng_img = np.random.default_rng(3)
  raws = [_raw(h, w, [[2, 3, 30, 40]],
               image=rng_img.integers(0, 256, (h, w, 3), np.uint8))
          for h, w in ((100, 200), (200, 100), (90, 91), (64, 250))]
  seeds = [11, 12, 13, 14]
  make = lambda pad: [transforms.transform_example(
      r, data, train=True, rng=np.random.default_rng(s), normalize=normalize,
      pad=pad) for r, s in zip(raws, seeds)]
  padded, unpadded = make(True), make(False)
  for p, u in zip(padded, unpadded):
    h, w = u['image_size']
    assert u['image'].shape[:2] == (h, w)  # not padded
    assert p['image'].shape[:2] != (h, w) or (h, w) in data.canvas_buckets
    np.testing.assert_array_equal(u['boxes'], p['boxes'])
  for fixed in (None, (256, 256)):
    want = transforms.collate(padded, data.canvas_buckets, fixed)
    got = transforms.collate(unpadded, data.canvas_buckets, fixed)
    assert set(got) == set(want)
    for k in want:
      assert got[k].dtype == want[k].dtype, k
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ref = np.zeros_like(want['image'])
    for i, u in enumerate(unpadded):
      h, w = u['image_size']
      ref[i, :h, :w] = u['image']
    np.testing.assert_array_equal(got['image'], ref)
  # Mixed orientations need the square bucket.
  assert got['image'].shape[1:3] == (256, 256)
