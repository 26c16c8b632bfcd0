"""Images/s of the training input pipeline on real JPEG files, per stage.

  JAX_PLATFORMS=cpu python benchmarks/input_pipeline.py \
      [--config configs/mimicdet_r50_fpn_1x.py] [--num_images 48] \
      [--batch 8] [--batches 4] [--workers 0,1,2] [--data_dir DIR] [--json OUT]

Writes `--num_images` JPEGs of COCO-like sizes (640x480, 480x640, 640x427,
427x640; quality 90; a smooth background with texture and 7 filled boxes,
so they compress like photographs, ~100-200 kB) and a COCO-format JSON with
7 boxes per image, then times, with the recipe's data settings (R50: shorter
side 800, longer <= 1333, canvas 896x1408):

  load       `CocoSource[i]`: read + JPEG decode + checks, ms per image
  transform  the loader's `pipeline.TrainTransform`: resize, flip (and
             normalise when `data.device_normalize` is False), ms per image
  collate    `transforms.collate`: every image into one zero canvas of the
             batch, ms per image
  loader     `pipeline.make_train_loader` at each `data.num_workers`: the
             real grain loader, images/s after its first batch
  to device  `jax.device_put` of one batch, ms and MB (on the CPU backend
             the put may alias host memory: only the MB mean anything)

on both image paths: float32 normalised on the host (`--config.data.
device_normalize=False`, as before) and uint8 batches normalised inside the
jitted step (the default). Run it on an idle machine: it measures CPU time.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections
from configs import common
from mimicdet_jax.data import coco
from mimicdet_jax.data import pipeline
from mimicdet_jax.data import transforms
# pylint: enable=g-import-not-at-top,wrong-import-position

SIZES = ((480, 640), (640, 480), (427, 640), (640, 427))  # (h, w), COCO-like
BOXES_PER_IMAGE = 7


def _image(rng: np.random.Generator, h: int, w: int):
  """A photograph-like RGB image and its 7 boxes (x1, y1, w, h)."""
  coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC),
                    np.float32)
  base += rng.normal(0, 10, base.shape)  # texture: JPEG sizes like photos
  boxes = []
  for _ in range(BOXES_PER_IMAGE):
    bw, bh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.5) * h
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    base[int(y):int(y + bh), int(x):int(x + bw)] += rng.uniform(-80, 80, 3)
    boxes.append([round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)])
  return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), boxes


def write_dataset(out_dir: str, num_images: int, seed: int = 0) -> str:
  """JPEGs under out_dir/images and out_dir/annotations.json; returns the JSON."""
  ann_file = os.path.join(out_dir, 'annotations.json')
  if os.path.exists(ann_file):
    with open(ann_file) as f:
      if len(json.load(f)['images']) == num_images:
        return ann_file
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  rng = np.random.default_rng(seed)
  images, annotations = [], []
  for i in range(num_images):
    h, w = SIZES[i % len(SIZES)]
    pil, boxes = _image(rng, h, w)
    name = f'{i:06d}.jpg'
    pil.save(os.path.join(out_dir, 'images', name), quality=90)
    images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    for box in boxes:
      annotations.append(dict(id=len(annotations) + 1, image_id=i + 1,
                              category_id=1 + len(annotations) % 3, bbox=box,
                              area=box[2] * box[3], iscrowd=0))
  with open(ann_file, 'w') as f:
    json.dump(dict(images=images, annotations=annotations,
                   categories=[dict(id=k, name=f'c{k}') for k in (1, 2, 3)]),
              f)
  return ann_file


def _config(path: str, overrides) -> ml_collections.ConfigDict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if path else common.base_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _ms_per_call(fn, items) -> float:
  t0 = time.perf_counter()
  for item in items:
    fn(item)
  return 1e3 * (time.perf_counter() - t0) / len(items)


def measure(config, source, *, batch: int, batches: int, workers) -> dict:
  """One image path (config.data.device_normalize) through every stage."""
  data = config.data
  n = min(len(source), 16)
  row = {'device_normalize': bool(data.device_normalize)}
  row['load_ms'] = _ms_per_call(lambda i: source[i], range(n))
  raw = [source[i] for i in range(n)]
  # The resize alone (Pillow bilinear to the recipe's size), the part of the
  # transform that does not depend on the output dtype.
  def resize(ex):
    h, w = ex['image'].shape[:2]
    nh, nw, _ = transforms.resized_size(h, w, int(data.train_min_sizes[0]),
                                        int(data.max_size))
    return np.asarray(Image.fromarray(ex['image']).resize((nw, nh),
                                                          Image.BILINEAR))
  row['resize_ms'] = _ms_per_call(resize, raw)
  rng = np.random.default_rng(0)
  train_transform = pipeline.TrainTransform(data)  # what the loader runs
  row['transform_ms'] = _ms_per_call(
      lambda ex: train_transform.random_map(ex, rng), raw)
  examples = [train_transform.random_map(ex, rng) for ex in raw]
  groups = [examples[i:i + batch] for i in range(0, n - batch + 1, batch)]
  row['collate_ms'] = _ms_per_call(
      lambda g: transforms.collate(g, data.canvas_buckets), groups) / batch
  for w in workers:
    config.data.num_workers = w
    config.train.batch_size = batch
    loader = pipeline.make_train_loader(config, source, num_local_devices=1,
                                        process_index=0, process_count=1)
    it = iter(loader)
    first = next(it)  # worker start-up and the first reads
    t0 = time.perf_counter()
    for _ in range(batches):
      first = next(it)
    elapsed = time.perf_counter() - t0
    row[f'loader_{w}_workers_images_per_s'] = batch * batches / elapsed
    del it, loader
  image = first['image']
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(jax.device_put(first))
  # On the CPU backend device_put may alias host memory: not a transfer.
  row['to_device_ms'] = 1e3 * (time.perf_counter() - t0) / 3
  row['device'] = jax.devices()[0].platform
  row['batch_image_mb'] = image.nbytes / 2**20
  row['batch_image_dtype'] = str(image.dtype)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/mimicdet_r50_fpn_1x.py')
  parser.add_argument('--num_images', type=int, default=48)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--batches', type=int, default=4)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--paths', default='host_float32,device_uint8',
                      help='image paths to time: host_float32 (normalised '
                      'on the host), device_uint8 (normalised in the step)')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(),
                                           'mimicdet_input_bench')
  ann = write_dataset(data_dir, args.num_images)
  source = coco.CocoSource(ann, os.path.join(data_dir, 'images'))
  sizes = [os.path.getsize(source.image_path(i)) for i in range(len(source))]
  workers = [int(w) for w in args.workers.split(',')]
  print(f'{len(source)} JPEGs, mean {np.mean(sizes) / 1e3:.0f} kB; '
        f'{os.cpu_count()} CPUs; jax {jax.__version__} '
        f'({jax.devices()[0].platform})', flush=True)
  rows = []
  for path in args.paths.split(','):
    config = _config(args.config, {
        'data.device_normalize': path == 'device_uint8'})
    row = measure(config, source, batch=args.batch, batches=args.batches,
                  workers=workers)
    row['path'] = path
    rows.append(row)
    print(json.dumps(row, indent=None, default=float), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(config=args.config, num_images=len(source),
                     mean_jpeg_kb=float(np.mean(sizes) / 1e3), rows=rows), f,
                indent=1, default=float)


if __name__ == '__main__':
  main()
