"""optim.optimizer='adamw' (the demo's optimiser) against a NumPy AdamW."""
import jax
import numpy as np

from mimicdet_jax.training import optim
from tests import train_helper as th


def test_adamw_matches_numpy_reference():
  c = th.toy_config()
  c.optim.optimizer = 'adamw'
  c.optim.base_lr = 0.01
  c.optim.base_batch_size = 8
  c.train.batch_size = 8
  c.optim.warmup_steps = 0
  c.optim.decay_steps = (3,)
  c.optim.decay_factor = 0.5
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 0.0
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        th.toy_variables()['params'])
  mask = jax.tree.map(lambda _: False, params)
  tx = optim.make_optimizer(c, mask)
  state = tx.init(params)
  update = jax.jit(tx.update)

  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  m = [np.zeros_like(x) for x in leaves]
  v = [np.zeros_like(x) for x in leaves]
  b1, b2, eps = 0.9, 0.999, 1e-8  # optax.scale_by_adam defaults
  rng = np.random.default_rng(0)
  p = params
  for t in range(5):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    lr = 0.01 * (0.5 if t >= 3 else 1.0)
    for k, g in enumerate(jax.tree.leaves(grads)):
      g = np.asarray(g, np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step = (m[k] / (1 - b1**(t + 1))) / (np.sqrt(v[k] / (1 - b2**(t + 1))) + eps)
      if leaves[k].ndim > 1:  # decoupled decay, not on biases / norm scales
        step = step + 0.1 * leaves[k]
      leaves[k] = leaves[k] - lr * step
    updates, state = update(grads, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  for got, want in zip(jax.tree.leaves(p), leaves):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

