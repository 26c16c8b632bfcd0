"""The optimiser and its learning-rate schedule (SPEC 5).

`peak_learning_rate` (linear scaling with the global batch),
`make_lr_schedule` (linear warm-up, step decay) and `make_optimizer` (SGD with
momentum or AdamW, masked weight decay, clipping, frozen leaves).
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mimicdet_jax import errors

PyTree = Any


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optim.base_lr scaled linearly with the global batch (SPEC 5)."""
  return (config.optim.base_lr * config.train.batch_size /
          config.optim.base_batch_size)


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then x`decay_factor` at each of `optim.decay_steps`.

  lr(t) = peak * (w + (1 - w) * t / warmup_steps) for t < warmup_steps
  (w = optim.warmup_factor), then peak * decay_factor ** #{d : t >= d};
  t counts applied updates from 0. This is Detectron2's WarmupMultiStepLR
  with linear warm-up (for decay steps after the warm-up).
  """
  o = config.optim
  peak = peak_learning_rate(config)
  decay = optax.piecewise_constant_schedule(
      peak, {int(s): float(o.decay_factor) for s in o.decay_steps})
  if o.warmup_steps <= 0:
    return decay
  # Written as a factor rather than optax.linear_schedule, whose
  # end + (init - end) * (1 - t/T) form loses ~4e-5 relative at t = 0 in float32.
  def warmup(t):
    alpha = jnp.minimum(t, o.warmup_steps) / o.warmup_steps
    return peak * (o.warmup_factor * (1.0 - alpha) + alpha)

  return optax.join_schedules(
      [warmup, lambda t: decay(t + o.warmup_steps)], [o.warmup_steps])


# optim.optimizer: SGD with momentum (the paper) | AdamW (`make_optimizer`).
OPTIMIZERS = ('sgd', 'adamw')


def make_optimizer(config: ml_collections.ConfigDict,
                   frozen_mask: PyTree) -> optax.GradientTransformation:
  """SGD with momentum (or AdamW), masked weight decay, clipping, frozen leaves.

  Per trainable leaf, PyTorch's SGD order: g <- clip(g) (global norm over
  trainable leaves, when optim.grad_clip_norm > 0); g <- g + wd * p for
  leaves with ndim > 1 (no decay on norm scales and biases);
  m <- momentum * m + g; p <- p - lr(t) * m.
  Frozen leaves (frozen_mask True) get a zero update and hold no state.
  The S-head's leaves (params['s_head_net']) take lr(t) x
  optim.s_head_lr_mult, the T-head's (params['t_head_net']) lr(t) x
  optim.t_head_lr_mult (each a parameter group of its own, as a torch
  optimiser's param_groups; weight decay scales with it, as there); at the
  defaults 1.0 there is one group, the paper's recipe.

  Args:
    config: reads optim.* and train.batch_size.
    frozen_mask: pytree of bools like params, True = frozen.
  """
  o = config.optim
  chain = []
  if o.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  # A callable mask: inside multi_transform the tree carries MaskedNodes
  # for the frozen leaves, which have no leaves of their own.
  decay = optax.add_decayed_weights(
      o.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  if o.optimizer == 'sgd':  # the paper's recipe (SPEC section 5)
    if o.weight_decay > 0:
      chain.append(decay)
    chain.append(optax.trace(decay=o.momentum, nesterov=False))
  else:  # adamw, the from-scratch CPU demo: converges in fewer steps
    chain.append(optax.scale_by_adam(eps=float(o.get('adam_eps', 1e-8))))
    if o.weight_decay > 0:
      chain.append(decay)  # decoupled, as optax.adamw
  chain.append(optax.scale_by_learning_rate(make_lr_schedule(config)))
  groups = head_lr_mults(o)
  transforms = {'trainable': optax.chain(*chain),
                'frozen': optax.set_to_zero()}
  for name, mult in groups.items():
    transforms[name] = optax.chain(*chain, optax.scale(mult))
  return optax.multi_transform(transforms, param_labels(frozen_mask, groups))


# Parameter groups with a learning rate of their own: the config key's
# prefix (optim.<name>_lr_mult) -> the top-level params module it scales.
HEAD_MODULES = {'s_head': 's_head_net', 't_head': 't_head_net'}


def lr_mults(optim: ml_collections.ConfigDict) -> dict[str, float]:
  """{'s_head': 3.0, ...}: every optim.<group>_lr_mult, each checked > 0.

  config_lib.resolve calls it too, so a bad value fails at start-up.
  """
  out = {}
  for key in optim.keys():
    if key.endswith('_lr_mult'):
      mult = float(optim[key])
      if not mult > 0:
        raise errors.ConfigError(f'optim.{key}={mult}; expected > 0')
      out[key[:-len('_lr_mult')]] = mult
  return out


def head_lr_mults(o: ml_collections.ConfigDict) -> dict[str, float]:
  """{'s_head': 3.0, ...}: the heads whose optim.<head>_lr_mult is not 1."""
  mults = lr_mults(o)  # ConfigError unless each is > 0
  return {name: mults[name] for name in HEAD_MODULES
          if mults.get(name, 1.0) != 1.0}


def param_labels(frozen_mask: PyTree, groups) -> PyTree:
  """'frozen' | a head group's name | 'trainable' per leaf (make_optimizer)."""
  module_group = {HEAD_MODULES[name]: name for name in groups}

  def label(path, frozen):
    if frozen:
      return 'frozen'
    top = getattr(path[0], 'key', None) if path else None
    return module_group.get(top, 'trainable')

  return jax.tree_util.tree_map_with_path(label, frozen_mask)
