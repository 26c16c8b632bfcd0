"""COCO result writing and COCO scoring (pycocotools); no JAX.

- `detections_to_coco`: canvas boxes of a batch -> COCO result dicts in
  original-image pixels, xywh, with the annotation file's category ids;
  `image_results` writes one image's (also for the exported detector).
- `coco_evaluate`: pycocotools on a result list -> the metrics dict written
  to `metrics.json` (schema in docs/EVAL.md); `ground_truth` gives it the
  validation set of any source.
- `score_file`: eval.py's scoring-only mode, with the results file checked
  first (`read_detections`, `check_result_ids`) so that a wrong file ends in
  a message naming it, not in pycocotools' assertion.

Original pixels = canvas pixels * orig_size / image_size per axis.
"""
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mimicdet_jax import errors

# The twelve numbers of COCOeval.summarize() for bbox, in its order.
SUMMARY_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def to_original_pixels(boxes: np.ndarray, image_size, orig_size) -> np.ndarray:
  """Canvas boxes [..., M, 4] -> original-image pixels, clipped to the image.

  Uses the per-axis factors orig / resized that data/transforms.py applied to
  the gt boxes (the nominal `scale` differs from them by the rounding of the
  resized size to whole pixels).

  Args:
    boxes: [..., M, 4] canvas pixels.
    image_size: [..., 2] (h, w) of the resized image inside the canvas.
    orig_size: [..., 2] (h, w) of the original image.
  """
  boxes = np.asarray(boxes, np.float32)
  resized = np.asarray(image_size, np.float32)[..., None, :]
  orig = np.asarray(orig_size, np.float32)[..., None, :]
  factor = orig / np.maximum(resized, 1.0)  # [..., 1, 2] as (h, w)
  out = boxes * np.concatenate([factor[..., ::-1]] * 2, axis=-1)
  out[..., 0::2] = np.clip(out[..., 0::2], 0.0, orig[..., 1:2])
  out[..., 1::2] = np.clip(out[..., 1::2], 0.0, orig[..., 0:1])
  return out


def detections_to_coco(dets: Mapping[str, np.ndarray],
                       batch: Mapping[str, np.ndarray],
                       label_to_category_id: Mapping[int, int]
                       ) -> list[dict[str, Any]]:
  """One batch of detections -> COCO results-format dicts.

  Args:
    dets: boxes [B, M, 4] (canvas pixels), scores [B, M], classes [B, M]
      (contiguous labels 1..K), valid [B, M].
    batch: image_id [B], image_size [B, 2], orig_size [B, 2], and optionally
      example_valid [B] (False for padding images, which are skipped).
    label_to_category_id: label 1..K -> the annotation file's category id.
  Returns:
    [{'image_id', 'category_id', 'bbox': [x, y, w, h] original pixels,
      'score'}], only valid detections of real images.
  """
  boxes = to_original_pixels(dets['boxes'], batch['image_size'],
                             batch['orig_size'])
  scores = np.asarray(dets['scores'])
  classes = np.asarray(dets['classes'])
  valid = np.asarray(dets['valid'], bool)
  image_ids = np.asarray(batch['image_id'])
  example_valid = np.asarray(batch.get('example_valid',
                                       np.ones(len(image_ids), bool)), bool)
  results = []
  for b in np.nonzero(example_valid)[0]:
    keep = valid[b]
    results += image_results(
        image_ids[b], boxes[b][keep], scores[b][keep],
        [label_to_category_id[int(c)] for c in classes[b][keep]])
  return results


def image_results(image_id, boxes: np.ndarray, scores: np.ndarray,
                  category_ids: Sequence[int]) -> list[dict[str, Any]]:
  """One image's detections -> COCO results-format dicts.

  boxes [n, 4] x1y1x2y2 in original pixels (the exported detector's output,
  or `to_original_pixels` of canvas boxes), scores [n], category ids [n].
  Coordinates are rounded to 0.01 px and scores to 1e-5, for every path.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], -1)
  return [{'image_id': int(image_id), 'category_id': int(c),
           'bbox': [round(float(v), 2) for v in box],
           'score': round(float(s), 5)}
          for box, s, c in zip(xywh, np.asarray(scores), category_ids)]


def coco_evaluate(annotations, detections: Sequence[Mapping[str, Any]],
                  verbose: bool = True) -> dict[str, Any]:
  """pycocotools bbox evaluation -> the metrics.json dict.

  Args:
    annotations: path of a COCO-format JSON or a pycocotools COCO object.
    detections: COCO results-format dicts (may be empty: every AP is then 0
      and a warning is logged).
    verbose: print COCOeval's standard table and a per-class table.
  Returns:
    dict: the 12 COCO summary numbers under SUMMARY_KEYS (fractions in [0, 1]
    exactly as COCOeval.stats, -1 where pycocotools has no ground truth),
    'per_class' {class name: AP@[.5:.95] or -1 for a class without gt},
    'per_class_AP50' likewise, 'num_images', 'num_detections'.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  coco_gt = annotations if isinstance(annotations, COCO) else _load_coco(
      annotations)
  detections = list(detections)
  if detections:
    coco_dt = coco_gt.loadRes(detections)
  else:
    # loadRes([]) raises (it reads anns[0]); an empty result set scored by
    # COCOeval gives AP 0 for every class with gt, which is the truth.
    logging.warning('No detections: every AP is 0.')
    print('WARNING: no detections; every AP is 0.')
    coco_dt = COCO()
    coco_dt.dataset = {'images': list(coco_gt.dataset.get('images', [])),
                       'categories': list(coco_gt.dataset.get('categories', [])),
                       'annotations': []}
    _quiet_or_not(coco_dt.createIndex, False)
  coco_eval = COCOeval(coco_gt, coco_dt, 'bbox')
  _quiet_or_not(coco_eval.evaluate, verbose)
  _quiet_or_not(coco_eval.accumulate, verbose)
  _quiet_or_not(coco_eval.summarize, verbose)
  metrics = {k: float(v) for k, v in zip(SUMMARY_KEYS, coco_eval.stats)}
  per_class, per_class_50 = _per_class_ap(coco_eval, coco_gt)
  metrics['per_class'] = per_class
  metrics['per_class_AP50'] = per_class_50
  metrics['num_images'] = len(coco_gt.getImgIds())
  metrics['num_detections'] = len(detections)
  if verbose:
    print(format_per_class_table(per_class, per_class_50))
  return metrics


def _load_coco(path: str):
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(path)


def _quiet_or_not(fn, verbose):
  if verbose:
    return fn()
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    return fn()


def _per_class_ap(coco_eval, coco_gt) -> tuple[dict, dict]:
  """AP@[.5:.95] and AP50 per category, as COCOeval.summarize averages them.

  precision is [T, R, K, A, M]; area range 'all' is A index 0 and maxDets
  100 is the last M index; entries of -1 (no gt) are left out of the mean.
  """
  precision = coco_eval.eval['precision']
  area = list(coco_eval.params.areaRngLbl).index('all')
  max_det = len(coco_eval.params.maxDets) - 1
  iou50 = int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - 0.5)))
  ap, ap50 = {}, {}
  for k, cat_id in enumerate(coco_eval.params.catIds):
    name = coco_gt.cats[cat_id]['name']
    if name in ap:  # duplicate names: keep both, tell them apart by id
      name = f'{name} ({cat_id})'
    p = precision[:, :, k, area, max_det]
    p50 = precision[iou50, :, k, area, max_det]
    ap[name] = float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0
    ap50[name] = float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else -1.0
  return ap, ap50


def format_per_class_table(per_class: Mapping[str, float],
                           per_class_50: Optional[Mapping[str, float]] = None,
                           columns: int = 3) -> str:
  """Per-class AP (percent) in `columns` column groups, -1 shown as 'n/a'."""
  def pct(v):
    return '  n/a' if v < 0 else f'{100 * v:5.1f}'
  cells = []
  for name, v in per_class.items():
    cell = f'{name[:18]:<18} {pct(v)}'
    if per_class_50 is not None:
      cell += f' {pct(per_class_50[name])}'
    cells.append(cell)
  head = f'{"category":<18} {"AP":>5}' + (f' {"AP50":>5}' if per_class_50
                                           is not None else '')
  width = len(head)
  lines = [' | '.join([head] * min(columns, max(1, len(cells)))),
           '-+-'.join(['-' * width] * min(columns, max(1, len(cells))))]
  for i in range(0, len(cells), columns):
    lines.append(' | '.join(c.ljust(width) for c in cells[i:i + columns]))
  return 'Per-class bbox AP (%):\n' + '\n'.join(lines)


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (temp file + rename), creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def read_detections(path: str) -> list[dict[str, Any]]:
  """A COCO results file: a JSON list of {image_id, category_id, bbox, score}.

  Raises:
    UserError: naming the file (and the entry) when it is missing, not JSON,
      or not such a list.
  """
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise errors.MissingFileError(f'{path}: detections file not found')
  try:
    with open(path) as f:
      detections = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise validation.BadInputError(
        f'{path}: cannot read the detections file as JSON: {e}') from e
  if not isinstance(detections, list):
    raise validation.BadInputError(
        f'{path}: expected a JSON list of COCO results, got a '
        f'{type(detections).__name__}')
  for i, d in enumerate(detections):
    bbox = d.get('bbox') if isinstance(d, dict) else None
    if (not isinstance(d, dict) or not isinstance(d.get('image_id'), int) or
        not isinstance(d.get('category_id'), int) or
        not isinstance(d.get('score'), (int, float)) or
        not isinstance(bbox, list) or len(bbox) != 4 or
        not all(isinstance(v, (int, float)) for v in bbox)):
      raise validation.BadInputError(
          f'{path}: entry {i} is not a COCO bbox result {{"image_id": int, '
          f'"category_id": int, "bbox": [x, y, w, h], "score": float}}: '
          f'{str(d)[:200]}')
  return detections


def load_annotations(path: str):
  """pycocotools COCO of an annotation file, with errors that name it."""
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise errors.MissingFileError(f'{path}: annotation file not found')
  try:
    return _load_coco(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise validation.BadInputError(
        f'{path}: cannot read the annotation file as JSON: {e}') from e
  except (KeyError, TypeError, AttributeError) as e:
    raise validation.BadInputError(
        f'{path}: not a COCO-format annotation file ({type(e).__name__}: '
        f'{e})') from e


def check_result_ids(detections: Sequence[Mapping[str, Any]], coco_gt,
                     detections_name: str, annotations_name: str) -> None:
  """Raises, naming ids and both files, for image or category ids that the
  annotations do not have."""
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  for key, known, what in (
      ('image_id', set(coco_gt.getImgIds()), 'image'),
      ('category_id', set(coco_gt.getCatIds()), 'category')):
    unknown = sorted({int(d[key]) for d in detections} - known)
    if unknown:
      shown = ', '.join(map(str, unknown[:5]))
      more = f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''
      raise validation.BadInputError(
          f'{detections_name}: {what} ids {shown}{more} are not in '
          f'{annotations_name} (results must refer to the images and '
          'categories of the annotation file they are scored against)')


def score_file(detections_path: str, annotations_path: str,
               metrics_path: Optional[str] = None,
               verbose: bool = True) -> dict[str, Any]:
  """Scores an existing COCO results file; writes metrics.json.

  metrics_path defaults to metrics.json beside the detections file.

  Raises:
    UserError: naming the file, when either file is missing or unreadable,
      or the detections are not a COCO results list of image and category
      ids of the annotation file (pycocotools would only say "Results do not
      correspond to current coco set").
  """
  detections = read_detections(detections_path)
  coco_gt = load_annotations(annotations_path)
  check_result_ids(detections, coco_gt, detections_path, annotations_path)
  metrics = coco_evaluate(coco_gt, detections, verbose=verbose)
  metrics['annotations'] = os.path.abspath(annotations_path)
  metrics['detections'] = os.path.abspath(detections_path)
  if metrics_path is None:
    metrics_path = os.path.join(
        os.path.dirname(os.path.abspath(detections_path)), 'metrics.json')
  write_json(metrics_path, metrics)
  return metrics


def ground_truth(source, config):
  """(pycocotools COCO of the validation set, its file name or None).

  A COCO-JSON source scores against its own annotation file. Other sources
  (TFDS) use data.val_annotations when it names a file (the official COCO
  JSON scores exactly as the COCO server does); otherwise the ground truth
  is rebuilt from the source's examples, with box areas for `area` (COCO
  uses mask areas for the small/medium/large split, so APs/APm/APl can
  differ slightly from the official numbers; AP, AP50, AP75 do not).
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  if hasattr(source, 'coco_api'):
    return source.coco_api(), os.path.abspath(source.annotation_file)
  path = config.data.val_annotations
  if path and os.path.exists(path):
    return _load_coco(path), os.path.abspath(path)
  logging.warning('scoring against ground truth rebuilt from %r (box areas)',
                  source)
  images, anns = [], []
  for i in range(len(source)):
    ex = source[i]
    h, w = (int(v) for v in ex['orig_size'])
    images.append(dict(id=int(ex['image_id']), height=h, width=w))
    for box, label, crowd in zip(ex['boxes'], ex['classes'], ex['is_crowd']):
      x1, y1, x2, y2 = (float(v) for v in box)
      anns.append(dict(id=len(anns) + 1, image_id=int(ex['image_id']),
                       category_id=int(source.label_to_category_id[int(label)]),
                       bbox=[x1, y1, x2 - x1, y2 - y1],
                       area=(x2 - x1) * (y2 - y1), iscrowd=int(crowd)))
  categories = [dict(id=int(source.label_to_category_id[k + 1]), name=name)
                for k, name in enumerate(source.class_names)]
  coco = COCO()
  coco.dataset = dict(images=images, annotations=anns, categories=categories)
  _quiet_or_not(coco.createIndex, False)
  return coco, None
