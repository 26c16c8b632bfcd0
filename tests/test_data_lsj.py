"""Large-scale jitter (`data.augment='lsj'`, data/transforms.py) against an
independent reference of its resize / crop / box arithmetic, plus its
determinism, its one canvas, its box-drop rule and its loader."""
import itertools

import numpy as np
from PIL import Image
import pytest

from configs import common
from mimicdet_jax import config_lib
from mimicdet_jax.data import coco
from mimicdet_jax.data import pipeline
from mimicdet_jax.data import synthetic
from mimicdet_jax.data import transforms
from mimicdet_jax.errors import ConfigError
from tests import subprocess_env

SIZE = 128


def _data(**overrides):
  data = common.base_config().data
  data.augment = 'lsj'
  data.lsj_size = SIZE
  data.max_boxes = 40
  data.update(overrides)
  return data


def _raw(h, w, boxes, classes=None, crowd=None, image=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  return {
      'image': (image if image is not None else
                np.random.default_rng(h * w).integers(0, 256, (h, w, 3),
                                                      dtype=np.uint8)),
      'boxes': boxes,
      'classes': np.asarray(classes if classes is not None
                            else np.arange(1, n + 1), np.int32),
      'is_crowd': np.asarray(crowd if crowd is not None else [False] * n, bool),
      'image_id': 7, 'orig_size': np.array([h, w], np.int32)}


def _random_boxes(rng, h, w, n):
  xy = rng.uniform(0, 1, (n, 2)) * [w, h]
  wh = rng.uniform(0.01, 0.6, (n, 2)) * [w, h]
  return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)


def reference_lsj(h, w, boxes, size, factor, u_y, u_x, flip, min_side):
  """detectron2's ResizeScale + FixedSizeCrop + box filter, written out in
  float64 Python, one box at a time; offsets drawn per axis.

  Returns (resized (h, w), window (top, left), image_size (h, w), boxes kept
  [(x1, y1, x2, y2)], their indices)."""
  s = min(size * factor / h, size * factor / w)
  rh, rw = int(np.round(h * s)), int(np.round(w * s))
  top = int(np.round(u_y * (rh - size))) if rh > size else 0
  left = int(np.round(u_x * (rw - size))) if rw > size else 0
  out_h = size if rh >= size else rh
  out_w = size if rw >= size else rw
  kept, index = [], []
  for i, (x1, y1, x2, y2) in enumerate(boxes):
    c = [x1 * rw / w - left, y1 * rh / h - top,
         x2 * rw / w - left, y2 * rh / h - top]
    c = [min(max(c[0], 0), out_w), min(max(c[1], 0), out_h),
         min(max(c[2], 0), out_w), min(max(c[3], 0), out_h)]
    if c[2] - c[0] > min_side and c[3] - c[1] > min_side:
      if flip:
        c = [out_w - c[2], c[1], out_w - c[0], c[3]]
      kept.append(c)
      index.append(i)
  return (rh, rw), (top, left), (out_h, out_w), kept, index


def _draws(seed, data):
  """The example's draws in their documented order: factor, (u_y, u_x), flip."""
  g = np.random.default_rng(seed)
  factor = g.uniform(*data.lsj_scale)
  u_y, u_x = g.uniform(size=2)
  return factor, u_y, u_x, bool(g.random() < data.hflip_prob)


@pytest.mark.parametrize('h,w', [(60, 200), (200, 60), (300, 310), (40, 40)])
def test_boxes_pixels_and_size_equal_the_reference(h, w):
  data = _data()
  for seed in range(12):
    rng = np.random.default_rng(100 + seed)
    boxes = _random_boxes(rng, h, w, 20)
    crowd = rng.random(20) < 0.2
    raw = _raw(h, w, boxes, crowd=crowd)
    out = transforms.transform_example(raw, data, train=True,
                                       rng=np.random.default_rng(seed),
                                       normalize=False)
    factor, u_y, u_x, flip = _draws(seed, data)
    (rh, rw), (top, left), (oh, ow), want, index = reference_lsj(
        h, w, boxes, SIZE, factor, u_y, u_x, flip, data.lsj_min_box_side)
    # One canvas, exactly lsj_size x lsj_size, whatever the draw.
    assert out['image'].shape == (SIZE, SIZE, 3)
    assert tuple(out['image_size']) == (oh, ow)
    n = len(want)
    assert int(out['box_mask'].sum()) == n
    np.testing.assert_allclose(out['boxes'][:n], np.asarray(want).reshape(-1, 4),
                               atol=1e-3)
    np.testing.assert_array_equal(out['classes'][:n], np.asarray(index) + 1)
    np.testing.assert_array_equal(out['is_crowd'][:n], crowd[index])
    assert not out['box_mask'][n:].any() and not out['classes'][n:].any()
    # Pixels: PIL's bilinear resize, the window, the flip, zeros elsewhere.
    resized = np.asarray(Image.fromarray(raw['image']).resize(
        (rw, rh), Image.BILINEAR))
    window = resized[top:top + oh, left:left + ow]
    if flip:
      window = window[:, ::-1]
    np.testing.assert_array_equal(out['image'][:oh, :ow], window)
    assert not out['image'][oh:].any() and not out['image'][:, ow:].any()


def test_the_draws_reach_both_ends():
  """Over seeds, the scale range gives both crops (image larger than the
  canvas) and pads (smaller); flips happen both ways."""
  data = _data()
  sizes, flips = set(), set()
  for seed in range(40):
    out = transforms.transform_example(
        _raw(100, 100, [[10, 10, 90, 90]]), data, train=True,
        rng=np.random.default_rng(seed), normalize=False)
    sizes.add(int(out['image_size'][0]) == SIZE)
    flips.add(_draws(seed, data)[3])
  assert sizes == {True, False} and flips == {True, False}


def test_same_seed_same_example_other_seed_other_example():
  data = _data()
  raw = _raw(90, 150, _random_boxes(np.random.default_rng(0), 90, 150, 6))
  run = lambda seed: transforms.transform_example(  # pylint: disable=g-long-lambda
      raw, data, train=True, rng=np.random.default_rng(seed))
  a, b, c = run(5), run(5), run(6)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not np.array_equal(a['image'], c['image'])


class _FixedDraws:
  """An rng whose draws are given: factor, the offset fractions, the flip."""

  def __init__(self, factor, u, flip_draw=0.99):
    self.factor, self.u, self.flip_draw = factor, u, flip_draw

  def uniform(self, low=0.0, high=1.0, size=None):
    return self.factor if size is None else np.asarray(self.u)

  def random(self):
    return self.flip_draw


def test_box_drop_rule_and_count():
  """100 x 100 at factor 2 onto 64: x 1.28 -> 128 x 128, window offsets
  round(0.5 * 64) = 32 (y) and round(0.25 * 64) = 16 (x); in original pixels
  the window is x in [12.5, 62.5), y in [25, 75)."""
  boxes = [[20, 30, 40, 50],    # inside: kept, shifted
           [0, 0, 20, 40],      # partly inside: kept, clipped
           [0, 0, 10, 100],     # left of the window: empty after clipping
           [62.5, 30, 90, 50],  # starts on the window's right edge: empty
           [50, 70, 80, 99]]    # crowd, partly inside: kept
  raw = _raw(100, 100, boxes, classes=[3, 4, 5, 6, 7],
             crowd=[False, False, False, False, True])
  data = _data(lsj_size=64, lsj_scale=(2.0, 2.0))
  before = transforms.lsj_dropped_count()
  out = transforms.transform_example(raw, data, train=True,
                                     rng=_FixedDraws(2.0, (0.5, 0.25)))
  assert transforms.lsj_dropped_count() == before + 2
  assert int(out['box_mask'].sum()) == 3
  np.testing.assert_allclose(out['boxes'][:3], [
      [20 * 1.28 - 16, 30 * 1.28 - 32, 40 * 1.28 - 16, 50 * 1.28 - 32],
      [0, 0, 20 * 1.28 - 16, 40 * 1.28 - 32],
      [50 * 1.28 - 16, 70 * 1.28 - 32, 64, 64]], atol=1e-4)
  np.testing.assert_array_equal(out['classes'][:3], [3, 4, 7])
  np.testing.assert_array_equal(out['is_crowd'][:3], [False, False, True])
  # data.lsj_min_box_side is the rule's bound: at 7 px the crowd box (6.4 px
  # tall after clipping) goes, the 9.6 px wide one stays.
  out = transforms.transform_example(
      raw, _data(lsj_size=64, lsj_scale=(2.0, 2.0), lsj_min_box_side=7.0),
      train=True, rng=_FixedDraws(2.0, (0.5, 0.25)))
  np.testing.assert_array_equal(out['classes'][:out['box_mask'].sum()], [3, 4])


def test_evaluation_keeps_the_resize_rule():
  data = _data(min_size=64, max_size=128, canvas_buckets=((128, 128),))
  raw = _raw(50, 100, [[10, 10, 40, 40]])
  got = transforms.transform_example(raw, data, train=False)
  want = transforms.transform_example(raw, _data(augment='resize', min_size=64,
                                                 max_size=128,
                                                 canvas_buckets=((128, 128),)),
                                      train=False)
  for k in got:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert tuple(got['image_size']) == (64, 128)


def test_the_loader_yields_one_canvas(tmp_path):
  ann = synthetic.write_split(str(tmp_path), 'train', 8, seed=5, min_size=48,
                              max_size=96, image_format='png')
  source = coco.CocoSource(ann, str(tmp_path / 'train'))
  c = common.base_config()
  c.data.augment, c.data.lsj_size = 'lsj', SIZE
  # Evaluation's resize rule and buckets; not used in training under lsj.
  c.data.min_size, c.data.max_size = 200, 256
  c.data.canvas_buckets = ((256, 256),)
  c.data.max_boxes = 10
  c.train.batch_size = 4
  first = {}
  for seed in (3, 3, 4):
    c.seed = seed
    loader = pipeline.make_train_loader(c, source, num_local_devices=2,
                                        process_index=0, process_count=1)
    batches = list(itertools.islice(iter(loader), 3))
    for batch in batches:
      assert batch['image'].shape == (2, 2, SIZE, SIZE, 3)
      assert (batch['image_size'] <= SIZE).all()
    first.setdefault(seed, []).append(batches[0])
  for k in first[3][0]:
    np.testing.assert_array_equal(first[3][0][k], first[3][1][k], err_msg=k)
  assert not np.array_equal(first[3][0]['image'], first[4][0]['image'])


def test_config_checks_name_the_keys():
  for augment in transforms.AUGMENTS:
    c = common.base_config()
    c.data.augment = augment
    config_lib.resolve(c, num_classes=3)
  c = common.base_config()
  c.data.augment = 'mosaic'
  with pytest.raises(ConfigError, match=r"data.augment='mosaic'"):
    config_lib.resolve(c, num_classes=3)
  for key, value in (('lsj_size', 1000), ('lsj_scale', (2.0, 1.0)),
                     ('lsj_scale', (0.0, 1.0))):
    c = common.base_config()
    c.data.augment = 'lsj'
    c.data[key] = value
    with pytest.raises(ConfigError, match=f'data.{key}'):
      config_lib.resolve(c, num_classes=3)
    with pytest.raises(ValueError, match=f'data.{key}'):
      transforms.check_data_config(c.data)


@pytest.mark.slow
def test_train_py_runs_lsj_with_grad_accum(tmp_path):
  """train.py, two steps of the tiny demo model on one lsj canvas, each
  step two micro-batches of one image (tests/test_end_to_end.py's set-up).
  Slow: ~50 s of CPU, mostly compiling the step; `make test` runs train.py
  with lsj alone in tests/test_end_to_end.py, from its compilation cache."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from tests import test_end_to_end as e2e  # pylint: disable=g-import-not-at-top
  data, work = str(tmp_path / 'data'), str(tmp_path / 'work')
  e2e._synthetic(data)  # pylint: disable=protected-access
  env = dict(
      os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=e2e.ROOT,
      XLA_FLAGS=subprocess_env.xla_flags(1))
  e2e._run(env, 'train.py', '--config', 'configs/demo.py', '--workdir', work,  # pylint: disable=protected-access
           '--config.train.compile_cache=', *e2e.TINY,
           f'--config.data.train_annotations={data}/annotations/train.json',
           f'--config.data.train_images={data}/train',
           f'--config.data.val_annotations={data}/annotations/val.json',
           f'--config.data.val_images={data}/val',
           '--config.data.augment=lsj', '--config.data.lsj_size=128',
           '--config.train.grad_accum_steps=2',
           '--config.train.total_steps=2', '--config.train.checkpoint_every=2')
  with open(os.path.join(work, 'config.json')) as f:
    saved = json.load(f)
  assert saved['data']['augment'] == 'lsj'
  assert saved['train']['grad_accum_steps'] == 2
  with open(os.path.join(work, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2]  # one logged step per batch
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in rows)
