"""Writes a generated data set as COCO: images plus OUT/annotations/<split>.json.

Shared by the synthetic shapes (data/synthetic.py) and the real-image proxy
(data/photos.py): each supplies `render(seed, split, index, min_size,
max_size) -> {'image', 'boxes', 'category_ids', 'areas'}`, a module-level
function so that 'spawn' workers can import it.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

Render = Callable[[int, str, int, int, int], Mapping[str, Any]]


def _write_image(render: Render, jpeg_options: Mapping[str, Any],
                 args: tuple[str, str, int, int, int, int, str]
                 ) -> dict[str, Any]:
  """Renders and saves one image; returns its size and annotations (worker fn)."""
  image_dir, split, index, seed, min_size, max_size, image_format = args
  ex = render(seed, split, index, min_size, max_size)
  file_name = f'{index:06d}.{image_format}'
  pil = Image.fromarray(ex['image'])
  if image_format == 'jpg':
    pil.save(os.path.join(image_dir, file_name), **jpeg_options)
  else:
    pil.save(os.path.join(image_dir, file_name))
  h, w = ex['image'].shape[:2]
  return {'file_name': file_name, 'height': h, 'width': w,
          'boxes': ex['boxes'].tolist(), 'category_ids': ex['category_ids'].tolist(),
          'areas': ex['areas'].tolist()}


def write_split(out_dir: str, split: str, num_images: int, seed: int, *,
                render: Render, categories: Sequence[Mapping[str, Any]],
                description: str, min_size: int, max_size: int,
                image_format: str = 'jpg',
                jpeg_options: Mapping[str, Any] | None = None,
                workers: int = 1) -> str:
  """Writes OUT/<split>/ images and OUT/annotations/<split>.json; returns the JSON path.

  Image ids are 1..num_images, annotation ids 1..; file names 000000.jpg, ...
  The output does not depend on `workers` (each image has its own rng).
  """
  if image_format not in ('jpg', 'png'):
    raise ValueError(f'image_format must be jpg or png, got {image_format!r}')
  image_dir = os.path.join(out_dir, split)
  ann_dir = os.path.join(out_dir, 'annotations')
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(ann_dir, exist_ok=True)
  jobs = [(image_dir, split, i, seed, min_size, max_size, image_format)
          for i in range(num_images)]
  write = functools.partial(_write_image, render, dict(jpeg_options or {}))
  if workers > 1 and num_images > 1:
    # 'spawn': a fork of a process that has imported JAX (a test, a
    # notebook) can deadlock on JAX's threads; the workers need only NumPy
    # and Pillow.
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      results = list(pool.map(write, jobs, chunksize=16))
  else:
    results = [write(job) for job in jobs]
  images, annotations = [], []
  for index, res in enumerate(results):
    image_id = index + 1
    images.append({'id': image_id, 'file_name': res['file_name'],
                   'height': res['height'], 'width': res['width']})
    for box, cat, area in zip(res['boxes'], res['category_ids'], res['areas']):
      x1, y1, x2, y2 = (int(v) for v in box)
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id, 'category_id': cat,
          'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': area, 'iscrowd': 0})
  dataset = {
      'info': {'description': description, 'seed': seed,
               'split': split, 'min_size': min_size, 'max_size': max_size},
      'licenses': [],
      'images': images,
      'annotations': annotations,
      'categories': [dict(c) for c in categories],
  }
  path = os.path.join(ann_dir, f'{split}.json')
  with open(path, 'w') as f:
    json.dump(dataset, f)
  return path
