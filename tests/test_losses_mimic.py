"""Mimic distances and variants: properties every distance must have, for
each entry of mimic.DISTANCES on each path it is valid for (so a new one is
checked without editing this file), and closed forms for the known ones."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax.losses import mimic

RNG = np.random.default_rng(0)
TEMPERATURE = 2.0
# (path, distance) for every distance valid on every path.
PATH_DISTANCES = [(path, name) for path, names in mimic.PATH_DISTANCES.items()
                  for name in names]


def _pair(b=2, s=5, l=4, d=6):
  cls = RNG.normal(size=(2, b, s, l)).astype(np.float32)
  # The reg path reads ReLU features: non-negative.
  reg = np.abs(RNG.normal(size=(2, b, s, d))).astype(np.float32)
  return dict(cls=cls[0], reg=reg[0]), dict(cls=cls[1], reg=reg[1])


@functools.lru_cache
def _jitted(**kw):
  return jax.jit(functools.partial(mimic.mimic_loss, **kw))


def _loss(student, teacher, mask, **kw):
  args = dict(paths='both', cls_distance='cosine', reg_distance='cosine',
              temperature=1.0, teacher_grad='stopped')
  args.update(kw)
  return _jitted(**args)(student, teacher, mask)


def _on(path, name, **kw):
  """mimic_loss kwargs for `name` on `path` alone."""
  return dict(kw, paths=path, temperature=TEMPERATURE,
              **{f'{path}_distance': name})


# -------------------------------------------- every distance, every path


@pytest.mark.parametrize('path,name', PATH_DISTANCES)
def test_every_distance_is_zero_at_identity_and_positive_otherwise(path, name):
  s, t = _pair()
  fn = mimic.DISTANCES[name]
  same = np.asarray(fn(jnp.asarray(s[path]), jnp.asarray(s[path]),
                       TEMPERATURE))
  assert same.shape == s[path].shape[:-1], 'one value per row'
  np.testing.assert_allclose(same, 0.0, atol=1e-5)
  other = np.asarray(fn(jnp.asarray(s[path]), jnp.asarray(t[path]),
                        TEMPERATURE))
  assert other.shape == s[path].shape[:-1]
  assert (other > 1e-6).all(), other
  # Also a loss through mimic_loss: 0 for S = T, > 0 else.
  mask = np.ones(s[path].shape[:-1], bool)
  np.testing.assert_allclose(_loss(s, s, mask, **_on(path, name))[0], 0.0,
                             atol=1e-5)
  assert float(_loss(s, t, mask, **_on(path, name))[0]) > 1e-6


@pytest.mark.parametrize('path,name', PATH_DISTANCES)
def test_every_distance_is_float32_from_bfloat16(path, name):
  s, t = _pair()
  out = mimic.DISTANCES[name](jnp.asarray(s[path], jnp.bfloat16),
                              jnp.asarray(t[path], jnp.bfloat16), TEMPERATURE)
  assert out.dtype == jnp.float32
  ref = mimic.DISTANCES[name](
      jnp.asarray(s[path], jnp.bfloat16).astype(jnp.float32),
      jnp.asarray(t[path], jnp.bfloat16).astype(jnp.float32), TEMPERATURE)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('path,name', PATH_DISTANCES)
def test_every_distance_gradient_finite_and_teacher_stopped(path, name):
  s, t = _pair()
  mask = np.ones(s[path].shape[:-1], bool)

  def loss(student, teacher, grad_mode):
    return _loss(student, teacher, mask,
                 **_on(path, name, teacher_grad=grad_mode))[0]

  g_s, g_t = jax.grad(loss, argnums=(0, 1))(s, t, 'stopped')
  assert np.isfinite(np.asarray(g_s[path])).all()
  assert np.asarray(g_s[path]).any(), 'the student is pulled'
  assert not np.asarray(g_t[path]).any(), 'stopped: no teacher gradient'
  g_t = jax.grad(loss, argnums=1)(s, t, 'flowing')[path]
  assert np.isfinite(np.asarray(g_t)).all() and np.asarray(g_t).any()
  # Finite where the maths has corners: identical inputs, and all-zero
  # student rows (dead ReLUs on the reg path).
  for student in (t, {k: np.zeros_like(v) for k, v in s.items()}):
    g = jax.grad(loss)(student, t, 'stopped')[path]
    assert np.isfinite(np.asarray(g)).all(), student


@pytest.mark.parametrize('path,name', PATH_DISTANCES)
def test_every_distance_is_a_masked_mean_over_the_boxes(path, name):
  s, t = _pair()
  mask = RNG.uniform(size=(2, 5)) < 0.6
  mask[0, 0], mask[1, 4] = True, False
  loss, per = _loss(s, t, mask, **_on(path, name))
  assert set(per) == {path}
  rows = np.asarray(mimic.DISTANCES[name](jnp.asarray(s[path]),
                                          jnp.asarray(t[path]), TEMPERATURE))
  np.testing.assert_allclose(per[path], rows[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, per[path], rtol=1e-6)
  # A box outside the mask changes nothing; an empty mask gives 0.
  moved = {k: v.copy() for k, v in s.items()}
  moved[path][1, 4] += 5.0
  np.testing.assert_allclose(_loss(moved, t, mask, **_on(path, name))[0],
                             loss, rtol=1e-6)
  empty = _loss(s, t, np.zeros_like(mask), **_on(path, name))[0]
  assert float(empty) == 0.0


def test_each_path_uses_its_own_distance():
  s, t = _pair()
  mask = np.ones((2, 5), bool)
  cls_name, reg_name = (mimic.PATH_DISTANCES['cls'][-1],
                        mimic.PATH_DISTANCES['reg'][-1])
  _, per = _loss(s, t, mask, cls_distance=cls_name, reg_distance=reg_name,
                 temperature=TEMPERATURE)
  for path, name in (('cls', cls_name), ('reg', reg_name)):
    want = mimic.DISTANCES[name](jnp.asarray(s[path]), jnp.asarray(t[path]),
                                 TEMPERATURE)
    np.testing.assert_allclose(per[path], np.mean(want), rtol=1e-5)


def test_the_lists_agree():
  assert set(mimic.PATH_DISTANCES['cls']) == set(mimic.DISTANCES)
  assert set(mimic.PATH_DISTANCES['reg']) == (
      set(mimic.DISTANCES) - set(mimic.CLS_ONLY))
  assert set(mimic.CLS_ONLY) <= set(mimic.DISTANCES)
  assert mimic.mimic_paths('both') == ('cls', 'reg')
  for path in mimic.PATHS:
    assert set(mimic.mimic_paths(path)) <= {'cls', 'reg'}


# -------------------------------------------- closed forms, known distances


def _np_cos(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _np_kl(s, t, temp):
  def logsm(x):
    x = x / temp
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  pt = np.exp(logsm(t))
  return temp**2 * (pt * (logsm(t) - logsm(s))).sum(-1)


def _np_smooth_l1(a, b):
  x = np.abs(a - b)
  return np.where(x < 1, 0.5 * x * x, x - 0.5).mean(-1)


NP_DISTANCES = {
    'cosine': lambda a, b: 1 - _np_cos(a, b),
    'l2': lambda a, b: ((a - b)**2).mean(-1),
    'smooth_l1': _np_smooth_l1,
    'kl': lambda a, b: _np_kl(a, b, TEMPERATURE),
}


@pytest.mark.parametrize('path,name', [p for p in PATH_DISTANCES
                                       if p[1] in NP_DISTANCES])
def test_known_distances_match_numpy_masked_mean(path, name):
  s, t = _pair()
  mask = RNG.uniform(size=(2, 5)) < 0.6
  mask[0, 0] = True
  _, per = _loss(s, t, mask, **_on(path, name))
  ref = NP_DISTANCES[name](s[path], t[path])[mask].mean()
  np.testing.assert_allclose(per[path], ref, rtol=1e-5, atol=1e-7)


def test_both_paths_sum_with_a_distance_each():
  s, t = _pair()
  mask = np.ones((2, 5), bool)
  loss, per = _loss(s, t, mask, cls_distance='kl', reg_distance='l2',
                    temperature=TEMPERATURE)
  want_cls = NP_DISTANCES['kl'](s['cls'], t['cls']).mean()
  want_reg = NP_DISTANCES['l2'](s['reg'], t['reg']).mean()
  np.testing.assert_allclose(per['cls'], want_cls, rtol=1e-5)
  np.testing.assert_allclose(per['reg'], want_reg, rtol=1e-5)
  np.testing.assert_allclose(loss, want_cls + want_reg, rtol=1e-5)


def test_cosine_identical_is_zero_opposite_is_two_scale_free():
  s, _ = _pair()
  mask = np.ones((2, 5), bool)
  neg = {k: -v for k, v in s.items()}
  loss, per = _loss(s, neg, mask)
  np.testing.assert_allclose(per['cls'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(per['reg'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(loss, 4.0, rtol=1e-6)
  _, per = _loss(s, {k: 3.0 * v for k, v in s.items()}, mask, paths='cls')
  assert set(per) == {'cls'}
  np.testing.assert_allclose(per['cls'], 0.0, atol=1e-6)


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


# -------------------------------------------------- the config's checks


def _resolve(**overrides):
  from configs import common  # pylint: disable=g-import-not-at-top
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  for key, value in overrides.items():
    config_lib.set_key(c, key, value)
  return config_lib.resolve(c, 3)


@pytest.mark.parametrize('path,name', PATH_DISTANCES)
def test_config_accepts_each_distance_on_its_path(path, name):
  assert _resolve(**{f'mimic.{path}_distance': name}).mimic[
      f'{path}_distance'] == name


@pytest.mark.parametrize('key,bad', [('mimic.cls_distance', 'emd'),
                                     ('mimic.paths', 'box'),
                                     ('mimic.teacher_grad', 'half')] +
                         [('mimic.reg_distance', d) for d in mimic.CLS_ONLY])
def test_unknown_variants_raise_at_start_up(key, bad):
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match=f"{key}='{bad}'"):
    _resolve(**{key: bad})
