"""The train state: what one step changes, saved whole in every checkpoint.

`TrainState`, `create_train_state` (step 0 and its optimiser) and
`init_variables` (MimicDet's variables, the backbone from model.backbone_init).
"""
import functools
from typing import Any, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mimicdet_jax.training import optim

PyTree = Any
SMALL_ARCHS = ('resnet_tiny',)  # archs that may sensibly train from scratch


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in every checkpoint.

  Attributes:
    step: int32 [], optimiser steps taken (skipped non-finite steps count).
    params: trained variables (frozen leaves included, never updated).
    frozen: the 'frozen' collection (frozen-BN statistics), never updated.
    opt_state: optax state (none for frozen leaves).
    rng: uint32 [2], the run's base key; each step folds in the step number.
    nonfinite_streak: int32 [], consecutive skipped steps ending at `step`.
    nonfinite_total: int32 [], skipped steps since the start of training.
    ema_params: the exponential moving average of `params` (training/ema.py),
      or None when optim.ema_decay is 0.
  """
  step: jax.Array
  params: PyTree
  frozen: PyTree
  opt_state: PyTree
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array
  ema_params: PyTree = None

  @property
  def num_updates(self) -> jax.Array:
    """Applied updates: optax's schedule count."""
    return self.step - self.nonfinite_total


def create_train_state(config: ml_collections.ConfigDict,
                       variables: Mapping[str, PyTree],
                       frozen_mask: PyTree,
                       rng: jax.Array) -> tuple[TrainState,
                                                optax.GradientTransformation]:
  """Builds the step-0 state (on the host) and its optimiser.

  Args:
    config: reads optim.* (optim.ema_decay > 0: with EMA weights) and
      train.batch_size.
    variables: {'params': ..., 'frozen': ... (optional)}.
    frozen_mask: pytree of bools like variables['params'].
    rng: uint32 [2] PRNG key (jax.random.PRNGKey).
  """
  tx = optim.make_optimizer(config, frozen_mask)
  params = jax.device_get(variables['params'])
  frozen = jax.device_get(variables.get('frozen', {}))
  state = TrainState(
      step=np.zeros((), np.int32),
      params=params,
      frozen=frozen,
      opt_state=jax.device_get(tx.init(params)),
      rng=np.asarray(rng, np.uint32),
      nonfinite_streak=np.zeros((), np.int32),
      nonfinite_total=np.zeros((), np.int32),
      # The average starts at the initial weights (d2go, timm).
      ema_params=(jax.tree.map(np.copy, params)
                  if config.optim.ema_decay > 0 else None))
  return state, tx



def _warn_from_scratch(config) -> None:
  arch = config.model.backbone.arch
  if config.model.backbone_init or arch in SMALL_ARCHS:
    return
  bar = '!' * 78
  logging.warning(
      '\n%s\n  Training %s FROM SCRATCH: model.backbone_init is empty.\n'
      '  The recipes assume an ImageNet-pretrained backbone (stem + stage 1\n'
      '  frozen, frozen BatchNorm); from random weights this will not reach\n'
      '  the paper numbers. Import weights with\n'
      '    python -m mimicdet_jax.tools.import_weights --arch %s --src ... '
      '--out weights/%s\n  and pass --config.model.backbone_init=weights/%s\n%s',
      bar, arch, arch, arch, arch, bar)


def init_variables(config, model, rng: jax.Array) -> dict:
  """MimicDet variables on the host; the backbone from model.backbone_init."""
  h, w = config.data.canvas_buckets[0]
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, images)
  variables = jax.device_get(flax.core.unfreeze(variables))
  if config.model.backbone_init:
    from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top
    from mimicdet_jax.tools import import_weights  # pylint: disable=g-import-not-at-top
    logging.info('backbone from %s', config.model.backbone_init)
    variables = backbones.graft_backbone(
        variables, import_weights.load_backbone_init(config.model.backbone_init))
  else:
    _warn_from_scratch(config)
  return variables
