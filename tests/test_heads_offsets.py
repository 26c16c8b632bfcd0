"""Box-aligned deformable offsets (s_head.offset_mode) against a NumPy loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimicdet_jax.models import heads
from mimicdet_jax.ops.deform_conv import deform_conv2d

CLIP = math.log(1000.0 / 16)


def np_box_taps(deltas, y, x, stride, k, anchor_scale, stds):
  """Sampling positions (row, col index of the map) of the k x k taps: the bin
  centres of the refined box, from a pixel-space decode of one position."""
  d = np.asarray(deltas, np.float64) * np.asarray(stds)
  a = anchor_scale * stride
  acx, acy = (x + 0.5) * stride, (y + 0.5) * stride  # anchor = cell centre
  cx, cy = acx + d[0] * a, acy + d[1] * a
  w, h = a * math.exp(min(d[2], CLIP)), a * math.exp(min(d[3], CLIP))
  x1, y1 = cx - w / 2, cy - h / 2
  rows = [(y1 + (i + 0.5) * h / k) / stride - 0.5 for i in range(k)]
  cols = [(x1 + (j + 0.5) * w / k) / stride - 0.5 for j in range(k)]
  return rows, cols


@pytest.mark.parametrize('k,stds', [(3, (1.0, 1.0, 1.0, 1.0)),
                                    (5, (0.5, 0.5, 0.2, 0.2))])
def test_box_aligned_offsets_put_taps_on_the_box_bins(k, stds):
  rng = np.random.default_rng(k)
  b, h, w, stride, scale = 2, 4, 5, 16, 4.0
  deltas = rng.normal(0, 0.7, (b, h, w, 4)).astype(np.float32)
  deltas[0, 0, 0, 2] = 30.0  # clipped width
  off = np.asarray(heads.box_aligned_offsets(jnp.asarray(deltas), k, scale,
                                             stds, CLIP))
  assert off.shape == (b, h, w, 2 * k * k)
  off = off.reshape(b, h, w, k, k, 2)
  for n in range(b):
    for y in range(h):
      for x in range(w):
        rows, cols = np_box_taps(deltas[n, y, x], y, x, stride, k, scale, stds)
        for i in range(k):
          for j in range(k):
            # deform_conv2d (stride 1, padding k//2) samples tap (i, j) of
            # output (y, x) at (y - k//2 + i + dy, x - k//2 + j + dx).
            np.testing.assert_allclose(y - k // 2 + i + off[n, y, x, i, j, 0],
                                       rows[i], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(x - k // 2 + j + off[n, y, x, i, j, 1],
                                       cols[j], rtol=1e-5, atol=1e-4)


def _guided(mode):
  return heads.GuidedConv(6, 3, offset_hidden=(4, 4), offset_mode=mode,
                          anchor_scale=4.0, scale_clip=CLIP)


def test_offset_modes_wiring():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 7, 5)), jnp.float32)
  d = jnp.asarray(rng.normal(0, 0.5, (1, 6, 7, 4)), jnp.float32)
  out = {}
  for mode in heads.OFFSET_MODES:
    variables = _guided(mode).init(jax.random.PRNGKey(0), x, d)
    assert ('offset_net' in variables['params']) == (mode != 'box')
    out[mode] = (variables, np.asarray(_guided(mode).apply(variables, x, d)))
  params = out['box'][0]['params']
  offsets = heads.box_aligned_offsets(d, 3, 4.0, (1.0,) * 4, CLIP)
  want = jax.nn.relu(deform_conv2d(x, offsets, params['kernel'], padding=1) +
                     params['bias'])
  np.testing.assert_allclose(out['box'][1], want, rtol=1e-5, atol=1e-5)
  # The micro-net's last layer starts at zero: box_learned starts as box.
  np.testing.assert_allclose(out['box_learned'][1], out['box'][1], atol=1e-6)
  assert np.abs(out['learned'][1] - out['box'][1]).max() > 1e-3


@pytest.mark.parametrize('mode', heads.OFFSET_MODES)
def test_s_head_at_points_equals_the_dense_head_read_there(mode):
  """SHead with `points` (what MimicDet.s_head_at runs in the training loss)
  against the dense SHead read at the same positions, on three levels (the
  finest with its own 3x3 conv, two sharing the 5x5 one), every offset mode,
  with all parameters perturbed so that the learned offsets are not zero."""
  rng = np.random.default_rng(1)
  levels = (3, 4, 5)
  sizes = {3: (8, 10), 4: (4, 5), 5: (2, 3)}
  feats = {l: jnp.asarray(rng.normal(size=(2,) + sizes[l] + (6,)), jnp.float32)
           for l in levels}
  deltas = {l: jnp.asarray(rng.normal(0, 0.5, (2,) + sizes[l] + (4,)),
                           jnp.float32) for l in levels}
  head = heads.SHead(levels=levels, num_logits=3, channels=6, p3_kernel=3,
                     kernel=5, offset_hidden=(4,), cls_dim=7, reg_dim=5,
                     offset_mode=mode, anchor_scale=4.0, scale_clip=CLIP)
  # Jitted: one compile per program, not one per op (12.9 against 24.4 s
  # of CPU for the three modes, eager, on the 2-core machine).
  variables = jax.jit(head.init)(jax.random.PRNGKey(0), feats, deltas)
  variables = jax.tree.map(
      lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
      variables)
  apply = jax.jit(head.apply)
  dense = apply(variables, feats, deltas)
  n = 9
  level_index = rng.integers(0, 3, size=(2, n))
  yx = np.array([[[rng.integers(0, sizes[levels[i]][0]),
                   rng.integers(0, sizes[levels[i]][1])] for i in row]
                 for row in level_index])
  deltas_at = np.stack([[deltas[levels[i]][b, y, x] for i, (y, x) in
                         zip(level_index[b], yx[b])] for b in range(2)])
  at = apply(variables, feats, jnp.asarray(deltas_at),
              (jnp.asarray(level_index, jnp.int32), jnp.asarray(yx, jnp.int32)))
  for part in range(3):
    want = np.stack([[dense[levels[i]][part][b, y, x] for i, (y, x) in
                      zip(level_index[b], yx[b])] for b in range(2)])
    np.testing.assert_allclose(at[part], want, rtol=1e-5, atol=1e-5)
  if mode != 'box_learned':  # the other modes' offsets are parts of this one's
    return
  # Gradients w.r.t. every parameter and the features, of a weighted sum of
  # the three outputs at the positions: through the points path, and
  # through the dense head read there.
  cots = [rng.normal(size=a.shape).astype(np.float32) for a in at]
  bi = np.arange(2)[:, None]

  def read_dense(v, f):
    out = head.apply(v, f, deltas)
    total = 0.0
    for part in range(3):
      for i, level in enumerate(levels):
        on = level_index == i
        read = out[level][part][bi, yx[..., 0], yx[..., 1]]
        total += jnp.sum(jnp.where(on[..., None], read * cots[part], 0.0))
    return total

  def read_at(v, f):
    out = head.apply(v, f, jnp.asarray(deltas_at), (
        jnp.asarray(level_index, jnp.int32), jnp.asarray(yx, jnp.int32)))
    return sum(jnp.sum(o * c) for o, c in zip(out, cots))

  got = jax.jit(jax.grad(read_at, argnums=(0, 1)))(variables, feats)
  want = jax.jit(jax.grad(read_dense, argnums=(0, 1)))(variables, feats)
  for g_got, g_want in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-4)
