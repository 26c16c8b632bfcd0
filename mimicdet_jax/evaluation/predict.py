r"""Runs a checkpoint on a folder of images; writes pictures and a JSON.

The command line is predict.py at the top of the repository (flags only);
this module is what it runs: `predict_checkpoint`, `predict_exported`.

Any image Pillow reads works: any size, grey, palette or RGBA (converted to
RGB; transparency is dropped). For every image OUT gets <name>.png with the
detections scoring at least eval.viz_score_threshold drawn (class name and
score), and OUT/detections.json holds every detection (score >=
eval.score_threshold, at most eval.max_detections per image):

  {"checkpoint_step": 1500, "class_names": [...],
   "images": [{"file_name": "a.jpg", "height": H, "width": W,
               "detections": [{"bbox": [x1, y1, x2, y2], "label": 1..K,
                               "class_name": "...", "score": 0.93}, ...]}]}

Boxes are original-image pixels, x1y1x2y2. A file that cannot be read as
an image is skipped, named in the log and in "skipped": [{"file_name",
"error"}], and counted in the printed summary; the others are written. Class
names come from WORKDIR/categories.json (written by training), else the
annotation files named by the config (training, then validation); without
them, labels are shown as "class k".
"""
import os
from typing import Iterator, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

from mimicdet_jax import errors
from mimicdet_jax.evaluation import coco as coco_eval
from mimicdet_jax.evaluation import inference
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import restore
from mimicdet_jax import viz

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff',
                    '.webp', '.ppm', '.pgm')


def list_images(folder: str) -> list[str]:
  """Image files directly in `folder`, sorted by name."""
  return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                if name.lower().endswith(IMAGE_EXTENSIONS))


def _batches(paths: Sequence[str], data, batch_size: int,
             skipped: Optional[list] = None) -> Iterator[dict[str, np.ndarray]]:
  """Model-example batches [B, ...] of the images (eval transform).

  image_id is the index into `paths`. A file that cannot be decoded is left
  out and appended to `skipped` as (path, reason) (raised when None).
  """
  from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  examples = []
  for i, path in enumerate(paths):
    try:
      image = coco.load_image(path)  # RGB uint8, whatever the file's mode
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      if skipped is None:
        raise
      reason = f'{type(e).__name__}: {e}'
      logging.warning('%s: skipped, not a readable image (%s)', path, reason)
      skipped.append((path, reason))
      continue
    raw = dict(image=image, boxes=np.zeros((0, 4), np.float32),
               classes=np.zeros((0,), np.int32),
               is_crowd=np.zeros((0,), bool), image_id=np.int64(i),
               orig_size=np.array(image.shape[:2], np.int32))
    examples.append(transforms.transform_example(raw, data, train=False))
    if len(examples) == batch_size:
      yield transforms.collate(examples, data.canvas_buckets)
      examples = []
  if examples:
    yield transforms.collate(examples, data.canvas_buckets)


def image_paths(image_dir: str) -> list[str]:
  """`list_images`, with the user errors of a missing or empty folder."""
  if not os.path.isdir(image_dir):
    raise errors.MissingFileError(f'{image_dir}: image folder not found')
  paths = list_images(image_dir)
  if not paths:
    raise errors.MissingFileError(
        f'{image_dir}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
  return paths


def _none_readable(image_dir: str, paths, skipped):
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  return validation.BadInputError(
      f'{image_dir}: none of the {len(paths)} image files could be read '
      f'(first: {skipped[0][0]}: {skipped[0][1]})')


def predict_folder(config, variables, image_dir: str, out_dir: str,
                   class_names: Optional[Sequence[str]] = None,
                   step: Optional[int] = None, model=None) -> dict:
  """Detects on every image of `image_dir`; writes OUT/*.png and the JSON.

  Args:
    config: the resolved config.
    variables: {'params', 'frozen'}.
    image_dir: folder of images.
    out_dir: created if missing.
    class_names: names of labels 1..K; None -> 'class k'.
    step: recorded in the JSON.
    model: a MimicDet; built from config when None.
  Returns:
    The dict written to OUT/detections.json.

  Raises:
    UserError: the folder is missing, holds no image files, or none of
      them can be read. Single unreadable files are skipped (see above).
  """
  if model is None:
    from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
    model = mimicdet.MimicDet(config)
  paths = image_paths(image_dir)
  predict_fn = postprocess.make_predict_fn(model, config)
  skipped = []
  try:
    dets = inference.run_inference(
        predict_fn, variables,
        _batches(paths, config.data, int(config.eval.batch_size), skipped))
  except ValueError:
    if len(skipped) == len(paths):
      raise _none_readable(image_dir, paths, skipped) from None
    raise
  boxes = coco_eval.to_original_pixels(dets['boxes'], dets['image_size'],
                                       dets['orig_size'])
  detections = []
  for i, image_id in enumerate(dets['image_id']):
    valid = dets['valid'][i]
    detections.append((paths[int(image_id)], boxes[i][valid],
                       dets['scores'][i][valid], dets['classes'][i][valid]))
  return write_predictions(out_dir, detections, class_names,
                           config.eval.viz_score_threshold, step, skipped)


def predict_folder_exported(detector, image_dir: str, out_dir: str,
                            viz_score_threshold: float,
                            batch_size: int = 8) -> dict:
  """`predict_folder` with an exported detector (serving/detector.py).

  Labels are 1 + the index of the category in the artifact's categories
  (label order), class names theirs; checkpoint_step is the artifact's.
  """
  from mimicdet_jax.evaluation import exported  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.serving import detector as detector_lib  # pylint: disable=g-import-not-at-top
  paths = image_paths(image_dir)
  skipped, readable = [], []
  for path in paths:
    try:
      readable.append((path, detector_lib.read_image(path)))
    except detector_lib.DetectorError as e:
      logging.warning('%s: skipped (%s)', path, e)
      skipped.append((path, str(e).split(': ', 1)[-1]))
  if not readable:
    raise _none_readable(image_dir, paths, skipped)
  label_of = {int(c['id']): k + 1 for k, c in enumerate(detector.categories)}
  step = min(max(1, int(batch_size)), detector.max_batch)
  detections = []
  for start in range(0, len(readable), step):
    chunk = readable[start:start + step]
    for (path, _), dets in zip(chunk, exported.detect(
        detector, [image for _, image in chunk])):
      labels = np.array([label_of[int(c)] for c in dets['category_ids']],
                        np.int32)
      detections.append((path, dets['boxes'], dets['scores'], labels))
  return write_predictions(
      out_dir, detections, [c['name'] for c in detector.categories],
      viz_score_threshold, detector.signature.get('checkpoint_step'), skipped)


def write_predictions(out_dir: str, detections, class_names, viz_score_threshold,
                      step, skipped) -> dict:
  """OUT/<name>.png per image and OUT/detections.json (module docstring).

  detections: [(path, boxes [n, 4] original pixels, scores [n], labels [n])];
  skipped: [(path, reason)].
  """
  class_names = list(class_names or [])
  os.makedirs(out_dir, exist_ok=True)
  images = []
  for path, b, s, c in detections:
    with Image.open(path) as img:
      rgb = np.asarray(img.convert('RGB'))
    picture = viz.draw_detections(rgb, b, s, c, class_names,
                                  viz_score_threshold)
    stem = os.path.splitext(os.path.basename(path))[0]
    picture.save(os.path.join(out_dir, f'{stem}.png'))
    images.append(dict(
        file_name=os.path.basename(path), height=int(rgb.shape[0]),
        width=int(rgb.shape[1]),
        detections=[dict(bbox=[round(float(v), 2) for v in box],
                         label=int(label),
                         class_name=viz.class_name(class_names, label),
                         score=round(float(score), 5))
                    for box, score, label in zip(b, s, c)]))
  result = dict(checkpoint_step=step, class_names=class_names, images=images,
                skipped=[dict(file_name=os.path.basename(p), error=reason)
                         for p, reason in skipped])
  coco_eval.write_json(os.path.join(out_dir, 'detections.json'), result)
  return result


def predict_checkpoint(workdir: str, image_dir: str, out_dir: str, config=None,
                       checkpoint: str = 'latest',
                       weights: Optional[str] = None) -> dict:
  """`predict_folder` with a checkpoint of a training WORKDIR (predict.py).

  Args:
    workdir: the training WORKDIR (config.json, categories.json,
      checkpoints/).
    image_dir, out_dir: as `predict_folder`.
    config: a recipe config; None = WORKDIR/config.json.
    checkpoint: 'latest', 'best' (train.keep_best), a step or a path.
    weights: 'ema' | 'raw'; None = the config's eval.weights.
  Returns:
    `predict_folder`'s result.
  """
  config = restore.load_config(workdir, config, weights=weights)
  variables, step, used = restore.restore_checkpoint(
      workdir, checkpoint, config.eval.weights)
  print(f'step {step}, {used} weights')
  categories, _ = restore.training_categories(config, workdir)
  names = [c['name'] for c in categories or []]
  if len(names) != config.model.num_classes:
    names = restore.class_names_from_annotations(config.data, 'val')
    if names is None or len(names) != config.model.num_classes:
      names = None
  return predict_folder(config, variables, image_dir, out_dir, names, step)


def predict_exported(exported_dir: str, image_dir: str, out_dir: str,
                     config=None) -> dict:
  """`predict_folder_exported` with the detector of `exported_dir`
  (predict.py --exported); `config` (a recipe, None = the defaults) only
  sets eval.viz_score_threshold and eval.batch_size."""
  from mimicdet_jax.evaluation import exported  # pylint: disable=g-import-not-at-top
  if config is None:
    from configs import common  # pylint: disable=g-import-not-at-top
    config = common.base_config()
  detector = exported.load_detector(exported_dir)
  return predict_folder_exported(detector, image_dir, out_dir,
                                 config.eval.viz_score_threshold,
                                 config.eval.batch_size)


def summary(result: dict, out_dir: str) -> list[str]:
  """The lines predict.py prints for a `predict_folder*` result."""
  n = sum(len(im['detections']) for im in result['images'])
  lines = [f'{len(result["images"])} pictures and detections.json '
           f'({n} detections) in {out_dir}']
  if result['skipped']:
    lines.append(f'skipped {len(result["skipped"])} unreadable file(s): ' +
                 ', '.join(s['file_name'] for s in result['skipped']))
  return lines
