"""COCO-format annotation file + image folder as a random-access source.

Any COCO-format data set works: the categories of the file (any ids, any
count) are mapped to contiguous labels 1..K in increasing category-id order
(0 is background), and back with `label_to_category_id` for result files.

The source holds only flat NumPy arrays and strings (no open files, no
pycocotools object), so grain can pickle it into worker processes cheaply.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from mimicdet_jax.data import validation

logger = logging.getLogger(__name__)


def load_image(path: str) -> np.ndarray:
  """Reads an image file as RGB uint8 [H, W, 3] (grey / CMYK / RGBA converted)."""
  with Image.open(path) as img:
    return np.asarray(img.convert('RGB'), dtype=np.uint8)


def read_annotation_file(annotation_file: str) -> Any:
  """Parses the JSON, with an error that names the file."""
  try:
    with open(annotation_file, 'r') as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise validation.BadInputError(
        f'{annotation_file}: annotation file not found (set '
        'data.train_annotations / data.val_annotations)') from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise validation.BadInputError(
        f'{annotation_file}: cannot read the annotation file as JSON: {e}') from e


def read_categories(annotation_file: str) -> list[dict[str, Any]]:
  """[{'id', 'name'}] sorted by id, of a COCO-format annotation file."""
  return validation.check_categories(read_annotation_file(annotation_file),
                                     annotation_file)


class CocoSource:
  """Raw example dicts (docs/ARCHITECTURE.md) from a COCO-format JSON + images.

  `source[i]` -> {'image': uint8 [H, W, 3], 'boxes': float32 [n, 4] x1y1x2y2
  in original pixels (clipped to the image), 'classes': int32 [n] in 1..K,
  'is_crowd': bool [n], 'image_id': int64 [], 'orig_size': int32 [2] (h, w)}.

  Annotations are validated once here (see validation.py). Images are read
  on access; a missing or unreadable one is reported by the policy, and under
  'skip' the next readable image (in index order, wrapping) is returned.
  Images without annotations are kept (they give negatives).
  """

  def __init__(self, annotation_file: str, image_dir: str,
               bad_input: str = 'skip'):
    self.annotation_file = str(annotation_file)
    self.image_dir = str(image_dir)
    self.bad_input = bad_input
    self._policy = validation.BadInputPolicy(
        bad_input, os.path.basename(self.annotation_file))
    dataset = read_annotation_file(self.annotation_file)
    images, categories = validation.check_coco_dataset(
        dataset, self.annotation_file, self._policy)
    self._policy.log_summary()
    del dataset

    self.categories: list[dict[str, Any]] = categories
    self.num_classes = len(categories)
    self.class_names = [c['name'] for c in categories]
    # label l in 1..K <-> categories[l - 1]['id'].
    self.label_to_category_id = {i + 1: c['id'] for i, c in enumerate(categories)}
    self.category_id_to_label = {c['id']: i + 1 for i, c in enumerate(categories)}

    self.image_ids = np.array([img['id'] for img in images], np.int64)
    self.file_names = [img['file_name'] for img in images]
    self._sizes = np.array([(img['height'], img['width']) for img in images],
                           np.int32)
    counts = [len(img['annotations']) for img in images]
    self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    anns = [a for img in images for a in img['annotations']]
    self._boxes = np.array([a[2] for a in anns], np.float32).reshape(-1, 4)
    self._classes = np.array(
        [self.category_id_to_label[a[1]] for a in anns], np.int32)
    self._is_crowd = np.array([a[3] for a in anns], bool)
    self._image_index = {int(i): k for k, i in enumerate(self.image_ids)}

  def __len__(self) -> int:
    return len(self.image_ids)

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring a checkpoint.
    return (f'CocoSource(annotation_file={self.annotation_file!r}, '
            f'image_dir={self.image_dir!r}, bad_input={self.bad_input!r})')

  @property
  def bad_input_counts(self) -> dict[str, int]:
    """What this process skipped so far (annotation checks + image reads)."""
    return dict(self._policy.counts)

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_dir, self.file_names[index])

  def index_of_image_id(self, image_id: int) -> int:
    return self._image_index[int(image_id)]

  def annotations(self, index: int) -> dict[str, np.ndarray]:
    """Boxes / classes / is_crowd of image `index` without reading pixels."""
    lo, hi = self._offsets[index], self._offsets[index + 1]
    return {'boxes': self._boxes[lo:hi].copy(),
            'classes': self._classes[lo:hi].copy(),
            'is_crowd': self._is_crowd[lo:hi].copy()}

  def _load(self, index: int) -> dict[str, Any] | None:
    path = self.image_path(index)
    image_id = int(self.image_ids[index])
    try:
      image = load_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      self._policy.report(
          validation.MISSING_IMAGE,
          f'{path}: image {image_id} from {self.annotation_file}: missing or '
          f'unreadable image ({type(e).__name__}: {e})')
      return None
    problem = validation.check_image(image, tuple(self._sizes[index]), path,
                                     image_id)
    if problem is not None:
      self._policy.report(validation.IMAGE_SIZE_MISMATCH, problem)
      return None
    example = self.annotations(index)
    example.update(image=image, image_id=np.int64(image_id),
                   orig_size=self._sizes[index].copy())
    return example

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} images')
    for k in range(len(self)):
      example = self._load((index + k) % len(self))
      if example is not None:
        return example
    raise validation.BadInputError(
        f'{self.annotation_file}: none of the {len(self)} images in '
        f'{self.image_dir} could be read')

  def coco_api(self):
    """A pycocotools COCO of the annotation file (for COCOeval); built on call."""
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    with contextlib.redirect_stdout(io.StringIO()):
      return COCO(self.annotation_file)
