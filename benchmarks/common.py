"""Shared pieces of benchmarks/train_step.py and benchmarks/inference.py.

Config resolution at a benchmark size, synthetic in-memory batches with the
shapes of the data pipeline's model examples (docs/ARCHITECTURE.md, "Data"),
device facts (kind, peak FLOP/s, memory), XLA cost analysis, and a counter of
XLA compilations (to show that a step does not recompile).

Nothing here reads images from disk: the benchmarks measure the compiled
computation, not the input pipeline.
"""
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Mapping, Optional

import jax
from jax.extend import core as jex_core
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

COCO_NUM_CLASSES = 80

# Dense peak TFLOP/s per chip by (device-kind substring, compute dtype), from
# the vendors' data sheets (SXM parts). float32 on these GPUs runs matmuls and
# convolutions as TF32 under JAX's default precision, hence the TF32 peak.
PEAK_TFLOPS = (
    ('H200', 'bfloat16', 989.0), ('H200', 'float32', 494.0),
    ('H100', 'bfloat16', 989.0), ('H100', 'float32', 494.0),
    ('A100', 'bfloat16', 312.0), ('A100', 'float32', 156.0),
)

DTYPES = {'bf16': 'bfloat16', 'bfloat16': 'bfloat16',
          'f32': 'float32', 'float32': 'float32'}


def parse_size(size: str) -> tuple[int, int]:
  """'512x512' or '896x1408' -> (h, w)."""
  try:
    h, w = (int(v) for v in size.lower().split('x'))
  except ValueError as e:
    raise ValueError(f'--size {size!r}: expected HxW, e.g. 512x512') from e
  return h, w


def num_classes_of(config: ml_collections.ConfigDict,
                   override: int = -1) -> int:
  """Foreground classes for the benchmark model.

  `override` if > 0; else data.num_classes if the config sets it; else the
  categories of data.train_annotations when that file is present and small
  (the demo's synthetic set); else COCO's 80.
  """
  if override > 0:
    return override
  if config.data.num_classes > 0:
    return int(config.data.num_classes)
  path = config.data.train_annotations
  if path and os.path.isfile(path) and os.path.getsize(path) < 64 << 20:
    with open(path) as f:
      categories = json.load(f).get('categories', [])
    if categories:
      return len(categories)
  return COCO_NUM_CLASSES


def resolve_config(config: ml_collections.ConfigDict, *,
                   size: Optional[str] = None, dtype: Optional[str] = None,
                   num_classes: int = -1,
                   batch_size: Optional[int] = None
                   ) -> ml_collections.FrozenConfigDict:
  """A recipe config at the benchmark's canvas, dtype and batch, resolved.

  Args:
    config: a recipe config (with any --config.key=value overrides applied).
    size: 'HxW' canvas (divisible by data.size_divisor); None keeps the
      config's first canvas bucket.
    dtype: bf16 | f32 (model.dtype); None keeps the config's.
    num_classes: see `num_classes_of`.
    batch_size: global training batch (only the lr scaling reads it).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  # Pretrained backbone values do not change the cost of a step; the
  # recipes' weights/ folders need not exist where the benchmark runs.
  c.model.backbone_init = ''
  if size:
    h, w = parse_size(size)
    c.data.canvas_buckets = ((h, w),)
    c.data.train_min_sizes = (min(h, w),)
    c.data.min_size = min(h, w)
    c.data.max_size = max(h, w)
  if dtype:
    if dtype not in DTYPES:
      raise ValueError(f'--dtype {dtype!r}: expected one of {sorted(DTYPES)}')
    c.model.dtype = DTYPES[dtype]
  if batch_size:
    c.train.batch_size = int(batch_size)
  return config_lib.resolve(c, num_classes_of(c, num_classes))


def canvas_of(config) -> tuple[int, int]:
  h, w = config.data.canvas_buckets[0]
  return int(h), int(w)


def synthetic_examples(config, batch_shape: tuple[int, ...], *,
                       boxes_per_image: int = 5,
                       seed: int = 0) -> dict[str, np.ndarray]:
  """Random model examples shaped like the pipeline's, leading `batch_shape`.

  Images are N(0, 1) (already normalised), filling the whole canvas; each
  image has `boxes_per_image` real gt boxes (side 16 px .. half the canvas,
  inside the canvas, random classes 1..K), the rest of data.max_boxes padding.

  Returns:
    The example dict of docs/ARCHITECTURE.md with leaves [*batch_shape, ...].
  """
  rng = np.random.default_rng(seed)
  h, w = canvas_of(config)
  g = int(config.data.max_boxes)
  n = min(boxes_per_image, g)
  k = int(config.model.num_classes)
  side = np.exp(rng.uniform(np.log(16), np.log(min(h, w) / 2),
                            batch_shape + (g, 2)))
  x1 = rng.uniform(0, 1, batch_shape + (g,)) * (w - side[..., 0])
  y1 = rng.uniform(0, 1, batch_shape + (g,)) * (h - side[..., 1])
  boxes = np.stack([x1, y1, x1 + side[..., 0], y1 + side[..., 1]], -1)
  box_mask = np.zeros(batch_shape + (g,), bool)
  box_mask[..., :n] = True
  boxes = np.where(box_mask[..., None], boxes, 0.0).astype(np.float32)
  classes = np.where(box_mask, rng.integers(1, k + 1, batch_shape + (g,)), 0)
  count = int(np.prod(batch_shape))
  return dict(
      image=rng.standard_normal(batch_shape + (h, w, 3), np.float32),
      image_size=np.broadcast_to(np.array([h, w], np.int32),
                                 batch_shape + (2,)).copy(),
      boxes=boxes,
      classes=classes.astype(np.int32),
      box_mask=box_mask,
      is_crowd=np.zeros(batch_shape + (g,), bool),
      image_id=np.arange(count, dtype=np.int32).reshape(batch_shape),
      orig_size=np.broadcast_to(np.array([h, w], np.int32),
                                batch_shape + (2,)).copy(),
      scale=np.ones(batch_shape, np.float32))


# --------------------------------------------------------------- variables
INITS = ('auto', 'model', 'numpy')
HEAD_INIT_STD = 0.01  # as models/heads.py DENSE_INIT_STD


def init_variables(config, model, init: str = 'auto', seed: int = 0) -> dict:
  """Model variables {'params', 'frozen'} for a benchmark.

  init='model': state_lib.init_variables, the real initialisers.
  init='numpy': the same tree and shapes (jax.eval_shape, nothing compiled)
  filled by NumPy at the real initialisers' scales (He fan-out normal in the
  backbone, 1/fan_in in the pyramid, N(0, 0.01) in the heads), zero biases,
  unit norm scales, identity frozen BatchNorm. XLA's
  CPU compile of the jitted model.init (one threefry per parameter) takes
  minutes on a loaded 2-core machine and the values do not change the cost
  of a step, so 'auto' picks 'numpy' on CPU and 'model' elsewhere.
  """
  # Imported here: mimicdet_jax.training pulls in orbax/grain, which the numpy path
  # does not need.
  from mimicdet_jax.training import state as state_lib
  if init not in INITS:
    raise ValueError(f'init={init!r}; expected one of {INITS}')
  if init == 'auto':
    init = 'numpy' if jax.default_backend() == 'cpu' else 'model'
  init_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0x1a1f)
  if init == 'model':
    return state_lib.init_variables(config, model, init_rng)
  h, w = canvas_of(config)
  shapes = jax.eval_shape(
      lambda r: model.init(r, jax.numpy.zeros((1, h, w, 3)), train=False),
      init_rng)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    collection, name = path[0].key, path[-1].key
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if collection == 'frozen' or name == 'bias' or len(leaf.shape) < 2:
      return np.zeros(leaf.shape, leaf.dtype)
    # The real initialisers' scales: He fan-out in the backbone, Xavier-like
    # 1/fan_in in the pyramid, N(0, 0.01) in the heads. Scale matters: He
    # fan-in everywhere blew the R50 activations up to inf (identity frozen
    # BatchNorm), and NaN boxes make NMS exit early, understating its cost.
    top = path[1].key if len(path) > 1 else ''
    if top == 'backbone':
      std = np.sqrt(2.0 / (np.prod(leaf.shape[:-2]) * leaf.shape[-1]))
    elif top == 'fpn':
      std = np.sqrt(1.0 / np.prod(leaf.shape[:-1]))
    else:
      std = HEAD_INIT_STD
    return (rng.standard_normal(leaf.shape) * std).astype(leaf.dtype)

  return dict(jax.tree_util.tree_map_with_path(fill, dict(shapes)))


# ------------------------------------------------------------------ device
def device_summary() -> dict[str, Any]:
  d = jax.local_devices()[0]
  return dict(platform=d.platform, device_kind=d.device_kind,
              local_devices=jax.local_device_count(),
              host_cpus=os.cpu_count(), jax=jax.__version__,
              python=platform.python_version(),
              load_average=(list(os.getloadavg())
                            if hasattr(os, 'getloadavg') else None))


def default_peak_tflops(dtype: str) -> Optional[float]:
  """Per-device dense peak for the local device kind, None when unknown (CPU)."""
  kind = jax.local_devices()[0].device_kind
  for name, dt, tflops in PEAK_TFLOPS:
    if name in kind and dt == dtype:
      return tflops
  return None


def peak_memory() -> dict[str, Any]:
  """Peak memory: device allocator stats where JAX has them, else host RSS.

  On CPU `memory_stats()` is None; the process's max resident set size
  (getrusage, whole process: Python, JAX, all buffers) is reported instead.
  """
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return dict(kind='device peak_bytes_in_use (device 0)',
                bytes=int(stats['peak_bytes_in_use']),
                bytes_limit=int(stats.get('bytes_limit', 0)) or None)
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return dict(kind='host max RSS (no device memory stats; whole process)',
              bytes=int(rss_kib) * 1024, bytes_limit=None)


def cost_analysis(compiled) -> dict[str, Optional[float]]:
  """FLOPs and bytes accessed of a jax Lowered or Compiled (per device).

  XLA's HLO cost analysis; a while loop's body (NMS) is counted once, which
  is negligible next to the convolutions.
  """
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return dict(flops=None, bytes_accessed=None)
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  flops = ca.get('flops')
  accessed = ca.get('bytes accessed')
  return dict(flops=float(flops) if flops is not None else None,
              bytes_accessed=float(accessed) if accessed is not None else None)


def matmul_flops(closed_jaxpr) -> float:
  """FLOPs of the convolutions and matrix products of a jaxpr (2 per MAC).

  The usual "model FLOPs" of MFU: elementwise work is left out and so are
  XLA's rewrites, and the count does not depend on the backend (the
  compiled GPU executable's cost analysis misses convolutions that became
  cuDNN calls). Per conv_general_dilated: 2 x output elements x the
  kernel's elements per output feature (this also holds for the
  feature- and batch-grouped convolutions of the backward pass); per
  dot_general: 2 x output elements x contracted size. Sub-jaxprs (jit,
  remat, custom_jvp/vjp) are counted as called, a scan `length` times, a
  while body once, a cond by its costliest branch.
  """
  total = 0.0
  jaxpr = getattr(closed_jaxpr, 'jaxpr', closed_jaxpr)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      rhs_out = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2.0 * np.prod(out) * np.prod(rhs) / rhs_out
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in lhs_contract])
    elif name == 'cond':
      total += max(matmul_flops(b) for b in eqn.params['branches'])
    else:
      sub = [v for v in eqn.params.values()
             if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
      times = eqn.params.get('length', 1) if name == 'scan' else 1
      total += times * sum(matmul_flops(j) for j in sub)
  return float(total)


def memory_analysis(compiled) -> Optional[dict[str, int]]:
  """XLA's static buffer sizes of one executable (per device), when available."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  keys = ('argument_size_in_bytes', 'output_size_in_bytes',
          'alias_size_in_bytes', 'temp_size_in_bytes',
          'generated_code_size_in_bytes')
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events) while active.

  `count` rises by one per executable XLA builds, including small helper
  computations; a steady-state step loop must leave it at 0.
  """
  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, name, duration, **_):
    if self.active and name == self.EVENT:
      self.count += 1
      self.seconds += float(duration)

  def start(self) -> 'CompileCounter':
    self.count, self.seconds, self.active = 0, 0.0, True
    return self

  def stop(self) -> 'CompileCounter':
    self.active = False
    return self


def time_calls(fn, args, *, reps: int, warmup: int) -> tuple[dict, Any]:
  """(timing, last output) of fn(*args): the first call (trace, compile,
  run), then `reps` timed calls after `warmup - 1` more untimed ones, each
  ended by block_until_ready."""
  counter = CompileCounter()
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    out = jax.block_until_ready(fn(*args))
  counter.start()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  counter.stop()
  return dict(first_call_s=first, median_s=float(np.median(times)),
              min_s=float(np.min(times)), reps=reps,
              recompiles_in_timed_calls=counter.count), out


def write_json(path: Optional[str], result: Mapping[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True, default=str)
    f.write('\n')


def fmt_bytes(n: Optional[int]) -> str:
  if n is None:
    return 'n/a'
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.0f} MiB'
