"""Exponential moving average (EMA) of the trained weights.

`ema_decay_at` is the decay of the n-th applied update, with the warm-up of
d2go's EMAUpdater (MODEL_EMA.DECAY_WARM_UP_FACTOR, the form of TensorFlow's
ExponentialMovingAverage with num_updates):

  decay_n = min(optim.ema_decay, (1 + n) / (optim.ema_warmup + n)),

n = 1 at the first update, so early weights (far from where training ends)
fade quickly. `update_ema` is called inside the jitted step after the
optimiser update (training/step.py); n comes from the train state's update
count, so a resumed run continues the warm-up where it stopped.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mimicdet_jax.errors import ConfigError

PyTree = Any


def check_config(optim) -> None:
  """ConfigError naming the key for a bad optim.ema_decay or ema_warmup."""
  if not 0.0 <= float(optim.ema_decay) < 1.0:
    raise ConfigError(f'optim.ema_decay={optim.ema_decay}; expected 0 (off) '
                      'or in (0, 1)')
  if not float(optim.ema_warmup) >= 0.0:
    raise ConfigError(f'optim.ema_warmup={optim.ema_warmup}; expected >= 0 '
                      '(0 = no warm-up)')


def ema_decay_at(n: jax.Array, decay: float, warmup: float) -> jax.Array:
  """float32 [] decay of the n-th update (n >= 1); warmup 0 = none."""
  n = jnp.asarray(n, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (warmup + n))


def update_ema(ema_params: Optional[PyTree], params: PyTree,
               num_updates: jax.Array, decay: float,
               warmup: float) -> Optional[PyTree]:
  """The EMA after one more update; None (EMA off) stays None.

  Args:
    ema_params: the average so far, like `params` (float32), or None.
    params: the weights after this step's update.
    num_updates: int32 [], updates applied before this one.
    decay, warmup: optim.ema_decay, optim.ema_warmup.

  Written as ema + (1 - d) * (params - ema) so that a leaf that never moves
  (frozen stages) stays bitwise equal to its weights.
  """
  if ema_params is None:
    return None
  d = ema_decay_at(num_updates + 1, decay, warmup)
  return jax.tree.map(
      lambda e, p: e + ((1.0 - d) * (p - e)).astype(e.dtype), ema_params,
      params)
