"""Mimic distances and variants against closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax.losses import mimic

RNG = np.random.default_rng(0)


def _pair(b=2, s=5, l=4, d=6):
  cls = RNG.normal(size=(2, b, s, l)).astype(np.float32)
  reg = np.abs(RNG.normal(size=(2, b, s, d))).astype(np.float32)
  return dict(cls=cls[0], reg=reg[0]), dict(cls=cls[1], reg=reg[1])


@functools.lru_cache
def _jitted(**kw):
  return jax.jit(functools.partial(mimic.mimic_loss, **kw))


def _loss(student, teacher, mask, **kw):
  args = dict(paths='both', distance='cosine', temperature=1.0,
              teacher_grad='stopped')
  args.update(kw)
  return _jitted(**args)(student, teacher, mask)


def test_identical_is_zero_opposite_is_two_per_path():
  s, _ = _pair()
  mask = np.ones((2, 5), bool)
  loss, per = _loss(s, s, mask)
  np.testing.assert_allclose(per['cls'], 0.0, atol=1e-6)
  np.testing.assert_allclose(per['reg'], 0.0, atol=1e-6)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  neg = {k: -v for k, v in s.items()}
  loss, per = _loss(s, neg, mask)
  np.testing.assert_allclose(per['cls'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(per['reg'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(loss, 4.0, rtol=1e-6)
  # Scale does not matter for cosine.
  _, per = _loss(s, {k: 3.0 * v for k, v in s.items()}, mask, paths='cls')
  assert set(per) == {'cls'}
  np.testing.assert_allclose(per['cls'], 0.0, atol=1e-6)


def _np_cos(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _np_kl(s, t, temp):
  def logsm(x):
    x = x / temp
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  pt = np.exp(logsm(t))
  return temp**2 * (pt * (logsm(t) - logsm(s))).sum(-1)


@pytest.mark.parametrize('distance', ['cosine', 'l2', 'smooth_l1', 'kl'])
def test_distances_match_numpy_masked_mean(distance):
  s, t = _pair()
  mask = RNG.uniform(size=(2, 5)) < 0.6
  mask[0, 0] = True
  loss, per = _loss(s, t, mask, distance=distance, temperature=2.0)
  ref = {}
  for path in ('cls', 'reg'):
    a, b = s[path], t[path]
    name = 'cosine' if (path == 'reg' and distance == 'kl') else distance
    if name == 'cosine':
      d = 1 - _np_cos(a, b)
    elif name == 'l2':
      d = ((a - b)**2).mean(-1)
    elif name == 'smooth_l1':
      x = np.abs(a - b)
      d = np.where(x < 1, 0.5 * x * x, x - 0.5).mean(-1)
    else:
      d = _np_kl(a, b, 2.0)
    ref[path] = d[mask].mean()
    np.testing.assert_allclose(per[path], ref[path], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, ref['cls'] + ref['reg'], rtol=1e-5)


def test_kl_of_identical_is_zero():
  s, _ = _pair()
  _, per = _loss(s, s, np.ones((2, 5), bool), distance='kl', paths='cls',
                 temperature=3.0)
  np.testing.assert_allclose(per['cls'], 0.0, atol=1e-6)


def test_teacher_gradient_stopped_or_flowing():
  s, t = _pair()
  mask = np.ones((2, 5), bool)

  def f(teacher, student, grad_mode):
    return _loss(student, teacher, mask, teacher_grad=grad_mode)[0]

  g_t = jax.grad(f)(t, s, 'stopped')
  assert all(not np.asarray(v).any() for v in g_t.values())
  g_s = jax.grad(f, argnums=1)(t, s, 'stopped')
  assert all(np.asarray(v).any() for v in g_s.values())
  g_t = jax.grad(f)(t, s, 'flowing')
  assert all(np.asarray(v).any() for v in g_t.values())


def test_cosine_gradient_finite_for_zero_vectors_and_empty_mask():
  s = dict(cls=jnp.zeros((1, 3, 4)), reg=jnp.zeros((1, 3, 6)))
  t = dict(cls=jnp.ones((1, 3, 4)), reg=jnp.ones((1, 3, 6)))
  g = jax.grad(lambda x: _loss(x, t, jnp.ones((1, 3), bool))[0])(s)
  assert all(np.isfinite(np.asarray(v)).all() for v in g.values())
  loss, _ = _loss(s, t, jnp.zeros((1, 3), bool))
  assert float(loss) == 0.0


def test_mean_cosine_diagnostic():
  s, t = _pair()
  mask = np.ones((2, 5), bool)
  mask[1, 3:] = False
  np.testing.assert_allclose(mimic.mean_cosine(s['reg'], t['reg'], mask),
                             _np_cos(s['reg'], t['reg'])[mask].mean(),
                             rtol=1e-5)


@pytest.mark.parametrize('key,bad', [('mimic.distance', 'emd'),
                                     ('mimic.paths', 'box'),
                                     ('mimic.teacher_grad', 'half')])
def test_unknown_variants_raise_at_start_up(key, bad):
  from configs import common  # pylint: disable=g-import-not-at-top
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  config_lib.set_key(c, key, bad)
  with pytest.raises(config_lib.ConfigError, match=f"{key}='{bad}'"):
    config_lib.resolve(c, 3)
