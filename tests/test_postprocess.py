"""postprocess: selection, decoding and NMS against a NumPy reference."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.models import anchors as anchors_lib
from tests import np_refs


# ------------------------------------------------------------ NumPy reference


def np_decode(deltas, ref, stds, clip=math.log(1000.0 / 16)):
  d = deltas * np.asarray(stds)
  w = ref[..., 2] - ref[..., 0]
  h = ref[..., 3] - ref[..., 1]
  cx = ref[..., 0] + w / 2 + d[..., 0] * w
  cy = ref[..., 1] + h / 2 + d[..., 1] * h
  nw = w * np.exp(np.minimum(d[..., 2], clip))
  nh = h * np.exp(np.minimum(d[..., 3], clip))
  return np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], -1)


def np_clip(boxes, h, w):
  out = boxes.copy()
  out[..., 0::2] = np.clip(out[..., 0::2], 0, w)
  out[..., 1::2] = np.clip(out[..., 1::2], 0, h)
  return out


def np_select(boxes, probs, thr, nms_thr, max_det):
  """Per image: threshold, greedy NMS per class, top max_det by score."""
  n, k = probs.shape
  kept = []
  for c in range(k):
    cand = [i for i in range(n) if probs[i, c] >= thr and
            (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) > 0]
    cand.sort(key=lambda i: -probs[i, c])
    chosen = []
    for i in cand:
      if all(np_refs.iou(boxes[i], boxes[j]) <= nms_thr for j in chosen):
        chosen.append(i)
    kept += [(probs[i, c], i, c + 1) for i in chosen]
  kept.sort(key=lambda t: -t[0])
  return kept[:max_det]


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def make_config(**eval_overrides):
  c = common.base_config()
  c.model.s_levels = (3, 4)
  for k, v in eval_overrides.items():
    c.eval[k] = v
  return config_lib.resolve(c, num_classes=3)


def random_boxes(rng, shape, size):
  xy = rng.uniform(0, size * 0.7, shape + (2,))
  wh = rng.uniform(4, size * 0.5, shape + (2,))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def assert_matches(out, refs, b):
  valid = np.asarray(out['valid'][b])
  assert valid.sum() == len(refs)
  for m, (score, i_or_box, cls) in enumerate(refs):
    assert out['classes'][b, m] == cls
    np.testing.assert_allclose(out['scores'][b, m], score, rtol=1e-5)
    np.testing.assert_allclose(out['boxes'][b, m], i_or_box, rtol=1e-4,
                               atol=1e-3)
  assert not np.any(np.asarray(out['scores'][b])[~valid])
  assert not np.any(np.asarray(out['classes'][b])[~valid])


# ---------------------------------------------------------------- the tests


# Shapes are shared by the tests (N=7 positions, K=3, M=6) so batched_nms
# compiles once.
@pytest.mark.parametrize('thr', [0.3, 0.8])
def test_select_detections_matches_numpy(thr):
  rng = np.random.default_rng(0)
  b, n, k, max_det = 2, 7, 3, 6
  # Clustered boxes so NMS has work to do.
  base = random_boxes(rng, (b, 4), 60)
  boxes = (base[:, rng.integers(0, 4, n)] +
           rng.normal(0, 3, (b, n, 4))).astype(np.float32)
  boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 1)
  boxes[0, 3] = [5, 5, 5, 9]  # empty box: never a detection
  probs = rng.uniform(0, 1, (b, n, k)).astype(np.float32)
  probs[0, 3] = 0.99
  out = postprocess.select_detections(
      jnp.asarray(boxes), jnp.asarray(probs), score_threshold=thr,
      nms_threshold=0.5, max_detections=max_det)
  out = {key: np.asarray(v) for key, v in out.items()}
  for i in range(b):
    refs = np_select(boxes[i], probs[i], thr, 0.5, max_det)
    assert refs
    assert_matches(out, [(s, boxes[i][j], c) for s, j, c in refs], i)
  if thr == 0.8:
    assert not out['valid'].all()  # padding exercised
  else:
    assert out['valid'].all()  # truncation to max_det exercised


def np_soft_select(boxes, probs, thr, sigma, max_det):
  """Per image: every (box, class) pair scoring >= thr with a non-empty box,
  soft-NMS per class (the published loop, tests/np_refs.py), the first
  max_det picks. Pairs are numbered box * K + class, as candidates."""
  n, k = probs.shape
  pair_boxes = np.repeat(boxes.astype(np.float64), k, axis=0)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  scores = np.where(np.repeat(area > 0, k), probs.reshape(-1), -1.0)
  classes = np.tile(np.arange(k), n)
  kept = np_refs.soft_nms(pair_boxes, scores, classes, sigma, thr)
  return [(score, boxes[p // k], p % k + 1) for p, score in kept[:max_det]]


def soft_nms_decayed_and_dropped(boxes, probs, thr, sigma):
  """(pairs kept with a decayed score, pairs >= thr the decay dropped)."""
  n, k = probs.shape
  kept = np_refs.soft_nms(np.repeat(boxes.astype(np.float64), k, axis=0),
                          probs.reshape(-1), np.tile(np.arange(k), n), sigma,
                          thr)
  decayed = sum(s < probs.reshape(-1)[p] for p, s in kept)
  return decayed, np.sum(probs >= thr) - len(kept)


@pytest.mark.parametrize('thr,sigma,max_det', [(0.05, 0.5, 6), (0.3, 0.3, 21)])
def test_select_detections_soft_nms_matches_numpy(thr, sigma, max_det):
  """nms='soft': decayed scores, boxes and classes of the published loop;
  (0.3, 0.3, 21) drops decayed pairs at the threshold and pads the output,
  (0.05, 0.5, 6) truncates it."""
  rng = np.random.default_rng(3)
  b, n, k = 2, 7, 3
  base = random_boxes(rng, (b, 3), 60)
  boxes = (base[:, rng.integers(0, 3, n)] +
           rng.normal(0, 3, (b, n, 4))).astype(np.float32)
  boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 1)
  boxes[1, 2] = [5, 5, 5, 9]  # empty box: never a detection
  probs = rng.uniform(0, 1, (b, n, k)).astype(np.float32)
  probs[1, 2] = 0.99
  out = postprocess.select_detections(
      jnp.asarray(boxes), jnp.asarray(probs), score_threshold=thr,
      nms_threshold=0.5, max_detections=max_det, nms='soft',
      soft_nms_sigma=sigma)
  out = {key: np.asarray(v) for key, v in out.items()}
  for i in range(b):
    refs = np_soft_select(boxes[i], probs[i], thr, sigma, max_det)
    assert_matches(out, refs, i)
    decayed, dropped = soft_nms_decayed_and_dropped(boxes[i], probs[i], thr,
                                                    sigma)
    assert decayed > 0 and (dropped > 0 or thr < 0.1)
  assert out['valid'].all() == (thr < 0.1)


def test_every_nms_kind_is_a_config_choice():
  from mimicdet_jax.ops.nms import NMS_KINDS  # pylint: disable=g-import-not-at-top
  for kind in NMS_KINDS:
    assert make_config(nms=kind).eval.nms == kind
  with pytest.raises(config_lib.ConfigError, match="eval.nms='greedy'"):
    make_config(nms='greedy')
  with pytest.raises(config_lib.ConfigError, match='eval.soft_nms_sigma'):
    make_config(nms='soft', soft_nms_sigma=0.0)


def hand_built_outputs(rng, b, canvas, levels, num_logits):
  a = anchors_lib.num_anchors(canvas, levels)
  logits = rng.normal(0, 1, (b, a)).astype(np.float32)
  return dict(
      refine_logits=logits,
      refine_deltas=rng.normal(0, 0.3, (b, a, 4)).astype(np.float32),
      s_cls_logits=rng.normal(0, 2, (b, a, num_logits)).astype(np.float32),
      s_deltas=rng.normal(0, 1, (b, a, 4)).astype(np.float32))


@pytest.mark.parametrize('head,times_obj,nms', [
    ('s', False, 'hard'), ('s', True, 'hard'), ('t', False, 'hard'),
    ('both', True, 'hard'), ('s_cls+t_box', False, 'hard'),
    ('t_cls+s_box', True, 'hard'), ('s', False, 'soft')])
def test_postprocess_matches_numpy(head, times_obj, nms):
  topk, thr, nms_thr, max_det, sigma = 7, 0.1, 0.6, 6, 0.5
  config = make_config(head=head, score_times_objectness=times_obj,
                       pre_nms_topk=topk, score_threshold=thr,
                       nms_threshold=nms_thr, max_detections=max_det, nms=nms,
                       soft_nms_sigma=sigma)
  canvas = (128, 128)
  rng = np.random.default_rng(1)
  b = 2
  outputs = hand_built_outputs(rng, b, canvas, config.model.s_levels, 4)
  anchors = anchors_lib.dense_anchors(canvas, config.model.s_levels,
                                      config.model.anchor_scale)
  anchor_boxes = anchors['boxes']
  image_size = np.array([[100, 120], [128, 70]], np.int32)
  # The best cells lie in the canvas padding: they must not be picked.
  centre = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2  # (x, y)
  for i in range(b):
    h, w = image_size[i]
    padding = (centre[:, 0] >= w) | (centre[:, 1] >= h)
    assert padding.any()
    outputs['refine_logits'][i][padding] += 10.0
  t_cls = rng.normal(0, 2, (b, topk, 4)).astype(np.float32)
  t_deltas = rng.normal(0, 1, (b, topk, 4)).astype(np.float32)
  seen = []

  def t_head_fn(boxes, box_levels):
    seen.append((boxes, box_levels))
    return jnp.asarray(t_cls), None, jnp.asarray(t_deltas)

  out = postprocess.postprocess({k: jnp.asarray(v) for k, v in outputs.items()},
                                jnp.asarray(anchor_boxes),
                                jnp.asarray(image_size),
                                config, t_head_fn, anchor_level=anchors['level'])
  out = {key: np.asarray(v) for key, v in out.items()}
  for i in range(b):
    h, w = image_size[i]
    inside = (centre[:, 0] < w) & (centre[:, 1] < h)
    logits = np.where(inside, outputs['refine_logits'][i], -np.inf)
    order = np.argsort(-logits, kind='stable')[:topk]
    assert inside[order].all()
    obj = sigmoid(outputs['refine_logits'][i][order])
    refined = np_clip(np_decode(outputs['refine_deltas'][i][order],
                                anchor_boxes[order], (1, 1, 1, 1)), h, w)
    uses_t = head in ('t', 'both', 's_cls+t_box', 't_cls+s_box')
    if uses_t:
      np.testing.assert_allclose(np.asarray(seen[0][0])[i], refined,
                                 rtol=1e-5, atol=1e-3)
      # Staggered rule: pooled one level finer than the origin's level.
      np.testing.assert_array_equal(np.asarray(seen[0][1])[i],
                                    anchors['level'][order] - 1)
    s_pair = (outputs['s_cls_logits'][i][order], outputs['s_deltas'][i][order])
    t_pair = (t_cls[i], t_deltas[i])
    cls_from = {'s': [s_pair], 't': [t_pair], 'both': [s_pair, t_pair],
                's_cls+t_box': [s_pair], 't_cls+s_box': [t_pair]}[head]
    box_from = {'s': [s_pair], 't': [t_pair], 'both': [s_pair, t_pair],
                's_cls+t_box': [t_pair], 't_cls+s_box': [s_pair]}[head]
    probs = np.mean([np_softmax(l)[:, 1:] for l, _ in cls_from], 0)
    boxes = np.mean([np_clip(np_decode(d, refined, (0.1, 0.1, 0.2, 0.2)), h, w)
                     for _, d in box_from], 0)
    if times_obj:
      probs = probs * obj[:, None]
    if nms == 'hard':
      refs = [(s, boxes[j], c)
              for s, j, c in np_select(boxes, probs, thr, nms_thr, max_det)]
    else:
      refs = np_soft_select(boxes, probs, thr, sigma, max_det)
    assert refs, 'the hand-built case must produce detections'
    assert_matches(out, refs, i)


def test_predict_output_boxes_stay_inside_image():
  config = make_config(pre_nms_topk=7, max_detections=6, score_threshold=0.0)
  rng = np.random.default_rng(2)
  outputs = hand_built_outputs(rng, 2, (128, 128), config.model.s_levels, 4)
  outputs['refine_deltas'] *= 10  # huge boxes
  anchor_boxes = anchors_lib.dense_anchors((128, 128), config.model.s_levels,
                                           4.0)['boxes']
  out = postprocess.postprocess(outputs, anchor_boxes,
                                np.array([[90, 60], [90, 60]], np.int32), config)
  boxes = np.asarray(out['boxes'])[np.asarray(out['valid'])]
  assert len(boxes) >= 2
  assert boxes[:, 0::2].max() <= 60 and boxes[:, 1::2].max() <= 90
  assert boxes.min() >= 0


def test_eval_heads_cover_the_config_choices():
  for head in postprocess.EVAL_HEADS:
    cls_heads, box_heads = postprocess.eval_heads(head)
    assert cls_heads and box_heads
    assert set(cls_heads) | set(box_heads) <= {'s', 't'}
  c = common.base_config()
  c.eval.head = 's_cls'
  with pytest.raises(config_lib.ConfigError, match="eval.head='s_cls'"):
    config_lib.resolve(c, 3)
