"""Checks of annotation files and images, and the bad-input policy.

`data.bad_input` decides what happens to a bad input:
- 'skip' (default): drop the bad box, annotation or image, count it, and log
  the first message of each kind plus a summary; training never stops for it.
- 'fail': raise `BadInputError` with the same message.

A message always names the file and the image / annotation id, e.g.
  "ann.json: annotation 17 (image 4): box with non-positive size w=0 h=12".

Some inputs cannot be skipped because nothing would be left: an annotation
file that cannot be read, has no images or no categories. They raise under
both policies.

Annotation-level checks run once, when a source is built (`check_coco_dataset`),
so a bad box never surfaces mid-epoch. Images are only read when an example is
loaded; `CocoSource.__getitem__` applies the policy there (skip: the next
readable image is returned instead).
"""
from __future__ import annotations

import collections
import logging
import math
from typing import Any

import numpy as np

from mimicdet_jax import errors

# data.bad_input: count and skip a bad example | stop (`BadInputPolicy`).
POLICIES = ('skip', 'fail')

# Kinds of bad input, used as counter keys and in the summary.
MISSING_IMAGE = 'missing or unreadable image'
IMAGE_SIZE_MISMATCH = 'image size differs from the annotation file'
BAD_IMAGE_ENTRY = 'image entry without a file name or a positive size'
DUPLICATE_IMAGE_ID = 'duplicate image id'
NON_POSITIVE_BOX = 'box with non-positive size'
BOX_OUTSIDE_IMAGE = 'box outside the image'
MALFORMED_BOX = 'malformed box'
UNKNOWN_CATEGORY = 'unknown category id'
UNKNOWN_IMAGE = 'annotation of an unknown image id'

logger = logging.getLogger(__name__)


class BadInputError(errors.UserError, ValueError):
  """A bad annotation file, annotation or image (policy 'fail' or unskippable).

  A UserError: the command-line tools report it as one line, no traceback.
  """


class BadInputPolicy:
  """Applies `data.bad_input` and counts what was skipped.

  Picklable (grain worker processes get a copy; their counts stay local).
  """

  def __init__(self, policy: str, source_name: str):
    if policy not in POLICIES:
      raise ValueError(
          f'data.bad_input must be one of {POLICIES}, got {policy!r}')
    self.policy = policy
    self.source_name = source_name
    self.counts: collections.Counter[str] = collections.Counter()

  def report(self, kind: str, message: str) -> None:
    """Raises under 'fail'; counts (and logs the first of a kind) under 'skip'."""
    if self.policy == 'fail':
      raise BadInputError(
          f'{message} (data.bad_input=fail; set data.bad_input=skip to skip '
          'and count such inputs)')
    if not self.counts[kind]:
      logger.warning('%s; skipped (further cases of "%s" are only counted)',
                     message, kind)
    self.counts[kind] += 1

  def summary(self) -> str:
    """One line, e.g. 'train.json: skipped 2 x box outside the image'; '' if none."""
    if not self.counts:
      return ''
    parts = ', '.join(f'{n} x {kind}' for kind, n in sorted(self.counts.items()))
    return f'{self.source_name}: skipped {parts}'

  def log_summary(self) -> None:
    if self.counts:
      logger.warning('%s', self.summary())


def _positive_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def check_coco_dataset(
    dataset: Any, annotation_file: str, policy: BadInputPolicy
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Validates a COCO-format dict and returns clean images with their boxes.

  Args:
    dataset: the parsed JSON (pycocotools `COCO.dataset`).
    annotation_file: its path, for messages.
    policy: the bad-input policy; receives every problem found.

  Returns:
    (images, categories). `images`: one dict per kept image, in file order,
    with keys id, file_name, height, width, and `annotations`: a list of
    (annotation id, category id, [x1, y1, x2, y2] clipped to the image in
    pixels, is_crowd). `categories`: [{'id', 'name'}] sorted by id.

  Raises:
    BadInputError: unskippable problems (no images, no categories), or any
      problem under policy 'fail'.
  """
  name = annotation_file
  if not isinstance(dataset, dict) or not dataset.get('images'):
    raise BadInputError(
        f'{name}: the annotation file has no images (expected a COCO-format '
        'JSON object with a non-empty "images" list)')
  categories = check_categories(dataset, name)
  category_ids = {c['id'] for c in categories}

  images: dict[Any, dict[str, Any]] = {}
  for img in dataset['images']:
    image_id = img.get('id') if isinstance(img, dict) else None
    if not isinstance(img, dict) or not isinstance(image_id, int) or not img.get(
        'file_name') or not _positive_number(img.get('width')) or not _positive_number(
            img.get('height')):
      policy.report(BAD_IMAGE_ENTRY,
                    f'{name}: image {image_id}: entry needs an integer id, a '
                    f'file_name and positive width/height, got {img!r}')
      continue
    if image_id in images:
      policy.report(DUPLICATE_IMAGE_ID,
                    f'{name}: image {image_id}: the id appears more than once')
      continue
    images[image_id] = {
        'id': image_id, 'file_name': str(img['file_name']),
        'height': int(img['height']), 'width': int(img['width']),
        'annotations': []}

  for ann in dataset.get('annotations') or []:
    ann_id = ann.get('id') if isinstance(ann, dict) else None
    image_id = ann.get('image_id') if isinstance(ann, dict) else None
    where = f'{name}: annotation {ann_id} (image {image_id})'
    if image_id not in images:
      policy.report(UNKNOWN_IMAGE, f'{where}: image id not in "images"')
      continue
    if ann.get('category_id') not in category_ids:
      policy.report(UNKNOWN_CATEGORY,
                    f'{where}: unknown category id {ann.get("category_id")!r} '
                    f'(known: {sorted(category_ids)})')
      continue
    bbox = ann.get('bbox')
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
      policy.report(MALFORMED_BOX,
                    f'{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}')
      continue
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
      policy.report(NON_POSITIVE_BOX,
                    f'{where}: box with non-positive size w={w:g} h={h:g}')
      continue
    img = images[image_id]
    # Overshoots (common by a fraction of a pixel in COCO) are clipped; a box
    # with nothing left inside the image is rejected.
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(img['width'])), min(y + h, float(img['height']))
    if x2 <= x1 or y2 <= y1:
      policy.report(BOX_OUTSIDE_IMAGE,
                    f'{where}: box outside the image: [x, y, w, h]={bbox} for '
                    f'an image of width {img["width"]} and height {img["height"]}')
      continue
    img['annotations'].append(
        (ann_id, int(ann['category_id']), [x1, y1, x2, y2],
         bool(ann.get('iscrowd', 0))))

  if not images:
    raise BadInputError(f'{name}: no valid images left after validation')
  return list(images.values()), categories


def check_categories(dataset: Any, name: str) -> list[dict[str, Any]]:
  """The categories of a parsed COCO-format dict: [{'id', 'name'}] sorted by id.

  Raises:
    BadInputError: naming `name`, when there are none, one is malformed or
      an id repeats.
  """
  raw_categories = (dataset.get('categories') if isinstance(dataset, dict)
                    else None) or []
  categories = []
  for cat in raw_categories:
    if not isinstance(cat, dict) or not isinstance(cat.get('id'), int):
      raise BadInputError(f'{name}: malformed category entry {cat!r}')
    categories.append({'id': int(cat['id']), 'name': str(cat.get('name', cat['id']))})
  if not categories:
    raise BadInputError(f'{name}: the annotation file has no categories')
  categories.sort(key=lambda c: c['id'])
  if len({c['id'] for c in categories}) != len(categories):
    raise BadInputError(f'{name}: duplicate category ids')
  return categories


def check_same_categories(expected: list[dict[str, Any]], expected_name: str,
                          got: list[dict[str, Any]], got_name: str) -> None:
  """Raises unless both category lists hold the same (id, name) pairs.

  Labels 1..K follow increasing category id in each file, so a model
  trained on one file scores on another only when ids and names agree;
  equal counts are not enough.
  """
  a = sorted((int(c['id']), str(c['name'])) for c in expected)
  b = sorted((int(c['id']), str(c['name'])) for c in got)
  if a == b:
    return
  only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  raise BadInputError(
      f'{got_name} and {expected_name} list different categories (labels are '
      f'mapped by category id, so ids and names must agree): only in '
      f'{expected_name}: {_pairs(only_a)}; only in {got_name}: {_pairs(only_b)}')


def _pairs(pairs, limit: int = 5) -> str:
  text = ', '.join(f'{i}={n!r}' for i, n in pairs[:limit])
  more = f' and {len(pairs) - limit} more' if len(pairs) > limit else ''
  return (text + more) or 'none'


def check_image(image: np.ndarray, expected_hw: tuple[int, int], path: str,
                image_id: int) -> str | None:
  """Returns a message if the decoded image disagrees with the annotation file."""
  if image.shape[:2] != tuple(expected_hw):
    return (f'{path}: image {image_id}: image size differs from the annotation '
            f'file: file has (h, w)={image.shape[:2]}, annotations say {tuple(expected_hw)}')
  return None
