"""The real training step for the benchmarks, on random in-memory batches.

Shared by benchmarks/train_step.py (throughput) and benchmarks/profile_step.py
(where the time goes); it defines no flags, so both scripts can import it.
"""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common as bench
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib
from mimicdet_jax.losses import total
from mimicdet_jax.models import backbones
from mimicdet_jax.models import mimicdet
# pylint: enable=g-import-not-at-top,wrong-import-position


def step_config(raw, *, batch: int, size, dtype, num_classes: int):
  """(resolved config, per-device batch) from the step scripts' flags.

  batch 0 = train.batch_size split over the local devices.
  """
  ndev = jax.local_device_count()
  per_device = batch or max(raw.train.batch_size // ndev, 1)
  config = bench.resolve_config(raw, size=size, dtype=dtype,
                                num_classes=num_classes,
                                batch_size=per_device * ndev)
  return config, per_device


def build_step(config, per_device_batch: int, *, boxes_per_image: int = 5,
               init: str = 'auto', seed: int = 0, count_flops: bool = True):
  """The real training step, its replicated state and one device batch.

  Returns:
    (p_step, rstate, batch, flops): the mimicdet_jax.training step wrapped as
    `train.parallelism` says (pmap, or jit(shard_map) over the local
    devices), the step-0 state replicated over the local devices, a
    synthetic batch already laid out over them ([local_devices,
    per_device_batch, ...] for pmap, one global array for shard_map;
    `parallel_lib.DataParallel(...).host` reads the metrics), and the model
    FLOPs of one device's step (convolutions and matmuls of the forward and
    backward pass, from the step's jaxpr; None when not count_flops, which
    saves tracing the whole step once more).
  """
  model = mimicdet.MimicDet(config)
  variables = bench.init_variables(config, model, init, seed)
  frozen_mask = backbones.frozen_param_mask(
      variables['params'], config.model.backbone.frozen_stages)
  state, tx = state_lib.create_train_state(
      config, variables, frozen_mask, jax.random.PRNGKey(seed))
  train_step = step_lib.make_train_step(
      total.make_loss_fn(model, config), tx, frozen_mask,
      loss_per_image=config.train.loss_per_image,
      lr_schedule=optim.make_lr_schedule(config),
      grad_accum_steps=config.train.grad_accum_steps)
  ndev = jax.local_device_count()
  examples = bench.synthetic_examples(
      config, (ndev, per_device_batch), boxes_per_image=boxes_per_image,
      seed=seed)
  batch = jax.tree.map(_shard, examples)
  flops = None
  if count_flops:
    # Model FLOPs of one device's step, from its jaxpr (bench.matmul_flops).
    shapes = lambda tree: jax.tree.map(  # pylint: disable=g-long-lambda
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    flops = bench.matmul_flops(jax.make_jaxpr(
        train_step, axis_env=[(step_lib.AXIS, ndev)])(
            shapes(state), shapes(jax.tree.map(lambda x: x[0], examples))))
  if config.train.parallelism == 'shard_map':
    # jit(shard_map) over the local devices: global arrays, replicated state.
    parallel = parallel_lib.DataParallel('shard_map', jax.local_devices())
    return (parallel.wrap(train_step), parallel.put_state(state),
            parallel.put_batch(examples), flops)
  return (parallel_lib.pmap_train_step(train_step), parallel_lib.replicate(state),
          batch, flops)


def _shard(x: np.ndarray):
  """[local_devices, ...] host array -> one slice per device, laid out as
  parallel_lib.replicate lays out the state (so the step compiles once)."""
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), (step_lib.AXIS,)),
      jax.sharding.PartitionSpec(step_lib.AXIS))
  return jax.device_put(x, sharding)
