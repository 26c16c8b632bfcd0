"""Running a predict function over batches: data-parallel over this host's
devices, and gathering every host's detections on all of them.

Used by the evaluation loop (evaluate_lib.evaluate) and by predict. `run_inference`
returns host NumPy arrays; `gather_across_hosts` concatenates them over the
processes of a multi-host run (a no-op for one process).
"""
from typing import Callable, Iterable, Mapping, Optional

import jax
import numpy as np


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
