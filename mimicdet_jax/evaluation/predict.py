r"""Runs a checkpoint on a folder of images; writes pictures and a JSON.

  python -m mimicdet_jax.evaluation.predict --workdir DIR --images FOLDER --out OUT \
      [--config configs/demo.py] [--checkpoint latest|STEP|PATH] \
      [--config.eval.viz_score_threshold=0.5]

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

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from mimicdet_jax import config_lib
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
  if not os.path.isdir(image_dir):
    raise errors.MissingFileError(f'{image_dir}: image folder not found')
  paths = list_images(image_dir)
  if not paths:
    raise errors.MissingFileError(
        f'{image_dir}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
  class_names = list(class_names or [])
  os.makedirs(out_dir, exist_ok=True)
  predict_fn = postprocess.make_predict_fn(model, config)
  skipped = []
  try:
    dets = inference.run_inference(
        predict_fn, variables,
        _batches(paths, config.data, int(config.eval.batch_size), skipped))
  except ValueError:
    if len(skipped) == len(paths):
      from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
      raise validation.BadInputError(
          f'{image_dir}: none of the {len(paths)} image files could be read '
          f'(first: {skipped[0][0]}: {skipped[0][1]})') from None
    raise
  boxes = coco_eval.to_original_pixels(dets['boxes'], dets['image_size'],
                                       dets['orig_size'])
  images = []
  for i, image_id in enumerate(dets['image_id']):
    path = paths[int(image_id)]
    valid = dets['valid'][i]
    b, s, c = boxes[i][valid], dets['scores'][i][valid], dets['classes'][i][valid]
    with Image.open(path) as img:
      rgb = np.asarray(img.convert('RGB'))
    picture = viz.draw_detections(rgb, b, s, c, class_names,
                                  config.eval.viz_score_threshold)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = restore.load_config(_WORKDIR.value, _CONFIG.value)
  variables, step = restore.restore_variables(_WORKDIR.value,
                                              _CHECKPOINT.value)
  categories, _ = restore.training_categories(config, _WORKDIR.value)
  names = [c['name'] for c in categories or []]
  if len(names) != config.model.num_classes:
    names = restore.class_names_from_annotations(config.data, 'val')
    if names is None or len(names) != config.model.num_classes:
      names = None
  result = predict_folder(config, variables, _IMAGES.value, _OUT.value,
                          names, step)
  n = sum(len(im['detections']) for im in result['images'])
  logging.info('%d images, %d detections', len(result['images']), n)
  print(f'{len(result["images"])} pictures and detections.json '
        f'({n} detections) in {_OUT.value}')
  if result['skipped']:
    print(f'skipped {len(result["skipped"])} unreadable file(s): ' +
          ', '.join(s['file_name'] for s in result['skipped']))


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Recipe config (default: WORKDIR/config.json).',
      lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Training WORKDIR.',
                                 required=True)
  _IMAGES = flags.DEFINE_string('images', None, 'Folder of images.',
                                required=True)
  _OUT = flags.DEFINE_string('out', None, 'Output folder.', required=True)
  _CHECKPOINT = flags.DEFINE_string(
      'checkpoint', 'latest', "'latest', a step number or a checkpoint path.")
  config_lib.run_absl(main)
