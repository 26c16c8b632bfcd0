"""Ahead-of-time compilation of the real training step and the exported
detector for accelerators this machine does not have.

With `libtpu` installed, `jax.experimental.topologies.get_topology_desc`
gives abstract TPU chips on a CPU-only host, and `jit(...).lower(<abstract
arguments>).compile()` runs the real TPU compiler on them (MaxText's
train_compile.py and axlearn's run_aot_compilation.py do the same). Nothing
is materialised: the state and the batch are `ShapeDtypeStruct`s with their
shardings. What comes back are the compiler's own figures: the per-chip
memory of the executable, and its flops, bytes accessed and time estimate.
They are not measured step times.

`train_step_program` and `detector_program` build the two programs;
`compile_program` compiles one and reads its figures (`Compiled`).
"""
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mimicdet_jax import config_lib
from mimicdet_jax.errors import ConfigError
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.losses import total
from mimicdet_jax.models import backbones
from mimicdet_jax.models import mimicdet
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function and the abstract arguments to lower it with."""
  fn: Callable
  args: tuple
  images_per_chip: int
  canvas: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Compiled:
  """The compiler's figures for one program, per chip (bytes, flops, s).

  `bytes_accessed` and `flops` are XLA's cost analysis of the partitioned
  (per-chip) module. A while loop's body is counted once, not once per trip
  (docs/BENCHMARKS.md, "TPU, compiled on CPU"). `optimal_seconds` is the
  compiler's own estimate; it is negative or absent where it gives none.
  """
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  optimal_seconds: float
  compile_seconds: float
  hlo_text: Callable[[], str]
  memory_space_copy_bytes: float = 0.0

  @property
  def bytes_without_copies(self) -> float:
    """`bytes_accessed` less what it counts for the memory-space copies.

    XLA:TPU's memory-space assignment moves buffers between HBM and on-chip
    VMEM with async copies (copy-start / copy-done), and the cost analysis
    counts each such copy 4x its size on top of the reads of its consumers
    (`memory_space_copy_bytes`; docs/BENCHMARKS.md, "What bytes accessed
    counts"). What is left is what the same program would access with every
    buffer in HBM: an upper bound on its HBM traffic.
    """
    return self.bytes_accessed - COPY_COUNT * self.memory_space_copy_bytes

  @property
  def hbm_bytes(self) -> int:
    """Peak HBM the executable needs on one chip (donated inputs counted once)."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes + self.code_bytes)


# How many times XLA:TPU's cost analysis counts an HBM <-> VMEM async copy's
# size: bytes_accessed with and without memory-space assignment
# (LIBTPU_INIT_ARGS=--xla_msa_enable=false) differ by 4x the copies' bytes
# (the R50 backbone forward + backward at 2 x 896x1408 on v5p: 6.84 GB =
# 4 x 1.69 GB; tests/test_plan_tpu.py checks it on a toy).
COPY_COUNT = 4
_SHAPE = re.compile(r'(\w+)\[([0-9,]*)\](\{[^}]*\})?')
# Bytes per element of the HLO element types (benchmarks/hlo_bytes.py too).
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2,
               'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
               'f64': 8, 'c64': 8, 'token': 0, 's4': 0.5, 'u4': 0.5}


def array_bytes(dtype: str, dims: str) -> float:
  """Bytes of an HLO array written as dtype[dims], e.g. ('bf16', '2,8'); a
  type not in DTYPE_BYTES counts 4 bytes an element."""
  return (math.prod(int(d) for d in dims.split(',') if d) *
          DTYPE_BYTES.get(dtype, 4))


def _memory_space(layout: str) -> int:
  """'{3,2,1,0:T(8,128)(2,1)S(1)}' -> 1; no S(n): 0 (HBM)."""
  m = re.search(r'S\((\d+)\)', layout or '')
  return int(m.group(1)) if m else 0


def memory_space_copy_bytes(hlo_text: str) -> float:
  """Bytes moved by the async copies between memory spaces (copy-start whose
  destination and source layouts name different memory spaces) in an
  optimized TPU HLO module, each counted once."""
  total = 0.0
  for line in hlo_text.splitlines():
    if ' copy-start(' not in line or '=' not in line:
      continue
    # "%c = (dst{layout}, src{layout}, u32[]{...}) copy-start(%x)"
    shapes = _SHAPE.findall(line.split('=', 1)[1])
    if len(shapes) < 2:
      continue
    (dtype, dims, dst), (_, _, src) = shapes[:2]
    if _memory_space(dst) == _memory_space(src):
      continue
    total += array_bytes(dtype, dims)
  return total


# Generations whose chips have two TensorCores run as one device.
MEGACORE = ('v4',)


def topology_devices(name: str) -> list:
  """The abstract chips of a TPU topology such as 'v5p:2x2x1' or 'v5e:2x2'.

  Raises:
    ConfigError: libtpu is missing, or the topology is unknown to it.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu takes a machine-wide lock file by default, so a second process
  # (a test worker, a planner beside a benchmark) could not compile at all;
  # nothing here touches a real chip.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ConfigError(
        'compiling for TPU needs libtpu: `make tpu-plan-deps` (or '
        '`.venv/bin/pip install -r requirements-tpu.txt`)') from None
  # A v4 chip has two TensorCores; Cloud TPU VMs run them as one JAX device
  # (megacore: 4 devices on a v4-8), which libtpu's compile-only topology
  # gives only when asked. v5p is megacore already; v5e and v6e have one core.
  options = ({'chip_config_name': 'megacore'}
             if name.split(':', 1)[0].lower() in MEGACORE else {})
  try:
    try:
      topo = topologies.get_topology_desc(platform='tpu', topology_name=name,
                                          **options)
    except Exception as e:  # pylint: disable=broad-except
      # A slice smaller than one host (v5e:2x1, v5p:1x1x1) needs host
      # bounds of its own size; libtpu assumes 2x2x1 hosts.
      dims = _topology_dims(name)
      if 'not divisible' not in str(e) or dims is None:
        raise
      bounds = [min(d, b) for d, b in zip(dims + [1] * (3 - len(dims)),
                                          (2, 2, 1))]
      topo = topologies.get_topology_desc(
          platform='tpu', topology_name=name, chips_per_host_bounds=bounds,
          **options)
  except Exception as e:  # libtpu's error is a long XlaRuntimeError
    raise ConfigError(f'--topology {name!r}: unknown to libtpu '
                      f'({str(e).splitlines()[0][:160]}); examples: '
                      "'v4:2x2x1', 'v5e:2x2', 'v5p:2x2x1', 'v6e:2x2'") from None
  return list(topo.devices)


def _topology_dims(name: str):
  """'v5e:2x1' -> [2, 1]; None when the name has no dimensions."""
  try:
    return [int(d) for d in name.split(':', 1)[1].lower().split('x')]
  except (IndexError, ValueError):
    return None


def resolve_for(raw: ml_collections.ConfigDict, num_classes: int,
                global_batch: int) -> ml_collections.FrozenConfigDict:
  """The recipe resolved as a run of `global_batch` images would see it
  (shapes only: no backbone weights are read)."""
  raw = ml_collections.ConfigDict(raw.to_dict())
  raw.model.backbone_init = ''
  raw.train.parallelism = 'shard_map'
  raw.train.batch_size = int(global_batch)
  return config_lib.resolve(raw, num_classes)


def _abstract_variables(model, canvas):
  h, w = canvas
  return jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, h, w, 3)), train=False),
      jax.random.PRNGKey(0))


def _shaped(tree, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train_step_program(config, devices: Sequence, canvas: tuple[int, int]
                       ) -> Program:
  """The shard_map training step exactly as train.py builds it, over a mesh
  of `devices`, at `config.train.batch_size` images (global) on `canvas`."""
  model = mimicdet.MimicDet(config)
  variables = _abstract_variables(model, canvas)
  params = variables['params']
  frozen_mask = backbones.frozen_param_mask(
      params, config.model.backbone.frozen_stages)
  tx = optim.make_optimizer(config, frozen_mask)
  train_step = step_lib.make_train_step_for(
      config, total.make_loss_fn(model, config), tx, frozen_mask)
  parallel = parallel_lib.DataParallel('shard_map', devices)
  spec = jax.sharding.PartitionSpec
  replicated = jax.sharding.NamedSharding(parallel.mesh, spec())
  split = jax.sharding.NamedSharding(parallel.mesh, spec(parallel_lib.AXIS))

  def build_state(rng):
    v = model.init(rng, jnp.zeros((1,) + tuple(canvas) + (3,)), train=False)
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=v['params'],
        frozen=v.get('frozen', {}), opt_state=tx.init(v['params']),
        rng=jnp.zeros((2,), jnp.uint32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
        # The EMA is one more copy of the params (state.create_train_state).
        ema_params=v['params'] if config.optim.ema_decay > 0 else None)

  state = _shaped(jax.eval_shape(build_state, jax.random.PRNGKey(0)),
                  replicated)
  b, g = config.train.batch_size, config.data.max_boxes
  if b % len(devices):
    raise ConfigError(f'train.batch_size={b} does not divide over '
                      f'{len(devices)} chips')
  h, w = canvas
  pixels = jnp.uint8 if config.data.device_normalize else jnp.float32
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
  batch = dict(  # what the loader feeds (data/pipeline.py)
      image=s((b, h, w, 3), pixels), image_size=s((b, 2), jnp.int32),
      boxes=s((b, g, 4), jnp.float32), classes=s((b, g), jnp.int32),
      box_mask=s((b, g), jnp.bool_), is_crowd=s((b, g), jnp.bool_),
      image_id=s((b,), jnp.int32), orig_size=s((b, 2), jnp.int32),
      scale=s((b,), jnp.float32))
  return Program(parallel.wrap(train_step), (state, batch),
                 b // len(devices), tuple(canvas))


def detector_program(config, device, canvas: tuple[int, int],
                     batch: int) -> Program:
  """The exported detector's computation (serving/export.py: normalise,
  backbone, refinement, S-head, decoding, NMS) on one chip, weights as
  arguments, at `batch` images of `canvas`."""
  model = mimicdet.MimicDet(config)
  predict = postprocess.make_predict_fn(model, config)
  one = jax.sharding.SingleDeviceSharding(device)
  variables = _shaped(_abstract_variables(model, canvas), one)
  h, w = canvas
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8, sharding=one)
  sizes = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=one)
  from mimicdet_jax.data import transforms  # pylint: disable=g-import-not-at-top

  def detector(variables, images, image_sizes):
    x = transforms.normalize_on_device(images, image_sizes, config.data)
    return predict(variables, x, image_sizes)

  return Program(jax.jit(detector), (variables, images, sizes), batch,
                 tuple(canvas))


def compile_program(program: Program) -> Compiled:
  """Lowers and compiles `program` for the devices its arguments name."""
  start = time.perf_counter()
  compiled = program.fn.lower(*program.args).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0]
  cost = cost or {}
  return Compiled(
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      flops=float(cost.get('flops', 0.0)),
      bytes_accessed=float(cost.get('bytes accessed', 0.0)),
      optimal_seconds=float(cost.get('optimal_seconds', -1.0)),
      compile_seconds=seconds,
      hlo_text=compiled.as_text,
      memory_space_copy_bytes=memory_space_copy_bytes(compiled.as_text()))
