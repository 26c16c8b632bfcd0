"""optim.optimizer='adamw' (the demo's optimiser) against a NumPy AdamW."""
import jax
import numpy as np
import pytest

from mimicdet_jax import errors
from mimicdet_jax.training import optim
from tests import train_helper as th


# 1e-8: optax.scale_by_adam's default; 0.3: optim.adam_eps reaches Adam
# (with gradients ~N(0, 1) the step changes by ~20 %).
@pytest.mark.parametrize('eps', [1e-8, 0.3])
def test_adamw_matches_numpy_reference(eps):
  c = th.toy_config()
  c.optim.optimizer = 'adamw'
  c.optim.adam_eps = eps
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
  b1, b2 = 0.9, 0.999  # optax.scale_by_adam defaults
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



@pytest.mark.parametrize('mults', [{'s_head_net': 3.0}, {'t_head_net': 0.25},
                                   {'s_head_net': 3.0, 't_head_net': 0.25}])
def test_head_lr_mults_are_param_groups_of_their_own(mults):
  """optim.{s,t}_head_lr_mult: SGD + momentum + decay, a head's leaves at lr x mult."""
  c = th.toy_config()
  c.optim.optimizer = 'sgd'
  c.optim.base_lr = 0.1
  c.optim.base_batch_size = 8
  c.train.batch_size = 8
  c.optim.warmup_steps = 0
  c.optim.decay_steps = (2,)
  c.optim.decay_factor = 0.5
  c.optim.weight_decay = 0.01
  c.optim.momentum = 0.9
  c.optim.s_head_lr_mult = mults.get('s_head_net', 1.0)
  c.optim.t_head_lr_mult = mults.get('t_head_net', 1.0)
  rng = np.random.default_rng(1)
  params = {'s_head_net': {'kernel': rng.normal(size=(3, 2)).astype(np.float32),
                           'bias': rng.normal(size=(2,)).astype(np.float32)},
            't_head_net': {'kernel': rng.normal(size=(2, 3)).astype(np.float32),
                           'bias': rng.normal(size=(3,)).astype(np.float32)},
            'backbone': {'kernel': rng.normal(size=(2, 2)).astype(np.float32),
                         'bias': rng.normal(size=(2,)).astype(np.float32)},
            'fpn': {'kernel': rng.normal(size=(4,)).astype(np.float32)}}
  mask = jax.tree.map(lambda _: False, params)
  mask['fpn']['kernel'] = True  # frozen: never moves
  tx = optim.make_optimizer(c, mask)
  state = tx.init(params)
  update = jax.jit(tx.update)
  want = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  mom = jax.tree.map(np.zeros_like, want)
  p = params
  for t in range(4):
    grads = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    lr = 0.1 * (0.5 if t >= 2 else 1.0)
    for group in ('s_head_net', 't_head_net', 'backbone'):
      for name in ('kernel', 'bias'):
        g = np.asarray(grads[group][name], np.float64)
        if want[group][name].ndim > 1:
          g = g + 0.01 * want[group][name]
        mom[group][name] = 0.9 * mom[group][name] + g
        glr = lr * mults.get(group, 1.0)
        want[group][name] = want[group][name] - glr * mom[group][name]
    updates, state = update(grads, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  for got, ref in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_head_lr_mult_one_keeps_the_single_group_state():
  """At the default 1.0 the optimiser state is the pre-key one (old
  checkpoints restore), and a non-positive multiplier is refused."""
  c = th.toy_config()
  params = {'s_head_net': {'kernel': np.ones((2, 2), np.float32)},
            'fpn': {'kernel': np.ones((2, 2), np.float32)}}
  mask = jax.tree.map(lambda _: False, params)
  c.optim.s_head_lr_mult = 1.0
  state = optim.make_optimizer(c, mask).init(params)
  assert set(state.inner_states) == {'trainable', 'frozen'}
  c.optim.s_head_lr_mult = 2.0
  state = optim.make_optimizer(c, mask).init(params)
  assert set(state.inner_states) == {'trainable', 'frozen', 's_head'}
  c.optim.s_head_lr_mult = 1.0
  c.optim.t_head_lr_mult = 0.5
  state = optim.make_optimizer(c, mask).init(params)
  assert set(state.inner_states) == {'trainable', 'frozen', 't_head'}
  for key in ('s_head_lr_mult', 't_head_lr_mult'):
    c.optim.s_head_lr_mult = c.optim.t_head_lr_mult = 1.0
    c.optim[key] = 0.0
    with pytest.raises(errors.ConfigError, match=key):
      optim.make_optimizer(c, mask)
