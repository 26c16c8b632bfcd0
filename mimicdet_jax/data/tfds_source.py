"""TFDS `coco/2017` (or another TFDS detection set) as a random-access source.

Optional: needs `pip install tensorflow tensorflow-datasets array_record` and
the data set prepared once in array_record format:

    tfds build coco/2017 --file_format=array_record [--data_dir DIR]

then `--config.data.source=tfds [--config.data.tfds_data_dir=DIR]`.
Nothing here imports TensorFlow until a `TfdsSource` is built.

Differences from TFDS' own layout, so every source gives the same raw dict:
boxes are denormalised from (ymin, xmin, ymax, xmax) in [0, 1] to x1y1x2y2
pixels; labels 0..K-1 become 1..K (0 = background); `label_to_category_id`
maps back to the official COCO category ids (1..90 with gaps) for result
files of coco/*, and to label itself for other data sets.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mimicdet_jax.data import validation

logger = logging.getLogger(__name__)

# The 80 COCO 2017 category ids in increasing order; TFDS label i is the
# (i+1)-th of them (TFDS sorts the annotation file's categories by id).
COCO_2017_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
    23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
    65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
    89, 90)

INSTALL_HINT = (
    'data.source=tfds needs the optional TFDS extra: `pip install tensorflow '
    'tensorflow-datasets array_record`, and the data set prepared once with '
    '`tfds build {name} --file_format=array_record{dir_flag}`; or use '
    'data.source=coco_json with data.train_annotations/train_images (see '
    'docs/DATA.md)')


def example_from_tfds(record: dict[str, Any], policy: validation.BadInputPolicy,
                      source_name: str) -> dict[str, Any]:
  """One TFDS detection record -> raw example dict (docs/ARCHITECTURE.md).

  Args:
    record: {'image': uint8 [H, W, 3], 'image/id': int, 'objects': {'bbox':
      float32 [n, 4] normalised (ymin, xmin, ymax, xmax), 'label': int [n] in
      0..K-1, 'is_crowd': bool [n] (optional)}}.
    policy: bad-input policy; degenerate or outside boxes are reported to it.
    source_name: for messages (e.g. 'coco/2017:validation').
  """
  image = np.asarray(record['image'], np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=2)
  elif image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  h, w = image.shape[:2]
  image_id = int(record.get('image/id', -1))
  objects = record['objects']
  yxyx = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
  labels = np.asarray(objects['label'], np.int64).reshape(-1)
  crowd = np.asarray(objects.get('is_crowd', np.zeros(len(labels), bool)),
                     bool).reshape(-1)
  ann_ids = np.asarray(objects.get('id', np.arange(len(labels)))).reshape(-1)
  lengths = (len(yxyx), len(labels), len(crowd), len(ann_ids))
  if len(set(lengths)) > 1:
    # A corrupt record (TFDS' mock data makes such): keep the objects that
    # have every field.
    n = min(lengths)
    policy.report(validation.MALFORMED_BOX,
                  f'{source_name}: image {image_id}: objects have '
                  f'{lengths[0]} boxes, {lengths[1]} labels, {lengths[2]} '
                  f'crowd flags and {lengths[3]} ids; keeping the first {n}')
    yxyx, labels, crowd, ann_ids = yxyx[:n], labels[:n], crowd[:n], ann_ids[:n]
  boxes = np.stack([yxyx[:, 1] * w, yxyx[:, 0] * h, yxyx[:, 3] * w,
                    yxyx[:, 2] * h], axis=1)
  raw = boxes.copy()
  boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
  keep = np.ones(len(boxes), bool)
  for i in range(len(boxes)):
    where = f'{source_name}: image {image_id}, object {int(ann_ids[i])}'
    if raw[i, 2] <= raw[i, 0] or raw[i, 3] <= raw[i, 1]:
      policy.report(validation.NON_POSITIVE_BOX,
                    f'{where}: box with non-positive size {raw[i].tolist()}')
      keep[i] = False
    elif boxes[i, 2] <= boxes[i, 0] or boxes[i, 3] <= boxes[i, 1]:
      policy.report(validation.BOX_OUTSIDE_IMAGE,
                    f'{where}: box outside the image {raw[i].tolist()} '
                    f'(image width {w}, height {h})')
      keep[i] = False
  return {
      'image': image,
      'boxes': boxes[keep].astype(np.float32),
      'classes': (labels[keep] + 1).astype(np.int32),
      'is_crowd': crowd[keep],
      'image_id': np.int64(image_id),
      'orig_size': np.array([h, w], np.int32),
  }


class TfdsSource:
  """Raw example dicts from `tfds.data_source(name, split)` (array_record).

  Same interface as `CocoSource`: len, [i], categories, num_classes,
  class_names, label_to_category_id, category_id_to_label, image_ids.
  The TFDS handle is opened lazily and not pickled (grain workers reopen it).
  """

  def __init__(self, name: str = 'coco/2017', split: str = 'train',
               data_dir: str | None = None, bad_input: str = 'skip'):
    self.name, self.split, self.data_dir = name, split, data_dir or None
    self.bad_input = bad_input
    self._policy = validation.BadInputPolicy(bad_input, f'{name}:{split}')
    self._ds = None
    ds = self._open()
    names = list(ds.dataset_info.features['objects']['label'].names)
    if name.split('/')[0] == 'coco' and len(names) == len(COCO_2017_CATEGORY_IDS):
      ids = list(COCO_2017_CATEGORY_IDS)
    else:
      ids = list(range(1, len(names) + 1))
    self.categories = [{'id': i, 'name': n} for i, n in zip(ids, names)]
    self.num_classes = len(names)
    self.class_names = names
    self.label_to_category_id = {k + 1: i for k, i in enumerate(ids)}
    self.category_id_to_label = {i: k + 1 for k, i in enumerate(ids)}
    self._image_ids = None

  def _open(self):
    if self._ds is None:
      dir_flag = f' --data_dir={self.data_dir}' if self.data_dir else ''
      hint = INSTALL_HINT.format(name=self.name, dir_flag=dir_flag)
      try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f'cannot import tensorflow_datasets ({e}). {hint}') from e
      try:
        self._ds = tfds.data_source(self.name, split=self.split,
                                    data_dir=self.data_dir)
      except Exception as e:  # pylint: disable=broad-except
        # TFDS raises assorted errors (missing TF, not prepared, wrong format).
        raise RuntimeError(
            f'cannot open TFDS {self.name!r} split {self.split!r} '
            f'(data_dir={self.data_dir or "TFDS default"}): '
            f'{type(e).__name__}: {e}. {hint}') from e
    return self._ds

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_ds'] = None
    return state

  def __len__(self) -> int:
    return len(self._open())

  def __repr__(self) -> str:
    return (f'TfdsSource(name={self.name!r}, split={self.split!r}, '
            f'data_dir={self.data_dir!r}, bad_input={self.bad_input!r})')

  @property
  def bad_input_counts(self) -> dict[str, int]:
    return dict(self._policy.counts)

  @property
  def image_ids(self) -> np.ndarray:
    """All image ids in index order (reads every record once; cached)."""
    if self._image_ids is None:
      ds = self._open()
      self._image_ids = np.array([int(ds[i]['image/id']) for i in range(len(ds))],
                                 np.int64)
    return self._image_ids

  def __getitem__(self, index: int) -> dict[str, Any]:
    return example_from_tfds(self._open()[int(index)], self._policy,
                             f'{self.name}:{self.split}')
