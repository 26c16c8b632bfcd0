"""Flip test-time augmentation (evaluation/tta.py, eval.tta in
postprocess.make_predict_fn): the flip inside each image's width against
NumPy, a mirror-equivariant stand-in detector on which hflip changes
nothing, and a non-equivariant one whose merged detections are the image's
and the NumPy-mirrored image's (boxes un-flipped in NumPy)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import tta
from tests import standin

CANVAS = (64, 64)
LEVELS = (3, 4)
# Image (h, w) inside the canvas: widths are multiples of the coarsest
# stride (16), so the mirror of an anchor cell is a cell; narrower than
# the canvas, so a flip of the whole canvas would differ.
SIZES = np.array([[64, 48], [40, 32]], np.int32)


def np_hflip(images, sizes):
  """Each image mirrored inside its width; the padding left in place."""
  out = np.array(images, copy=True)
  for i, (_, w) in enumerate(sizes):
    out[i, :, :w] = images[i, :, :w][:, ::-1]
  return out


def np_unflip(boxes, w):
  """x1' = w - x2, x2' = w - x1 (end-exclusive pixels)."""
  boxes = np.asarray(boxes, np.float64)
  return np.stack([w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0],
                   boxes[..., 3]], axis=-1)


def test_hflip_images_flips_inside_the_image_width():
  rng = np.random.default_rng(0)
  images = rng.normal(0, 1, (2,) + CANVAS + (3,)).astype(np.float32)
  images[0, :, 48:] = 7.0  # padding must stay where it is
  got = np.asarray(tta.hflip_images(jnp.asarray(images), jnp.asarray(SIZES)))
  np.testing.assert_array_equal(got, np_hflip(images, SIZES))
  np.testing.assert_array_equal(got[0, :, 48:], 7.0)


def test_unflip_boxes_recovers_a_drawn_rectangle():
  """A rectangle filling columns [x1, x2) of an image of width w fills
  columns [w - x2, w - x1) of its mirror; unflip_boxes maps the mirror's
  extent back to (x1, x2)."""
  w = int(SIZES[0, 1])
  image = np.zeros((1,) + CANVAS + (1,), np.float32)
  x1, y1, x2, y2 = 5, 10, 19, 30
  image[0, y1:y2, x1:x2] = 1.0
  mirror = np.asarray(tta.hflip_images(jnp.asarray(image),
                                       jnp.asarray(SIZES[:1])))[0, ..., 0]
  cols = np.nonzero(mirror.any(axis=0))[0]
  rows = np.nonzero(mirror.any(axis=1))[0]
  mirror_box = np.array([[[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]]],
                        np.float32)
  np.testing.assert_array_equal(mirror_box[0, 0], [w - x2, y1, w - x1, y2])
  back = np.asarray(tta.unflip_boxes(jnp.asarray(mirror_box),
                                     jnp.asarray([w])))
  np.testing.assert_array_equal(back[0, 0], [x1, y1, x2, y2])


class StandInDetector:
  """The model's dense outputs from cell statistics of the image.

  Per anchor cell (stride s): `sym` is the cell's mean (the same for the
  mirrored cell of the mirrored image) and `anti` its left half's mean
  minus its right half's (negated there). Objectness, class logits and the
  y / size deltas read `sym`, the x-deltas read `anti`: the detections of
  the mirror are then the mirrored detections (the model is equivariant).
  `equivariant=False` adds the left half's mean to objectness and class
  logits, which the mirror does not map to itself.
  """

  def __init__(self, num_logits, equivariant=True):
    self.num_logits = num_logits
    self.equivariant = equivariant

  def init(self, rng):
    shapes = dict(obj=(3,), r=(3, 3), rdx=(3,), cls=(3, self.num_logits),
                  s=(3, 3), sdx=(3,), left_obj=(3,),
                  left_cls=(3, self.num_logits))
    keys = jax.random.split(rng, len(shapes))
    return {k: 3.0 * jax.random.normal(key, shape)
            for key, (k, shape) in zip(keys, sorted(shapes.items()))}

  def apply(self, v, images, train=False):
    del train
    _, sym = standin.pooled_levels(images, LEVELS)
    b, h, w, c = images.shape
    anti, left = [], []
    for l in LEVELS:
      s = 2**l
      cells = images.reshape(b, h // s, s, w // s, s, c)
      left_half = cells[:, :, :, :, :s // 2].mean((2, 4))
      right_half = cells[:, :, :, :, s // 2:].mean((2, 4))
      anti.append((left_half - right_half).reshape(b, -1, c))
      left.append(left_half.reshape(b, -1, c))
    anti, left = jnp.concatenate(anti, 1), jnp.concatenate(left, 1)
    obj = sym @ v['obj']
    cls = sym @ v['cls']
    if not self.equivariant:
      obj += left @ v['left_obj']
      cls += left @ v['left_cls']
    r, s_ = sym @ (0.3 * v['r']), sym @ (0.3 * v['s'])
    return dict(
        refine_logits=obj,
        refine_deltas=jnp.concatenate([(anti @ (0.3 * v['rdx']))[..., None], r],
                                      -1),
        s_cls_logits=cls,
        s_deltas=jnp.concatenate([(anti @ v['sdx'])[..., None], s_], -1))


def make_config(**eval_overrides):
  c = common.base_config()
  c.model.s_levels = LEVELS
  c.eval.pre_nms_topk = 8
  c.eval.max_detections = 12
  c.eval.score_threshold = 0.05
  for k, v in eval_overrides.items():
    c.eval[k] = v
  return config_lib.resolve(c, num_classes=3)


_PREDICT_FNS = {}  # (config, equivariant) -> jitted fn: compile each once


def _predict(config, model, variables, images):
  key = (config, model.equivariant)
  if key not in _PREDICT_FNS:
    _PREDICT_FNS[key] = postprocess.make_predict_fn(model, config)
  fn = _PREDICT_FNS[key]
  return {k: np.asarray(v) for k, v in
          fn(variables, jnp.asarray(images), jnp.asarray(SIZES)).items()}


def _images(seed):
  images = np.random.default_rng(seed).normal(0, 1, (2,) + CANVAS + (3,))
  for i, (h, w) in enumerate(SIZES):  # zero padding, as the pipeline's
    images[i, h:] = 0
    images[i, :, w:] = 0
  return images.astype(np.float32)


def test_hflip_on_an_equivariant_model_changes_nothing():
  """Every candidate comes twice (the mirror's, un-flipped, equals the
  image's up to rounding); greedy NMS keeps one of each pair: the same
  detections as without TTA. (Soft-NMS keeps the second copy at
  exp(-1 / sigma) of its score, so this holds for 'hard' only.)"""
  model = StandInDetector(4)
  variables = model.init(jax.random.PRNGKey(0))
  images = _images(1)
  # Room for every candidate: a kept duplicate would show as an extra row.
  none = _predict(make_config(tta='none', max_detections=24), model,
                  variables, images)
  flip = _predict(make_config(tta='hflip', max_detections=24), model,
                  variables, images)
  assert none['valid'].sum(1).min() >= 4  # a real case per image
  assert not none['valid'].all()  # NMS suppressed some
  np.testing.assert_array_equal(flip['valid'], none['valid'])
  np.testing.assert_array_equal(flip['classes'], none['classes'])
  np.testing.assert_allclose(flip['scores'], none['scores'], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(flip['boxes'], none['boxes'], atol=1e-3)
  # The mirrored image alone gives the mirrored boxes (the stand-in is
  # equivariant, and the boxes are not all centred on the mirror axis).
  mirror = _predict(make_config(tta='none', max_detections=24), model,
                    variables, np_hflip(images, SIZES))
  for i, (_, w) in enumerate(SIZES):
    got = np_unflip(mirror['boxes'][i][mirror['valid'][i]], w)
    want = none['boxes'][i][none['valid'][i]]
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.abs(want[:, 0] - (w - want[:, 2])).max() > 1.0


def test_hflip_merges_the_unflipped_mirror_before_nms():
  """A model the mirror does not map to itself; nothing suppressed (IoU
  threshold 1), so the TTA output is every candidate of the image and of
  its NumPy mirror (un-flipped in NumPy), by descending score."""
  model = StandInDetector(4, equivariant=False)
  variables = model.init(jax.random.PRNGKey(1))
  images = _images(2)
  n_cand = 8 * 3  # pre_nms_topk x classes
  kw = dict(nms_threshold=1.0, score_threshold=0.0,
            max_detections=2 * n_cand)
  flip = _predict(make_config(tta='hflip', **kw), model, variables, images)
  plain = _predict(make_config(tta='none', **kw), model, variables, images)
  mirror = _predict(make_config(tta='none', **kw), model, variables,
                    np_hflip(images, SIZES))
  for i, (_, w) in enumerate(SIZES):
    ref = [(s, c, tuple(b)) for s, c, b, ok in zip(
        plain['scores'][i], plain['classes'][i], plain['boxes'][i],
        plain['valid'][i]) if ok]
    ref += [(s, c, tuple(np_unflip(b, w))) for s, c, b, ok in zip(
        mirror['scores'][i], mirror['classes'][i], mirror['boxes'][i],
        mirror['valid'][i]) if ok]
    ref.sort(key=lambda t: -t[0])
    valid = flip['valid'][i]
    assert valid.sum() == len(ref)
    assert plain['valid'][i].sum() > n_cand // 2  # both halves are there
    assert mirror['valid'][i].sum() > n_cand // 2
    np.testing.assert_allclose(flip['scores'][i][valid], [r[0] for r in ref],
                               rtol=1e-5)
    # Match each detection to the reference entry of its class and score.
    for s, c, b in zip(flip['scores'][i][valid], flip['classes'][i][valid],
                       flip['boxes'][i][valid]):
      close = [r for r in ref if r[1] == c and abs(r[0] - s) <= 1e-5 * s]
      assert any(np.allclose(b, r[2], atol=1e-3) for r in close), (s, c, b)
    # The image and its mirror disagree: the test is not the equivariant one.
    assert not np.allclose(sorted(plain['scores'][i]),
                           sorted(mirror['scores'][i]), rtol=1e-3)


def test_every_tta_mode_runs_and_a_bad_one_is_refused():
  model = StandInDetector(4)
  variables = model.init(jax.random.PRNGKey(0))
  for mode in tta.TTA_MODES:
    out = _predict(make_config(tta=mode, max_detections=24), model,
                   variables, _images(3))
    assert out['boxes'].shape == (2, 24, 4) and out['valid'].any()
  with pytest.raises(config_lib.ConfigError, match="eval.tta='vflip'"):
    make_config(tta='vflip')
