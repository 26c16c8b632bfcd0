"""experiments.cross_heads.class_blind_metrics against closed-form APs."""
import json

import pytest

from mimicdet_jax.evaluation import coco
from mimicdet_jax.experiments import cross_heads


def _annotations(tmp_path):
  """Two images, one box of each of two classes per image."""
  images = [{'id': i, 'width': 100, 'height': 100, 'file_name': f'{i}.png'}
            for i in (1, 2)]
  boxes = {1: [10, 10, 30, 30], 2: [50, 50, 40, 20]}
  anns = []
  for image in (1, 2):
    for cat, box in boxes.items():
      anns.append({'id': len(anns) + 1, 'image_id': image, 'category_id': cat,
                   'bbox': box, 'area': box[2] * box[3], 'iscrowd': 0})
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps({
      'images': images, 'annotations': anns,
      'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]}))
  return str(path), anns


def test_swapped_classes_lose_everything_class_aware_nothing_blind(tmp_path):
  path, anns = _annotations(tmp_path)
  # Every box exactly where a ground-truth box is, with the other class.
  dets = [{'image_id': a['image_id'], 'category_id': 3 - a['category_id'],
           'bbox': a['bbox'], 'score': 0.9} for a in anns]
  aware = coco.coco_evaluate(path, dets, verbose=False)
  blind = cross_heads.class_blind_metrics(path, dets)
  assert aware['AP'] == pytest.approx(0.0)
  assert blind['AP'] == pytest.approx(1.0)
  assert blind['AR100'] == pytest.approx(1.0)


def test_blind_keeps_localisation_errors(tmp_path):
  path, anns = _annotations(tmp_path)
  # Right classes; class 2's boxes shifted to IoU 1/3 with their gt (a
  # 40x20 box moved 20 px along x: overlap 20x20 = 400, union 1200), which
  # matches at no COCO threshold (0.5..0.95) with or without classes.
  dets = []
  for a in anns:
    x, y, w, h = a['bbox']
    if a['category_id'] == 2:
      x += 20
    dets.append({'image_id': a['image_id'], 'category_id': a['category_id'],
                 'bbox': [x, y, w, h],
                 'score': 0.9 if a['category_id'] == 2 else 0.5})
  aware = coco.coco_evaluate(path, dets, verbose=False)
  blind = cross_heads.class_blind_metrics(path, dets)
  # Class-aware: class 1 AP 1, class 2 AP 0, mean 0.5. Class-blind: the two
  # misses rank first (score 0.9), then the two hits: precision 1/3 at
  # recall 1/4, 1/2 at recall 1/2, none beyond; COCO's interpolated
  # precision is 0.5 at the 51 recall points 0, 0.01, ..., 0.5 of 101.
  assert aware['AP'] == pytest.approx(0.5)
  assert blind['AR100'] == pytest.approx(0.5)
  assert blind['AP'] == pytest.approx(0.5 * 51 / 101)
