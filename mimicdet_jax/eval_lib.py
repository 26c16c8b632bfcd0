"""Inference (SPEC section 4), COCO result writing and COCO scoring.

Three layers, each usable alone:

1. `postprocess` (pure jnp, static shapes): dense model outputs -> at most
   `eval.max_detections` boxes per image. `make_predict_fn` wraps the model
   and `postprocess` into one jitted function.
2. `detections_to_coco`: canvas boxes of a batch -> COCO result dicts in
   original-image pixels, xywh, with the annotation file's category ids.
3. `coco_evaluate`: pycocotools on a result list -> the metrics dict written
   to `metrics.json` (schema in docs/EVAL.md).

`evaluate` runs all three over a data set on every local device (batch split
over a one-axis mesh) and gathers the results of every host on process 0.

Boxes are (x1, y1, x2, y2) float32 pixels; "canvas" pixels are those of the
network input (resized, padded), "original" pixels those of the image file:
original = canvas / scale.
"""
import functools
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax import errors
from mimicdet_jax import ops
from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.models import mimicdet
from mimicdet_jax.targets import proposals as proposals_lib

Array = jnp.ndarray

# The twelve numbers of COCOeval.summarize() for bbox, in its order.
SUMMARY_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


# --------------------------------------------------------------------------
# 1. Post-processing.


def _gather(x: Array, idx: Array) -> Array:
  """x [B, A, ...] gathered at idx [B, N] -> [B, N, ...]."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def select_positions(refine_logits: Array, topk: int) -> tuple[Array, Array]:
  """Top-`topk` dense positions per image by refinement objectness.

  Args:
    refine_logits: [B, A] objectness logits.
    topk: static; clamped to A.
  Returns:
    idx int32 [B, N] (flat origin indices, descending objectness) and the
    objectness probabilities float32 [B, N].
  """
  n = min(int(topk), refine_logits.shape[1])
  logits, idx = jax.lax.top_k(refine_logits.astype(jnp.float32), n)
  return idx.astype(jnp.int32), jax.nn.sigmoid(logits)


def class_probs(cls_logits: Array) -> Array:
  """Softmax over [.., L] logits with the background (index 0) dropped."""
  return jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[..., 1:]


def select_detections(boxes: Array, probs: Array, *, score_threshold: float,
                      nms_threshold: float,
                      max_detections: int) -> dict[str, Array]:
  """Score threshold -> per-class NMS -> top `max_detections`, per image.

  Every (box, class) pair is a candidate, as in Faster R-CNN inference with
  class-agnostic box deltas. `batched_nms` returns the kept pairs in
  descending score order, so its first `max_detections` are the top ones.

  Args:
    boxes: [B, N, 4] class-agnostic boxes (canvas pixels, already clipped).
    probs: [B, N, K] foreground class probabilities.
    score_threshold: pairs with a score below it are dropped (SPEC: 0.005).
    nms_threshold: IoU above which a same-class box is suppressed.
    max_detections: static output length M.
  Returns:
    dict with boxes [B, M, 4], scores [B, M], classes int32 [B, M] in 1..K
    (0 where invalid), valid bool [B, M]. Invalid rows are zero.
  """
  _, n, k = probs.shape

  def one_image(img_boxes, img_probs):
    scores = img_probs.reshape(n * k)
    box_idx = jnp.arange(n * k, dtype=jnp.int32) // k
    classes = jnp.arange(n * k, dtype=jnp.int32) % k + 1
    # Empty boxes (e.g. clipped away entirely) are not detections.
    nonempty = ops.box_area(img_boxes) > 0
    valid = (scores >= score_threshold) & nonempty[box_idx]
    keep, keep_valid = ops.batched_nms(
        img_boxes[box_idx], scores, classes, nms_threshold,
        max_output_size=max_detections, valid=valid)
    out_boxes = jnp.where(keep_valid[:, None], img_boxes[box_idx[keep]], 0.0)
    return dict(boxes=out_boxes,
                scores=jnp.where(keep_valid, scores[keep], 0.0),
                classes=jnp.where(keep_valid, classes[keep], 0),
                valid=keep_valid)

  return jax.vmap(one_image)(boxes.astype(jnp.float32),
                             probs.astype(jnp.float32))


def postprocess(outputs: Mapping[str, Array], anchor_boxes: Array,
                image_size: Array, config,
                t_head_fn: Optional[Callable[..., tuple]] = None,
                anchor_level: Optional[Array] = None) -> dict[str, Array]:
  """SPEC section 4 on the model's dense outputs.

  Top `eval.pre_nms_topk` positions by objectness (cells inside the image
  only, with `proposals.inside_image`) -> refined boxes (anchor +
  refinement deltas, clipped to the image) -> class probabilities and boxes
  from the S-head (deltas on the refined boxes), the T-head on the same boxes,
  or the mean of both (`eval.head`) -> optional score x objectness ->
  `select_detections`.

  Args:
    outputs: the model's dict (refine_logits [B, A], refine_deltas [B, A, 4],
      s_cls_logits [B, A, L], s_deltas [B, A, 4]).
    anchor_boxes: [A, 4] canvas pixels, same flat order as the outputs.
    image_size: int [B, 2] (h, w) of the image inside the canvas; boxes are
      clipped to it.
    config: the resolved config (reads eval.*, refine.stds, s_head.stds,
      t_head.stds, box.scale_clip).
    t_head_fn: (refined boxes [B, N, 4], box_levels [B, N] or None) ->
      (t_cls_logits [B, N, L], _, t_deltas [B, N, 4]); needed when eval.head
      is 't' or 'both'.
    anchor_level: int [A] level of each position; needed for the T-head
      under `t_head.level_rule=staggered`.
  Returns:
    `select_detections`' dict, boxes in canvas pixels.
  """
  ev = config.eval
  scale_clip = config.box.scale_clip
  refine_logits = outputs['refine_logits'].astype(jnp.float32)
  if config.proposals.inside_image:
    inside = proposals_lib.cells_inside_image(
        jnp.asarray(anchor_boxes, jnp.float32), image_size)
    refine_logits = jnp.where(inside, refine_logits, -jnp.inf)
  idx, objectness = select_positions(refine_logits, ev.pre_nms_topk)
  refined = ops.decode_deltas(
      _gather(outputs['refine_deltas'], idx).astype(jnp.float32),
      jnp.asarray(anchor_boxes, jnp.float32)[idx], config.refine.stds,
      scale_clip=scale_clip)
  refined = ops.clip_boxes(refined, image_size)
  # Proposals carry no gradient in training either; the T-head sees the
  # same boxes as the S-head's deltas refer to.
  refined = jax.lax.stop_gradient(refined)

  heads = []
  if ev.head in ('s', 'both'):
    heads.append((_gather(outputs['s_cls_logits'], idx),
                  _gather(outputs['s_deltas'], idx), config.s_head.stds))
  if ev.head in ('t', 'both'):
    if t_head_fn is None:
      raise ValueError(f'eval.head={ev.head!r} needs t_head_fn')
    box_levels = None
    if config.t_head.level_rule != 'fpn':
      if anchor_level is None:
        raise ValueError('the staggered T-head level rule needs anchor_level')
      box_levels = mimicdet.t_head_box_levels(config, anchor_level, idx)
    t_cls_logits, _, t_deltas = t_head_fn(refined, box_levels)
    heads.append((t_cls_logits, t_deltas, config.t_head.stds))
  if not heads:
    raise ValueError(f'eval.head={ev.head!r}; expected s, t or both')

  probs, boxes = 0.0, 0.0
  for cls_logits, deltas, stds in heads:
    probs = probs + class_probs(cls_logits)
    boxes = boxes + ops.clip_boxes(
        ops.decode_deltas(deltas.astype(jnp.float32), refined, stds,
                              scale_clip=scale_clip), image_size)
  probs = probs / len(heads)
  boxes = boxes / len(heads)
  if ev.score_times_objectness:
    probs = probs * objectness[..., None]
  # Padding cells picked only because fewer than topk cells are inside the
  # image (objectness -inf -> 0) are no detections.
  probs = jnp.where(objectness[..., None] > 0, probs, 0.0)
  return select_detections(boxes, probs, score_threshold=ev.score_threshold,
                           nms_threshold=ev.nms_threshold,
                           max_detections=ev.max_detections)


def make_predict_fn(model, config) -> Callable[..., dict[str, Array]]:
  """One jitted function: images -> detections in canvas pixels.

  Returns fn(variables, images [B, Hc, Wc, 3], image_size [B, 2] or None)
  -> dict boxes [B, M, 4] (canvas pixels), scores [B, M], classes int32
  [B, M] (1..K), valid bool [B, M]. image_size None clips to the canvas.
  Shard `images` over devices (see `evaluate`) for data parallelism; the
  computation follows the input sharding.
  """

  def predict(variables, images, image_size=None):
    canvas_hw = images.shape[1:3]
    if image_size is None:
      image_size = jnp.broadcast_to(jnp.asarray(canvas_hw, jnp.int32),
                                    (images.shape[0], 2))
    outputs = model.apply(variables, images, train=False)
    anchors = anchors_lib.dense_anchors(
        canvas_hw, config.model.s_levels, config.model.anchor_scale)

    def t_head_fn(boxes, box_levels):
      return model.apply(variables, outputs['t_features'], boxes, box_levels,
                         method='t_head')

    return postprocess(outputs, anchors['boxes'], image_size, config,
                       t_head_fn, anchor_level=anchors['level'])

  return jax.jit(predict)


# --------------------------------------------------------------------------
# 2. COCO result writing.


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
  xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], -1)
  scores = np.asarray(dets['scores'])
  classes = np.asarray(dets['classes'])
  valid = np.asarray(dets['valid'], bool)
  image_ids = np.asarray(batch['image_id'])
  example_valid = np.asarray(batch.get('example_valid',
                                       np.ones(len(image_ids), bool)), bool)
  results = []
  for b in np.nonzero(example_valid)[0]:
    for m in np.nonzero(valid[b])[0]:
      results.append({
          'image_id': int(image_ids[b]),
          'category_id': int(label_to_category_id[int(classes[b, m])]),
          'bbox': [round(float(v), 2) for v in xywh[b, m]],
          'score': round(float(scores[b, m]), 5),
      })
  return results


# --------------------------------------------------------------------------
# 3. Scoring.


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


# --------------------------------------------------------------------------
# Running over a data set.


def local_mesh() -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over this host's devices."""
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), ('data',))


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict:
  """Pads the leading axis to `size` with copies of the first image.

  The copies have example_valid False and are dropped from the results.
  """
  n = len(batch['image'])
  out = {k: np.asarray(v) for k, v in batch.items()}
  out.setdefault('example_valid', np.ones(n, bool))
  if n < size:
    fill = np.zeros(size - n, np.int64)
    out = {k: np.concatenate([v, v[fill]]) for k, v in out.items()}
    out['example_valid'][n:] = False
  return out


def run_inference(predict_fn, variables, batches: Iterable[Mapping],
                  mesh: Optional[jax.sharding.Mesh] = None,
                  on_batch: Optional[Callable[[dict, dict], None]] = None
                  ) -> dict[str, np.ndarray]:
  """Runs `predict_fn` over batches, data-parallel over the mesh's devices.

  Each batch is padded to a multiple of the device count and split over the
  'data' axis; variables are replicated.

  Returns this host's detections, stacked over images (padding images
  dropped): boxes [n, M, 4] in *canvas* pixels, scores [n, M], classes [n, M],
  valid [n, M], and the image's image_id [n], image_size [n, 2], orig_size
  [n, 2], so
  `detections_to_coco(dets, dets, label_to_category_id)` writes them.
  `on_batch(batch, dets)` (host arrays) sees every batch, e.g. to draw it.
  """
  mesh = mesh or local_mesh()
  ndev = mesh.devices.size
  data_sharding = jax.sharding.NamedSharding(mesh,
                                             jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  det_keys = ('boxes', 'scores', 'classes', 'valid')
  image_keys = ('image_id', 'image_size', 'orig_size')
  parts = {k: [] for k in det_keys + image_keys}
  for batch in batches:
    n = len(batch['image'])
    batch = _pad_batch(batch, -(-n // ndev) * ndev)
    images = jax.device_put(np.asarray(batch['image'], np.float32),
                            data_sharding)
    sizes = jax.device_put(np.asarray(batch['image_size'], np.int32),
                           data_sharding)
    dets = jax.tree.map(np.asarray, predict_fn(variables, images, sizes))
    if on_batch is not None:
      on_batch(batch, dets)
    keep = np.asarray(batch['example_valid'], bool)
    for key in det_keys:
      parts[key].append(dets[key][keep])
    for key in image_keys:
      parts[key].append(np.asarray(batch[key])[keep])
  if not parts['image_id']:
    raise ValueError('no evaluation batches')
  return {k: np.concatenate(v) for k, v in parts.items()}


def gather_across_hosts(dets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates every host's `run_inference` output (all hosts call this).

  Hosts hold different image counts, so each pads to the largest count before
  `process_allgather`; a `present` mask drops the padding afterwards.
  64-bit integers (image ids) travel as pairs of int32, since JAX without
  x64 would truncate them to int32.
  """
  if jax.process_count() == 1:
    return dets
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = len(dets['image_id'])
  counts = multihost_utils.process_allgather(np.asarray([n], np.int32))
  n_max = int(np.max(counts))
  padded = {k: np.concatenate([v, np.zeros((n_max - n,) + v.shape[1:],
                                           v.dtype)])
            for k, v in dets.items()}
  wide = {k: v.dtype for k, v in padded.items() if v.dtype.itemsize == 8}
  for k in wide:  # [n_max, ...] 8-byte -> [n_max, ..., 2] int32, same bytes
    padded[k] = np.ascontiguousarray(padded[k]).view(np.int32).reshape(
        padded[k].shape + (2,))
  padded['present'] = np.arange(n_max) < n
  gathered = multihost_utils.process_allgather(padded)  # [P, n_max, ...]
  present = np.asarray(gathered.pop('present')).reshape(-1)
  out = {k: np.asarray(v).reshape((-1,) + v.shape[2:])[present]
         for k, v in gathered.items()}
  for k, dtype in wide.items():
    out[k] = np.ascontiguousarray(out[k]).view(dtype).reshape(
        out[k].shape[:-1])
  return out


# --------------------------------------------------------------------------
# Checkpoints, config, pictures, and the whole evaluation.

GT_COLOR = (0, 200, 0)  # green: ground truth in --viz pictures
DET_COLOR = (255, 40, 40)  # red: detections


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed steps under WORKDIR/checkpoints, ascending.

  Orbax writes a step into a temporary directory and renames it to the bare
  step number when complete, so only all-digit names are finished steps.
  Read-only: unlike a CheckpointManager, this never cleans up temporary
  directories of a training run that is still saving.
  """
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(name) for name in os.listdir(ckpt_dir)
                if name.isdigit() and
                os.path.isdir(os.path.join(ckpt_dir, name, 'state')))


def restore_variables(workdir: str, checkpoint: str = 'latest'
                      ) -> tuple[dict, Optional[int]]:
  """Model variables {'params', 'frozen'} of a training checkpoint.

  Args:
    workdir: the training WORKDIR (checkpoints under WORKDIR/checkpoints,
      written by mimicdet_jax.checkpoint.Checkpointer).
    checkpoint: 'latest', a step number, a step directory
      (WORKDIR/checkpoints/1500) or its 'state' item directory.
  Returns:
    (variables as host arrays, step or None when a path was given).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = None
  if checkpoint in (None, '', 'latest'):
    steps = checkpoint_steps(workdir)
    if not steps:
      raise errors.MissingFileError(
          f'{os.path.join(workdir, "checkpoints")}: no checkpoint (train '
          'first, or pass --checkpoint PATH)')
    step = steps[-1]
  elif str(checkpoint).isdigit():
    step = int(checkpoint)
  if step is not None:
    path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  else:
    path = str(checkpoint)
    if os.path.isdir(os.path.join(path, 'state')):
      path = os.path.join(path, 'state')
    base = os.path.basename(os.path.dirname(os.path.abspath(path)))
    step = int(base) if base.isdigit() else None
  if not os.path.isdir(path):
    raise errors.MissingFileError(f'{path}: checkpoint not found')
  # No template: the saved tree comes back as nested dicts; only the model
  # variables are kept (the optimiser state is not needed).
  state = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  variables = {'params': state['params'], 'frozen': state.get('frozen', {})}
  variables = jax.tree.map(np.asarray, variables)
  logging.info('restored variables of step %s from %s', step, path)
  return variables, step


def resolve_config(config, workdir: Optional[str] = None):
  """Resolves a recipe config for inference (number of classes).

  The number of classes is, in order: data.num_classes when set; the one the
  training run recorded in WORKDIR/config.json; the training annotation
  file's categories; the validation file's.
  """
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  if isinstance(config, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    config = ml_collections.ConfigDict(config)
  num_classes = int(config.data.num_classes)
  if num_classes == -1 and workdir:
    saved = os.path.join(workdir, 'config.json')
    if os.path.exists(saved):
      with open(saved) as f:
        num_classes = int(json.load(f)['model']['num_classes'])
  if num_classes == -1:
    for split in ('train', 'val'):
      names = class_names_from_annotations(config.data, split)
      if names is not None:
        num_classes = len(names)
        break
  if num_classes == -1:
    raise errors.ConfigError(
        'cannot tell the number of classes: set --config.data.num_classes '
        'or data.*_annotations')
  return config_lib.resolve(config, num_classes)


def load_config(workdir: str, config=None, head: Optional[str] = None):
  """The resolved config: `config` (a recipe) or WORKDIR/config.json.

  `head` ('s', 't', 'both') replaces eval.head when given.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  if config is None:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise errors.MissingFileError(
          f'{path}: not found (not a training workdir?); pass --config')
    with open(path) as f:
      config = json.load(f)
  if isinstance(config, dict):
    # A run trained before some keys existed: fill them as that code behaved.
    from configs import common  # pylint: disable=g-import-not-at-top
    from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
    config = _tuples(config_lib.fill_missing_keys(
        config, common.base_config().to_dict()))
  config = ml_collections.ConfigDict(
      config if isinstance(config, dict) else config.to_dict())
  if head is not None:
    config.eval.head = head
  return resolve_config(config, workdir)


def _tuples(obj):
  """JSON lists back to the tuples the configs use."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


CATEGORIES_FILE = 'categories.json'  # WORKDIR/categories.json, written by training


def training_categories(config, workdir: Optional[str]
                        ) -> tuple[Optional[list[dict[str, Any]]], str]:
  """The categories labels 1..K of the model stand for, and their origin.

  WORKDIR/categories.json (written by training) when present, else the
  training annotation file's categories; (None, '') when neither is there
  (a TFDS source: its categories are fixed by the data set).
  """
  path = os.path.join(workdir, CATEGORIES_FILE) if workdir else ''
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f), path
  data = config.data
  if (data.source == 'coco_json' and data.train_annotations and
      os.path.exists(data.train_annotations)):
    from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
    return coco.read_categories(data.train_annotations), data.train_annotations
  return None, ''


def check_categories(config, workdir: Optional[str], source) -> None:
  """Raises unless `source` (validation data) has the model's categories.

  Ids and names must agree with the training categories
  (`training_categories`); without those, at least the count must match.
  """
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  name = getattr(source, 'annotation_file', repr(source))
  expected, expected_name = training_categories(config, workdir)
  if expected is not None:
    validation.check_same_categories(expected, expected_name,
                                     source.categories, name)
  if source.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'{name} has {source.num_classes} categories but the model '
        f'{config.model.num_classes} classes: labels would map to the wrong '
        'category ids')


def class_names_from_annotations(data, split: str) -> Optional[list[str]]:
  """Class names of labels 1..K from a COCO JSON's categories, or None.

  Labels follow increasing category id, as data/coco.py maps them.
  """
  if data.source != 'coco_json':
    return None
  path = data.train_annotations if split == 'train' else data.val_annotations
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    categories = json.load(f).get('categories', [])
  return [c['name'] for c in sorted(categories, key=lambda c: c['id'])]


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores, classes,
                    class_names: Sequence[str], score_threshold: float,
                    gt_boxes: Optional[np.ndarray] = None,
                    gt_classes: Optional[Sequence[int]] = None):
  """PIL picture: gt (green, 'gt:' captions) then detections (red) above
  `score_threshold`. Boxes in pixels of `image`; classes are labels 1..K."""
  from mimicdet_jax import viz  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.uint8)
  if gt_boxes is not None and len(gt_boxes):
    image = np.asarray(viz.draw_boxes(
        image, gt_boxes, [f'gt:{class_name(class_names, c)}' for c in gt_classes],
        color=GT_COLOR))
  keep = np.asarray(scores) >= score_threshold
  return viz.draw_boxes(
      image, np.asarray(boxes)[keep],
      [class_name(class_names, c) for c in np.asarray(classes)[keep]],
      scores=np.asarray(scores)[keep], color=None if gt_boxes is None
      else DET_COLOR)


def class_name(class_names: Sequence[str], label) -> str:
  """Name of label 1..K, or "class k" when unknown."""
  label = int(label)
  if 1 <= label <= len(class_names):
    return str(class_names[label - 1])
  return f'class {label}'


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


@functools.lru_cache(maxsize=4)
def _predict_fn_of_config(config) -> Callable[..., dict[str, Array]]:
  """One compiled predict function per (frozen, hashable) config, so that
  periodic evaluation during training does not recompile each time."""
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
  return make_predict_fn(mimicdet.MimicDet(config), config)


def evaluate(config, variables, workdir: str, step: Optional[int] = None, *,
             viz: Optional[int] = None, model=None,
             out_dir: Optional[str] = None) -> Optional[dict[str, Any]]:
  """Detects on the validation split, writes and scores the results.

  `config` is the resolved (frozen) config; the compiled predict function
  is cached per config. Every process calls this (each runs its shard of the images on its local
  devices); process 0 gathers, writes OUT/detections.json and
  OUT/metrics.json (OUT = WORKDIR/eval unless `out_dir`), appends the metrics
  with `step` to OUT/history.jsonl, prints the COCO and per-class tables and
  draws the first `viz` images (default eval.viz) to OUT/viz/.

  Returns:
    The metrics dict on process 0, None on the others.
  """
  from mimicdet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out_dir = out_dir or os.path.join(workdir, 'eval')
  viz = int(config.eval.viz if viz is None else viz)
  source = pipeline.build_source(config.data, 'val')
  check_categories(config, workdir, source)
  pid, pcount = jax.process_index(), jax.process_count()
  batch_size = max(1, -(-int(config.eval.batch_size) // pcount))
  batches = pipeline.make_eval_batches(config, source, batch_size, pid, pcount)
  predict_fn = (_predict_fn_of_config(config) if model is None
                else make_predict_fn(model, config))

  drawn = []

  def draw(batch, dets):
    if pid != 0 or len(drawn) >= viz:
      return
    os.makedirs(os.path.join(out_dir, 'viz'), exist_ok=True)
    for b in np.nonzero(batch['example_valid'])[0]:
      if len(drawn) >= viz:
        break
      # The picture is the network input (resized image, canvas pixels),
      # so it needs nothing but the batch, whatever the source.
      h, w = (int(v) for v in batch['image_size'][b])
      image = (np.asarray(batch['image'][b, :h, :w]) *
               np.asarray(config.data.pixel_std) +
               np.asarray(config.data.pixel_mean))
      gt = batch['box_mask'][b]
      valid = dets['valid'][b]
      picture = draw_detections(
          np.clip(np.round(image), 0, 255).astype(np.uint8),
          dets['boxes'][b][valid], dets['scores'][b][valid],
          dets['classes'][b][valid], source.class_names,
          config.eval.viz_score_threshold, batch['boxes'][b][gt],
          batch['classes'][b][gt])
      path = os.path.join(out_dir, 'viz',
                          f'{int(batch["image_id"][b]):012d}.png')
      picture.save(path)
      drawn.append(path)

  dets = run_inference(predict_fn, variables, batches, on_batch=draw)
  dets = gather_across_hosts(dets)
  if pid != 0:
    return None
  results = detections_to_coco(dets, dets, source.label_to_category_id)
  det_path = os.path.join(out_dir, 'detections.json')
  write_json(det_path, results)
  if step is not None:
    print(f'Evaluation at step {step} on {len(dets["image_id"])} images:')
  coco_gt, gt_name = ground_truth(source, config)
  metrics = coco_evaluate(coco_gt, results)
  metrics.update(step=step, annotations=gt_name,
                 detections=os.path.abspath(det_path))
  write_json(os.path.join(out_dir, 'metrics.json'), metrics)
  with open(os.path.join(out_dir, 'history.jsonl'), 'a') as f:
    f.write(json.dumps({k: v for k, v in metrics.items()
                        if k in SUMMARY_KEYS or k == 'step'}) + '\n')
  if drawn:
    print(f'{len(drawn)} pictures (gt green, detections red, score >= '
          f'{config.eval.viz_score_threshold}) in {os.path.dirname(drawn[0])}')
  return metrics
