"""The shard_map training step of configs/mimicdet_r50_fpn_1x.py lowers for
TPU and GPU (cuda) on this CPU-only machine.

Abstract shapes only (jax.eval_shape of model.init and of the optimiser
state): no weight is materialised and nothing is compiled, so the test
catches an op without a TPU or GPU lowering, a sharding the partitioner
rejects, or a collective outside the mesh, at the recipe's real canvas
(896 x 1408, ResNet-50, bfloat16, batch 16 over the 8 test devices), in
about 15 s of tracing and lowering.
"""
import jax
import jax.numpy as jnp

from configs import mimicdet_r50_fpn_1x
from mimicdet_jax import config_lib
from mimicdet_jax.losses import total
from mimicdet_jax.models import backbones
from mimicdet_jax.models import mimicdet
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib


def _abstract_state(config, model, tx, canvas):
  """ShapeDtypeStructs of the step-0 TrainState (as create_train_state)."""
  h, w = canvas

  def build(rng):
    variables = model.init(rng, jnp.zeros((1, h, w, 3)), train=False)
    params = variables['params']
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        frozen=variables.get('frozen', {}), opt_state=tx.init(params),
        rng=jnp.zeros((2,), jnp.uint32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32))

  return jax.eval_shape(build, jax.random.PRNGKey(0))


def test_r50_shard_map_step_lowers_for_tpu_and_cuda():
  raw = mimicdet_r50_fpn_1x.get_config()
  raw.model.backbone_init = ''  # shapes only; the weights need not exist
  raw.train.parallelism = 'shard_map'
  config = config_lib.resolve(raw, 80)
  canvas = tuple(config.data.canvas_buckets[0])
  model = mimicdet.MimicDet(config)
  h, w = canvas
  params = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, h, w, 3)), train=False),
      jax.random.PRNGKey(0))['params']
  frozen_mask = backbones.frozen_param_mask(
      params, config.model.backbone.frozen_stages)
  tx = optim.make_optimizer(config, frozen_mask)
  train_step = step_lib.make_train_step(
      total.make_loss_fn(model, config), tx, frozen_mask,
      loss_per_image=config.train.loss_per_image,
      lr_schedule=optim.make_lr_schedule(config))
  parallel = parallel_lib.DataParallel('shard_map', jax.devices())
  p_step = parallel.wrap(train_step)

  replicated = jax.sharding.NamedSharding(parallel.mesh,
                                          jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(parallel.mesh,
                                     jax.sharding.PartitionSpec('data'))
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      _abstract_state(config, model, tx, canvas))
  b, g = config.train.batch_size, config.data.max_boxes
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
  # What the loader feeds (data.device_normalize: uint8 pixels).
  batch = dict(
      image=spec((b, h, w, 3), jnp.uint8), image_size=spec((b, 2), jnp.int32),
      boxes=spec((b, g, 4), jnp.float32), classes=spec((b, g), jnp.int32),
      box_mask=spec((b, g), jnp.bool_), is_crowd=spec((b, g), jnp.bool_),
      image_id=spec((b,), jnp.int32), orig_size=spec((b, 2), jnp.int32),
      scale=spec((b,), jnp.float32))

  assert config.model.dtype == 'bfloat16' and canvas == (896, 1408)
  assert len(jax.devices()) == 8 and b == 16
  lowered = p_step.trace(state, batch).lower(
      lowering_platforms=('tpu', 'cuda'))
  text = lowered.as_text()
  assert 'mhlo.num_partitions = 8' in text
  assert '_platform_index' in text  # one module, a branch per platform
  assert 'all_reduce' in text  # the gradient pmean over 'data'
  assert 'bf16' in text
