"""eval_lib: post-processing against a NumPy reference, result writing, scoring."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mimicdet_jax import config_lib
from mimicdet_jax import eval_lib
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
  out = eval_lib.select_detections(
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


def hand_built_outputs(rng, b, canvas, levels, num_logits):
  a = anchors_lib.num_anchors(canvas, levels)
  logits = rng.normal(0, 1, (b, a)).astype(np.float32)
  return dict(
      refine_logits=logits,
      refine_deltas=rng.normal(0, 0.3, (b, a, 4)).astype(np.float32),
      s_cls_logits=rng.normal(0, 2, (b, a, num_logits)).astype(np.float32),
      s_deltas=rng.normal(0, 1, (b, a, 4)).astype(np.float32))


@pytest.mark.parametrize('head,times_obj', [('s', False), ('s', True),
                                            ('t', False), ('both', True)])
def test_postprocess_matches_numpy(head, times_obj):
  topk, thr, nms_thr, max_det = 7, 0.1, 0.6, 6
  config = make_config(head=head, score_times_objectness=times_obj,
                       pre_nms_topk=topk, score_threshold=thr,
                       nms_threshold=nms_thr, max_detections=max_det)
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

  out = eval_lib.postprocess({k: jnp.asarray(v) for k, v in outputs.items()},
                             jnp.asarray(anchor_boxes), jnp.asarray(image_size),
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
    if head in ('t', 'both'):
      np.testing.assert_allclose(np.asarray(seen[0][0])[i], refined,
                                 rtol=1e-5, atol=1e-3)
      # Staggered rule: pooled one level finer than the origin's level.
      np.testing.assert_array_equal(np.asarray(seen[0][1])[i],
                                    anchors['level'][order] - 1)
    heads = []
    if head in ('s', 'both'):
      heads.append((outputs['s_cls_logits'][i][order],
                    outputs['s_deltas'][i][order]))
    if head in ('t', 'both'):
      heads.append((t_cls[i], t_deltas[i]))
    probs = np.mean([np_softmax(l)[:, 1:] for l, _ in heads], 0)
    boxes = np.mean([np_clip(np_decode(d, refined, (0.1, 0.1, 0.2, 0.2)), h, w)
                     for _, d in heads], 0)
    if times_obj:
      probs = probs * obj[:, None]
    refs = np_select(boxes, probs, thr, nms_thr, max_det)
    assert refs, 'the hand-built case must produce detections'
    assert_matches(out, [(s, boxes[j], c) for s, j, c in refs], i)


def test_predict_output_boxes_stay_inside_image():
  config = make_config(pre_nms_topk=7, max_detections=6, score_threshold=0.0)
  rng = np.random.default_rng(2)
  outputs = hand_built_outputs(rng, 2, (128, 128), config.model.s_levels, 4)
  outputs['refine_deltas'] *= 10  # huge boxes
  anchor_boxes = anchors_lib.dense_anchors((128, 128), config.model.s_levels,
                                           4.0)['boxes']
  out = eval_lib.postprocess(outputs, anchor_boxes,
                             np.array([[90, 60], [90, 60]], np.int32), config)
  boxes = np.asarray(out['boxes'])[np.asarray(out['valid'])]
  assert len(boxes) >= 2
  assert boxes[:, 0::2].max() <= 60 and boxes[:, 1::2].max() <= 90
  assert boxes.min() >= 0


def test_to_original_pixels_rescales_per_axis_and_clips():
  boxes = np.array([[[10., 20., 50., 400.], [-4., 0., 8., 8.]],
                    [[0., 0., 30., 30.], [0., 0., 0., 0.]]], np.float32)
  image_size = np.array([[300, 200], [20, 25]])  # resized (h, w)
  orig = np.array([[150, 100], [40, 50]])  # (h, w): factor 1/2, then 2
  out = eval_lib.to_original_pixels(boxes, image_size, orig)
  np.testing.assert_allclose(out[0, 0], [5, 10, 25, 150])  # y2 200 -> 150
  np.testing.assert_allclose(out[0, 1], [0, 0, 4, 4])
  np.testing.assert_allclose(out[1, 0], [0, 0, 50, 40])  # x 60->50, y 60->40
  # Rounded resize: 333 x 500 -> 800 x 1201 (scale 2.4024 nominal).
  out = eval_lib.to_original_pixels(np.array([[[0, 0, 1201, 800]]]),
                                    np.array([[800, 1201]]),
                                    np.array([[333, 500]]))
  np.testing.assert_allclose(out[0, 0], [0, 0, 500, 333], rtol=1e-6)


def _gt_dataset():
  """Three images, categories with non-contiguous ids 3, 17, 90."""
  images = [dict(id=11, width=100, height=80, file_name='a.png'),
            dict(id=42, width=64, height=120, file_name='b.png'),
            dict(id=7, width=200, height=150, file_name='c.png')]
  cats = [dict(id=3, name='cat'), dict(id=17, name='dog'),
          dict(id=90, name='boat')]
  anns, next_id = [], 1
  for img_id, cat, box in [(11, 3, [10, 10, 30, 20]), (11, 90, [50, 40, 40, 35]),
                           (42, 17, [5, 60, 50, 50]), (7, 3, [0, 0, 120, 100]),
                           (7, 17, [130, 20, 60, 60]), (7, 90, [100, 110, 30, 30])]:
    anns.append(dict(id=next_id, image_id=img_id, category_id=cat, bbox=box,
                     area=box[2] * box[3], iscrowd=0))
    next_id += 1
  return dict(images=images, categories=cats, annotations=anns)


def test_perfect_detections_through_result_writing_give_ap_1(tmp_path):
  gt = _gt_dataset()
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(gt))
  label_to_cat = {1: 3, 2: 17, 3: 90}
  cat_to_label = {v: k for k, v in label_to_cat.items()}
  # A batch as the pipeline makes it: canvas = original * scale, padded.
  imgs = gt['images']
  scale = np.array([1.5, 0.75, 2.0], np.float32)
  m = 4
  boxes = np.zeros((3, m, 4), np.float32)
  scores = np.zeros((3, m), np.float32)
  classes = np.zeros((3, m), np.int32)
  valid = np.zeros((3, m), bool)
  for b, img in enumerate(imgs):
    anns = [a for a in gt['annotations'] if a['image_id'] == img['id']]
    for j, a in enumerate(anns):
      x, y, w, h = a['bbox']
      boxes[b, j] = np.array([x, y, x + w, y + h]) * scale[b]
      scores[b, j] = 1.0
      classes[b, j] = cat_to_label[a['category_id']]
      valid[b, j] = True
  # A spurious low-score box in a padding slot that is marked invalid.
  boxes[0, 3] = [1, 1, 9, 9]
  dets = dict(boxes=boxes, scores=scores, classes=classes, valid=valid)
  image_size = np.array([[round(i['height'] * s), round(i['width'] * s)]
                         for i, s in zip(imgs, scale)])
  batch = dict(image_id=np.array([i['id'] for i in imgs]),
               image_size=image_size, orig_size=np.array([[i['height'], i['width']] for i in imgs]),
               example_valid=np.array([True, True, True]))
  results = eval_lib.detections_to_coco(dets, batch, label_to_cat)
  assert len(results) == 6
  assert {r['category_id'] for r in results} == {3, 17, 90}
  metrics = eval_lib.coco_evaluate(str(path), results, verbose=False)
  assert metrics['AP'] == pytest.approx(1.0)
  assert metrics['AP50'] == pytest.approx(1.0)
  assert set(metrics['per_class']) == {'cat', 'dog', 'boat'}
  assert all(v == pytest.approx(1.0) for v in metrics['per_class'].values())
  # A padding image (example_valid False) is skipped.
  batch['example_valid'] = np.array([True, False, True])
  assert len(eval_lib.detections_to_coco(dets, batch, label_to_cat)) == 5


def test_empty_detections_score_zero_with_warning(tmp_path, capsys):
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(_gt_dataset()))
  metrics = eval_lib.coco_evaluate(str(path), [], verbose=True)
  assert metrics['AP'] == 0.0 and metrics['AR100'] == 0.0
  assert metrics['num_detections'] == 0
  assert all(v == 0.0 for v in metrics['per_class'].values())
  assert 'no detections' in capsys.readouterr().out.lower()


def test_per_class_ap_matches_pycocotools_per_category(tmp_path):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  gt = _gt_dataset()
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(gt))
  rng = np.random.default_rng(3)
  dets = []
  for a in gt['annotations']:
    x, y, w, h = a['bbox']
    dets.append(dict(image_id=a['image_id'], category_id=a['category_id'],
                     bbox=[x + rng.normal(0, 3), y + rng.normal(0, 3), w, h],
                     score=float(rng.uniform())))
  metrics = eval_lib.coco_evaluate(str(path), dets, verbose=False)
  coco = COCO(str(path))
  for cat in gt['categories']:
    e = COCOeval(coco, coco.loadRes(dets), 'bbox')
    e.params.catIds = [cat['id']]
    e.evaluate()
    e.accumulate()
    e.summarize()
    assert metrics['per_class'][cat['name']] == pytest.approx(e.stats[0])
    assert metrics['per_class_AP50'][cat['name']] == pytest.approx(e.stats[1])


class _ListSource:
  """A source without an annotation file (like TfdsSource): raw examples."""

  def __init__(self, gt):
    self.class_names = [c['name'] for c in sorted(gt['categories'],
                                                  key=lambda c: c['id'])]
    self.label_to_category_id = {
        k + 1: c['id'] for k, c in enumerate(sorted(gt['categories'],
                                                    key=lambda c: c['id']))}
    cat_to_label = {v: k for k, v in self.label_to_category_id.items()}
    self.examples = []
    for img in gt['images']:
      anns = [a for a in gt['annotations'] if a['image_id'] == img['id']]
      self.examples.append(dict(
          image_id=img['id'], orig_size=np.array([img['height'], img['width']]),
          boxes=np.array([[x, y, x + w, y + h] for x, y, w, h in
                          (a['bbox'] for a in anns)], np.float32),
          classes=np.array([cat_to_label[a['category_id']] for a in anns]),
          is_crowd=np.zeros(len(anns), bool)))

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


def test_ground_truth_rebuilt_from_a_source_scores_like_the_file(tmp_path):
  gt = _gt_dataset()
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(gt))
  rng = np.random.default_rng(4)
  dets = [dict(image_id=a['image_id'], category_id=a['category_id'],
               bbox=[v + rng.normal(0, 2) for v in a['bbox']],
               score=float(rng.uniform())) for a in gt['annotations']]
  config = make_config()  # val_annotations unset: rebuild from the source
  coco, name = eval_lib.ground_truth(_ListSource(gt), config)
  assert name is None
  rebuilt = eval_lib.coco_evaluate(coco, dets, verbose=False)
  from_file = eval_lib.coco_evaluate(str(path), dets, verbose=False)
  for key in eval_lib.SUMMARY_KEYS:
    assert rebuilt[key] == pytest.approx(from_file[key]), key
  assert rebuilt['per_class'] == pytest.approx(from_file['per_class'])


def test_gather_across_two_processes(tmp_path):
  """Two CPU processes (jax.distributed, gloo) with 2 and 5 images."""
  import os
  from tests import eval_helper
  from tests import multiprocess
  out = tmp_path / 'gathered.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  results = multiprocess.run(
      lambda coordinator, i: [
          os.path.join('tests', 'eval_helper.py'), '--coordinator',
          coordinator, '--num_processes', '2', '--process_id', str(i),
          '--out', str(out)], 2, timeout=240, env=env)
  assert all(rc == 0 for rc, _, _ in results), [
      (o + e)[-2000:] for _, o, e in results]
  gathered = {k: np.asarray(v) for k, v in json.loads(out.read_text()).items()}
  expected = [eval_helper.host_detections(i) for i in range(2)]
  for key in expected[0]:
    np.testing.assert_array_equal(
        gathered[key], np.concatenate([e[key] for e in expected]), key)
  assert len(gathered['image_id']) == 7
  assert gathered['image_id'].max() > 2**40  # 64-bit ids are not truncated
