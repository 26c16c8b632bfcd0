"""Detection losses against NumPy closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax.losses import detection


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_bce(x, y):
  p = _np_sigmoid(x)
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _np_focal(x, y, alpha, gamma):
  p = _np_sigmoid(x)
  pt = np.where(y == 1, p, 1 - p)
  at = np.where(y == 1, alpha, 1 - alpha)
  return -at * (1 - pt)**gamma * np.log(pt)


def _np_ce(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


RNG = np.random.default_rng(0)


def _jit(fn, **static):
  """jit with keyword arguments fixed (eager op-by-op dispatch is slow)."""
  return jax.jit(functools.partial(fn, **static))


def test_elementwise_losses():
  x = RNG.normal(size=(3, 7)).astype(np.float32) * 3
  y = (RNG.uniform(size=(3, 7)) > 0.5).astype(np.float32)
  np.testing.assert_allclose(jax.jit(detection.sigmoid_bce)(x, y), _np_bce(x, y),
                             rtol=1e-5)
  np.testing.assert_allclose(_jit(detection.sigmoid_focal, alpha=0.25, gamma=2.0)(x, y),
                             _np_focal(x, y, 0.25, 2.0), rtol=1e-4, atol=1e-7)
  logits = RNG.normal(size=(4, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 1])
  np.testing.assert_allclose(jax.jit(detection.softmax_ce)(logits, labels),
                             _np_ce(logits, labels), rtol=1e-5)
  a, b = RNG.normal(size=(2, 6, 4)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(detection.l1)(a, b), np.abs(a - b).sum(-1),
                             rtol=1e-6)
  d = np.array([-3.0, -0.5, 0.0, 0.2, 2.0], np.float32)
  np.testing.assert_allclose(jax.jit(detection.smooth_l1)(d, 0.0 * d),
                             [2.5, 0.125, 0.0, 0.02, 1.5], rtol=1e-6)
  # bfloat16 inputs are computed in float32.
  assert jax.jit(detection.softmax_ce)(
      logits.astype(jnp.bfloat16), labels).dtype == jnp.float32
  # Its gradient is the closed form softmax - one_hot (no scatter), also
  # with logits far apart.
  wide = logits * np.array([1.0, 1.0, 1.0, 300.0], np.float32)[:, None]
  grad = jax.jit(jax.grad(lambda z: jnp.sum(detection.softmax_ce(z, labels))))(
      wide)
  p = np.exp(wide - wide.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(grad, p - np.eye(5)[labels], atol=1e-6)


def test_refine_loss_bce_and_focal():
  b, a = 2, 30
  logits = RNG.normal(size=(b, a)).astype(np.float32)
  deltas = RNG.normal(size=(b, a, 4)).astype(np.float32)
  targets = RNG.normal(size=(b, a, 4)).astype(np.float32)
  positive = RNG.uniform(size=(b, a)) < 0.2
  sampled = positive | (RNG.uniform(size=(b, a)) < 0.3)
  out = _jit(detection.refine_loss, cls_loss='bce', focal_alpha=0.25,
             focal_gamma=2.0)(logits, deltas, positive, targets, sampled)
  y = positive.astype(np.float32)
  np.testing.assert_allclose(out['cls'], _np_bce(logits, y)[sampled].mean(),
                             rtol=1e-5)
  l1_ref = np.abs(deltas - targets).sum(-1)[positive].mean()
  np.testing.assert_allclose(out['reg'], l1_ref, rtol=1e-5)
  assert int(out['num_positives']) == positive.sum()
  focal_fn = _jit(detection.refine_loss, sampled=None, cls_loss='focal',
                  focal_alpha=0.25, focal_gamma=2.0)
  focal = focal_fn(logits, deltas, positive, targets)
  np.testing.assert_allclose(
      focal['cls'], _np_focal(logits, y, 0.25, 2.0).sum() / positive.sum(),
      rtol=1e-4)
  # No positives: finite, regression 0.
  none = focal_fn(logits, deltas, np.zeros((b, a), bool), targets)
  assert np.isfinite(none['cls']) and float(none['reg']) == 0.0


def test_t_head_loss():
  logits = RNG.normal(size=(2, 6, 4)).astype(np.float32)
  labels = np.array([[1, 0, 3, 0, 0, 2], [0, 0, 2, 0, 1, 0]])
  valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  deltas, targets = RNG.normal(size=(2, 2, 6, 4)).astype(np.float32)
  out = jax.jit(detection.t_head_loss)(logits, deltas, labels, targets, valid)
  np.testing.assert_allclose(out['cls'], _np_ce(logits, labels)[valid].mean(),
                             rtol=1e-5)
  fg = valid & (labels > 0)
  np.testing.assert_allclose(
      out['reg'], np.abs(deltas - targets).sum(-1)[fg].sum() / valid.sum(),
      rtol=1e-5)


def test_ohem_keeps_known_top_losses():
  losses = jnp.array([[0.1, 5.0, 0.3, 4.0, 9.0, 0.2],
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
  valid = jnp.array([[1, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], bool)
  kept = np.asarray(jax.jit(detection.ohem_mask, static_argnums=2)(
      losses, valid, 3))
  # Row 0: 9.0 is padding; the top three valid are 5.0, 4.0, 0.3.
  np.testing.assert_array_equal(kept[0], [0, 1, 1, 1, 0, 0])
  # Row 1: only two valid -> both kept, nothing invalid.
  np.testing.assert_array_equal(kept[1], [1, 1, 0, 0, 0, 0])


def test_s_head_loss_is_mean_of_top_k_and_gradient_only_there():
  b, p, l = 2, 10, 4
  logits = RNG.normal(size=(b, p, l)).astype(np.float32) * 2
  deltas, targets = RNG.normal(size=(2, b, p, 4)).astype(np.float32)
  labels = RNG.integers(0, l, size=(b, p))
  valid = RNG.uniform(size=(b, p)) < 0.8
  valid[:, :4] = True
  k = 3
  out = jax.jit(detection.s_head_loss, static_argnums=5)(
      logits, deltas, labels, targets, valid, k)
  per = _np_ce(logits, labels) + np.where(
      labels > 0, np.abs(deltas - targets).sum(-1), 0.0)
  top = [np.sort(per[i][valid[i]])[::-1][:k] for i in range(b)]
  np.testing.assert_allclose(out['total'], np.concatenate(top).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(out['cls'] + out['reg'], out['total'], rtol=1e-6)
  assert int(out['num_kept']) == 2 * k
  g = jax.jit(jax.grad(lambda z: detection.s_head_loss(
      z, deltas, labels, targets, valid, k)['total']))(logits)
  nonzero = np.abs(np.asarray(g)).sum(-1) > 0
  for i in range(b):
    threshold = top[i][-1]
    np.testing.assert_array_equal(nonzero[i], valid[i] & (per[i] >= threshold))


def test_s_head_loss_with_given_samples_is_their_mean():
  b, p, l = 2, 10, 4
  logits = RNG.normal(size=(b, p, l)).astype(np.float32) * 2
  deltas, targets = RNG.normal(size=(2, b, p, 4)).astype(np.float32)
  labels = RNG.integers(0, l, size=(b, p))
  valid = np.ones((b, p), bool)
  valid[1, 7:] = False
  sampled = RNG.uniform(size=(b, p)) < 0.4
  sampled[1, 8] = True  # sampled but invalid: left out
  out = jax.jit(detection.s_head_loss, static_argnums=5)(
      logits, deltas, labels, targets, valid, 3, sampled)
  per = _np_ce(logits, labels) + np.where(
      labels > 0, np.abs(deltas - targets).sum(-1), 0.0)
  np.testing.assert_allclose(out['total'], per[sampled & valid].mean(),
                             rtol=1e-5)
  assert int(out['num_kept']) == (sampled & valid).sum()
