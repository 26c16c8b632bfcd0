"""evaluation.coco: result writing and pycocotools scoring, against COCOeval."""
import json

import numpy as np
import pytest

from configs import common
from mimicdet_jax.evaluation import coco as coco_eval


def test_to_original_pixels_rescales_per_axis_and_clips():
  boxes = np.array([[[10., 20., 50., 400.], [-4., 0., 8., 8.]],
                    [[0., 0., 30., 30.], [0., 0., 0., 0.]]], np.float32)
  image_size = np.array([[300, 200], [20, 25]])  # resized (h, w)
  orig = np.array([[150, 100], [40, 50]])  # (h, w): factor 1/2, then 2
  out = coco_eval.to_original_pixels(boxes, image_size, orig)
  np.testing.assert_allclose(out[0, 0], [5, 10, 25, 150])  # y2 200 -> 150
  np.testing.assert_allclose(out[0, 1], [0, 0, 4, 4])
  np.testing.assert_allclose(out[1, 0], [0, 0, 50, 40])  # x 60->50, y 60->40
  # Rounded resize: 333 x 500 -> 800 x 1201 (scale 2.4024 nominal).
  out = coco_eval.to_original_pixels(np.array([[[0, 0, 1201, 800]]]),
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
  results = coco_eval.detections_to_coco(dets, batch, label_to_cat)
  assert len(results) == 6
  assert {r['category_id'] for r in results} == {3, 17, 90}
  metrics = coco_eval.coco_evaluate(str(path), results, verbose=False)
  assert metrics['AP'] == pytest.approx(1.0)
  assert metrics['AP50'] == pytest.approx(1.0)
  assert set(metrics['per_class']) == {'cat', 'dog', 'boat'}
  assert all(v == pytest.approx(1.0) for v in metrics['per_class'].values())
  # A padding image (example_valid False) is skipped.
  batch['example_valid'] = np.array([True, False, True])
  assert len(coco_eval.detections_to_coco(dets, batch, label_to_cat)) == 5


def test_empty_detections_score_zero_with_warning(tmp_path, capsys):
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(_gt_dataset()))
  metrics = coco_eval.coco_evaluate(str(path), [], verbose=True)
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
  metrics = coco_eval.coco_evaluate(str(path), dets, verbose=False)
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
  config = common.base_config()
  config.data.val_annotations = ''  # unset: rebuild from the source
  coco, name = coco_eval.ground_truth(_ListSource(gt), config)
  assert name is None
  rebuilt = coco_eval.coco_evaluate(coco, dets, verbose=False)
  from_file = coco_eval.coco_evaluate(str(path), dets, verbose=False)
  for key in coco_eval.SUMMARY_KEYS:
    assert rebuilt[key] == pytest.approx(from_file[key]), key
  assert rebuilt['per_class'] == pytest.approx(from_file['per_class'])
