"""Writes a generated data set as COCO: images plus OUT/annotations/<split>.json.

Shared by the synthetic shapes (data/synthetic.py), the real-image proxy
(data/photos.py) and the two further real-image sets (data/glyphs.py,
data/crowds.py): each supplies `render(seed, split, index, min_size,
max_size) -> {'image', 'boxes', 'category_ids', 'areas'}`, a module-level
function so that 'spawn' workers can import it, and binds its
`write_split` and command line (`main`) from one `GeneratedSet`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import time
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from mimicdet_jax import errors

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


def write_viz(out_dir: str, split: str, count: int) -> list[str]:
  """Draws the first `count` images of a written split with their gt boxes."""
  from mimicdet_jax import viz  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
  source = coco.CocoSource(os.path.join(out_dir, 'annotations', f'{split}.json'),
                           os.path.join(out_dir, split))
  viz_dir = os.path.join(out_dir, 'viz')
  os.makedirs(viz_dir, exist_ok=True)
  paths = []
  for i in range(min(count, len(source))):
    ex = source[i]
    names = [source.class_names[c - 1] for c in ex['classes'].tolist()]
    path = os.path.join(viz_dir, f'{split}_{i:03d}.png')
    viz.draw_boxes(ex['image'], ex['boxes'], names).save(path)
    paths.append(path)
  return paths


@dataclasses.dataclass(frozen=True)
class GeneratedSet:
  """One generated set: what its module's `write_split` and `main` need.

  A set's module binds `write_split, main = SET.write_split, SET.main`.
  """
  module: str  # 'mimicdet_jax.data.photos': `python -m` runs it
  doc: str  # the module's docstring: its first line heads --help
  render: Render  # module-level, so that 'spawn' workers can import it
  categories: Sequence[Mapping[str, Any]]
  description: str  # the JSON's info.description
  min_size: int  # the default image sides (px), drawn in [min_size, max_size]
  max_size: int
  smallest: int  # the least image side the renderer can draw
  jpeg_options: Mapping[str, Any] = dataclasses.field(
      default_factory=lambda: {'quality': 90})  # Pillow's JPEG save options
  num_train: int = 1500  # the command line's default split sizes
  num_val: int = 300

  def write_split(self, out_dir: str, split: str, num_images: int, seed: int,
                  min_size: int | None = None, max_size: int | None = None,
                  image_format: str = 'jpg', workers: int = 1) -> str:
    """`write_split` with this set's renderer, classes and JPEG options."""
    return write_split(
        out_dir, split, num_images, seed, render=self.render,
        categories=self.categories, description=self.description,
        min_size=self.min_size if min_size is None else min_size,
        max_size=self.max_size if max_size is None else max_size,
        image_format=image_format, jpeg_options=self.jpeg_options,
        workers=workers)

  def main(self, argv: Sequence[str] | None = None) -> None:
    """The command line: both splits, then K viz pictures.

    A size pair it cannot draw raises errors.ConfigError (one line and exit
    status 1 under errors.cli, as the modules run it).
    """
    parser = argparse.ArgumentParser(prog=f'python -m {self.module}',
                                     description=self.doc.split('\n')[0])
    parser.add_argument('out', help='output folder')
    parser.add_argument('--num-train', type=int, default=self.num_train)
    parser.add_argument('--num-val', type=int, default=self.num_val)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--min-size', type=int, default=self.min_size,
                        help='smallest image side (px)')
    parser.add_argument('--max-size', type=int, default=self.max_size,
                        help='largest image side (px)')
    parser.add_argument('--format', choices=('jpg', 'png'), default='jpg')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help='processes drawing images (output does not depend on it)')
    parser.add_argument('--viz', type=int, default=0, metavar='K',
                        help='draw the first K training images with boxes to OUT/viz')
    args = parser.parse_args(argv)
    if not self.smallest <= args.min_size <= args.max_size:
      raise errors.ConfigError(
          f'--min-size {args.min_size} --max-size {args.max_size}: need '
          f'{self.smallest} <= --min-size <= --max-size')
    start = time.time()
    for split, num in (('train', args.num_train), ('val', args.num_val)):
      if num > 0:
        path = self.write_split(args.out, split, num, args.seed, args.min_size,
                                args.max_size, args.format, args.workers)
        print(f'wrote {num} images and {path}')
    if args.viz > 0:
      paths = write_viz(args.out, 'train' if args.num_train else 'val', args.viz)
      print(f'wrote {len(paths)} pictures with boxes to '
            f'{os.path.join(args.out, "viz")}')
    print(f'done in {time.time() - start:.1f} s')
