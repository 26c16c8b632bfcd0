"""grain input pipelines: sharded, shuffled, checkpointable training batches and
padded evaluation batches.

Training (`make_train_loader`) returns a `grain.DataLoader`. `iter(loader)`
yields dicts of NumPy arrays with a leading [num_local_devices,
per_device_batch] and has `get_state()` / `set_state(state)` (JSON bytes): a
restored iterator continues with the exact next batch. To save it with the
model in one orbax checkpoint:

    import grain.python as grain
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.PyGrainCheckpointSave(train_iter)))
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.PyGrainCheckpointRestore(train_iter)))

Sharding: each host reads a contiguous 1/process_count of the records
(grain `ShardOptions`), reshuffled every epoch with `config.seed`; over the
hosts every record appears once per epoch. Per-example randomness (scale,
flip) comes from grain's per-record rng, so it is reproducible too.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

import grain.python as grain
import numpy as np

from mimicdet_jax.data import transforms
from mimicdet_jax.errors import ConfigError


# data.source: a COCO JSON + image folder | a TFDS data set (`build_source`).
SOURCES = ('coco_json', 'tfds')


def build_source(data, split: str):
  """The raw-example source of `split` ('train' | 'val') named by data.source."""
  if split not in ('train', 'val'):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if data.source == 'coco_json':
    from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
    ann = data.train_annotations if split == 'train' else data.val_annotations
    images = data.train_images if split == 'train' else data.val_images
    if not ann or not images:
      key = 'train' if split == 'train' else 'val'
      raise ConfigError(
          f'data.{key}_annotations and data.{key}_images must be set for '
          f'data.source=coco_json (got {ann!r}, {images!r})')
    return coco.CocoSource(ann, images, bad_input=data.bad_input)
  from mimicdet_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tfds_split = data.tfds_train_split if split == 'train' else data.tfds_val_split
  return tfds_source.TfdsSource(data.tfds_name, tfds_split,
                                data.tfds_data_dir or None,
                                bad_input=data.bad_input)


def check_val_categories(data, train_source) -> None:
  """Fails before training when data.val_annotations (if it exists) lists
  other categories (ids and names) than the training source: results would be
  written with the wrong category ids. A missing validation file is fine."""
  path = data.val_annotations
  if data.source != 'coco_json' or not path or not os.path.exists(path):
    return
  from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import validation  # pylint: disable=g-import-not-at-top
  validation.check_same_categories(
      train_source.categories, getattr(train_source, 'annotation_file', 'train'),
      coco.read_categories(path), path)


def per_device_batch_size(global_batch: int, process_count: int,
                          num_local_devices: int) -> int:
  """train.batch_size split over all devices of all hosts; must divide evenly."""
  devices = process_count * num_local_devices
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(
        f'train.batch_size={global_batch} must be a positive multiple of the '
        f'number of devices ({process_count} hosts x {num_local_devices} local '
        f'devices = {devices})')
  return global_batch // devices


class TrainTransform(grain.RandomMapTransform):
  """Raw example -> model example with random scale (or LSJ crop) and flip.

  With `data.device_normalize` the image stays uint8 (the step normalises).
  Images leave unpadded; the batch_fn (`transforms.collate`) pads them.
  """

  def __init__(self, data):
    self._data = data

  def random_map(self, element, rng: np.random.Generator):
    return transforms.transform_example(
        element, self._data, train=True, rng=rng,
        normalize=not self._data.device_normalize, pad=False)


class EvalTransform(grain.MapTransform):
  """Raw example -> model example at data.min_size, no flip."""

  def __init__(self, data):
    self._data = data

  def map(self, element):
    return transforms.transform_example(element, self._data, train=False)


class _CollateToDevices:
  """grain batch_fn: stack onto one canvas, reshape to [devices, per_device]."""

  def __init__(self, buckets, fixed_canvas, num_local_devices: int):
    self._buckets = tuple(tuple(b) for b in buckets)
    self._fixed_canvas = fixed_canvas
    self._num_local_devices = num_local_devices

  def __call__(self, examples):
    batch = transforms.collate(examples, self._buckets, self._fixed_canvas)
    d = self._num_local_devices
    return {k: v.reshape((d, v.shape[0] // d) + v.shape[1:])
            for k, v in batch.items()}


def _allow_grain_workers(num_workers: int) -> None:
  """grain's worker processes read absl flags; outside an absl app (tests,
  notebooks) mark them parsed so grain uses its defaults instead of failing."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if num_workers > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _host(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def make_train_loader(config, source, *, num_local_devices: int,
                      process_index: int | None = None,
                      process_count: int | None = None) -> grain.DataLoader:
  """Endless, shuffled, sharded training batches for this host.

  Args:
    config: the whole config (reads data.*, train.batch_size, seed).
    source: a random-access source of raw example dicts (CocoSource, ...).
    num_local_devices: devices this host feeds (jax.local_device_count()).
    process_index / process_count: this host and the number of hosts;
      default jax.process_index() / jax.process_count().

  Returns:
    A grain.DataLoader; its iterator yields {key: [num_local_devices,
    per_device_batch, ...]} (keys of the model example) and supports
    get_state()/set_state().
  """
  process_index, process_count = _host(process_index, process_count)
  data = config.data
  transforms.check_data_config(data)
  per_device = per_device_batch_size(config.train.batch_size, process_count,
                                     num_local_devices)
  shard = grain.ShardOptions(shard_index=process_index,
                             shard_count=process_count, drop_remainder=True)
  if len(source) < process_count:
    raise ValueError(f'{len(source)} training images cannot be split over '
                     f'{process_count} hosts')
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard,
                               shuffle=True, num_epochs=None,
                               seed=int(config.seed))
  fixed = (transforms.largest_canvas(data.canvas_buckets)
           if process_count > 1 else None)
  if data.augment == 'lsj':  # every example is cut to fit this one canvas
    fixed = (int(data.lsj_size), int(data.lsj_size))
  batch_fn = _CollateToDevices(data.canvas_buckets, fixed, num_local_devices)
  host_batch = per_device * num_local_devices
  _allow_grain_workers(int(data.num_workers))
  # grain's default read-ahead (16 threads, 500 records) would decode far
  # ahead of a small CPU job; read `data.prefetch` batches ahead instead.
  read_options = grain.ReadOptions(
      num_threads=max(1, min(host_batch, os.cpu_count() or 1)),
      prefetch_buffer_size=max(1, int(data.prefetch)) * host_batch)
  return grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard,
      operations=[TrainTransform(data),
                  grain.Batch(host_batch, drop_remainder=True,
                              batch_fn=batch_fn)],
      worker_count=int(data.num_workers),
      worker_buffer_size=max(1, int(data.prefetch)),
      read_options=read_options)


def _eval_indices(num_records: int, process_index: int, process_count: int,
                  batch_size: int) -> tuple[np.ndarray, int]:
  """This host's records (contiguous shard) and the batch count every host uses."""
  bounds = np.linspace(0, num_records, process_count + 1).round().astype(int)
  mine = np.arange(bounds[process_index], bounds[process_index + 1])
  largest_share = int(np.diff(bounds).max())
  return mine, max(1, math.ceil(largest_share / batch_size))


def make_eval_batches(config, source, batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, Any]]:
  """One pass over this host's share of `source`, as padded batches [B, ...].

  Every host yields the same number of batches (collectives stay in step);
  slots without an example repeat a real one and have example_valid False.
  The canvas is the smallest bucket holding the batch's images (the largest
  bucket with several hosts). Records are split into contiguous shards.
  """
  data = config.data
  transforms.check_data_config(data)
  indices, num_batches = _eval_indices(len(source), process_index,
                                       process_count, batch_size)
  fixed = (transforms.largest_canvas(data.canvas_buckets)
           if process_count > 1 else None)
  transform = EvalTransform(data)

  if data.num_workers > 0 and indices.size:
    _allow_grain_workers(int(data.num_workers))
    ds = (grain.MapDataset.source(source)[int(indices[0]):int(indices[-1]) + 1]
          .map(transform).to_iter_dataset()
          .mp_prefetch(grain.MultiprocessingOptions(
              num_workers=int(data.num_workers))))
    examples = iter(ds)
  else:
    examples = (transform.map(source[int(i)]) for i in indices)

  filler = None
  for _ in range(num_batches):
    chunk = []
    for ex in examples:
      chunk.append(ex)
      if len(chunk) == batch_size:
        break
    valid = np.zeros((batch_size,), bool)
    valid[:len(chunk)] = True
    if chunk:
      filler = chunk[0]
    elif filler is None:  # this host has no records at all
      filler = transform.map(source[0])
    chunk += [filler] * (batch_size - len(chunk))
    batch = transforms.collate(chunk, data.canvas_buckets, fixed)
    batch['example_valid'] = valid
    yield batch
