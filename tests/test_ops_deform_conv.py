"""Deformable conv against a NumPy loop of torchvision's definition, ordinary
convolutions (zero and integer offsets), torchvision's outputs and finite
differences."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mimicdet_jax import ops

_REFS = os.path.join(os.path.dirname(__file__), 'data', 'torchvision_ops.npz')


def _bilinear_zero_ref(img, y, x):
  """torchvision deform_conv2d's bilinear_interpolate: [H, W, C] -> [C]."""
  h, w = img.shape[:2]
  if y <= -1 or y >= h or x <= -1 or x >= w:
    return np.zeros(img.shape[2])
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  ly, lx = y - y0, x - x0
  out = np.zeros(img.shape[2])
  for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
    for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
      if 0 <= yy < h and 0 <= xx < w:
        out += wy * wx * img[yy, xx]
  return out


def _deform_conv_ref(x, offset, kernel, stride, pad, dil, groups, mask=None):
  x, offset, kernel = (a.astype(np.float64) for a in (x, offset, kernel))
  b, h, w, cin = x.shape
  kh, kw, cpg, cout = kernel.shape
  ho = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
  wo = (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1
  og = offset.shape[-1] // (2 * kh * kw)
  cg = cin // og
  opg = cout // groups
  out = np.zeros((b, ho, wo, cout))
  for n in range(b):
    for oy in range(ho):
      for ox in range(wo):
        cols = np.zeros((kh, kw, cin))
        for g in range(og):
          for i in range(kh):
            for j in range(kw):
              t = i * kw + j
              dy = offset[n, oy, ox, g * 2 * kh * kw + 2 * t]
              dx = offset[n, oy, ox, g * 2 * kh * kw + 2 * t + 1]
              y = oy * stride - pad + i * dil + dy
              xx = ox * stride - pad + j * dil + dx
              v = _bilinear_zero_ref(x[n, :, :, g * cg:(g + 1) * cg], y, xx)
              if mask is not None:
                v = v * mask[n, oy, ox, g * kh * kw + t]
              cols[i, j, g * cg:(g + 1) * cg] = v
        for gi in range(groups):
          c = cols[:, :, gi * cpg:(gi + 1) * cpg]
          for o in range(opg):
            out[n, oy, ox, gi * opg + o] = np.sum(c * kernel[:, :, :, gi * opg + o])
  return out


def _conv(x, kernel, stride, pad, dil, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
      rhs_dilation=(dil, dil), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision='highest')


def _out_hw(h, w, k, stride, pad, dil):
  return ((h + 2 * pad - dil * (k - 1) - 1) // stride + 1,
          (w + 2 * pad - dil * (k - 1) - 1) // stride + 1)


# (Cin, Cout, k, stride, pad, dilation, groups, offset groups, mask)
_CASES = [
    (4, 3, 3, 1, 1, 1, 1, 1, False),
    (4, 4, 3, 2, 1, 2, 2, 2, False),
    (2, 2, 5, 1, 2, 1, 1, 1, True),
    (6, 4, 3, 1, 0, 1, 2, 3, True),
]


@pytest.mark.parametrize('case', _CASES)
def test_deform_conv_matches_loop(case):
  cin, cout, k, stride, pad, dil, groups, og, use_mask = case
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, cin)).astype(np.float32)
  ho, wo = _out_hw(7, 6, k, stride, pad, dil)
  offset = rng.normal(0, 2, (2, ho, wo, 2 * og * k * k)).astype(np.float32)
  offset[0, 0, 0] = 30.0   # every tap far outside the image
  offset[1, -1, -1, ::2] = -9.5  # partly outside
  kernel = rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32)
  mask = (rng.uniform(size=(2, ho, wo, og * k * k)).astype(np.float32)
          if use_mask else None)
  got = np.asarray(jax.jit(
      lambda *a: ops.deform_conv2d(*a[:3], stride, pad, dil, groups,
                                   mask=a[3]))(x, offset, kernel, mask))
  ref = _deform_conv_ref(x, offset, kernel, stride, pad, dil, groups, mask)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  assert np.all(got[0, 0, 0] == 0)


@pytest.mark.parametrize('stride,pad,dil,groups', [(1, 1, 1, 1), (2, 2, 2, 2)])
def test_zero_offsets_equal_ordinary_conv(stride, pad, dil, groups):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4 // groups, 6)).astype(np.float32)
  ho, wo = _out_hw(9, 8, 3, stride, pad, dil)
  offset = np.zeros((2, ho, wo, 18), np.float32)
  got = ops.deform_conv2d(x, offset, kernel, stride, pad, dil, groups)
  np.testing.assert_allclose(got, _conv(x, kernel, stride, pad, dil, groups),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize('dy,dx', [(1, -2), (-3, 0), (20, 1)])
def test_integer_offsets_equal_shifted_conv(dy, dx):
  rng = np.random.default_rng(2)
  h, w, pad, margin = 8, 9, 1, 24
  x = rng.normal(size=(1, h, w, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  offset = np.zeros((1, h, w, 18), np.float32)
  offset[..., 0::2] = dy
  offset[..., 1::2] = dx
  # Every tap moved by (dy, dx) is the ordinary convolution with its window
  # moved by (dy, dx): a shifted slice of a VALID conv on a zero-padded image.
  x_big = np.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0)))
  full = np.asarray(_conv(x_big, kernel, 1, 0, 1, 1))
  y0, x0 = margin - pad + dy, margin - pad + dx
  expected = full[:, y0:y0 + h, x0:x0 + w]
  got = ops.deform_conv2d(x, offset, kernel, padding=pad)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  if dy == 20:
    assert np.all(np.asarray(got) == 0)  # every tap below the image


def _tv_case(refs, i):
  cin, cout, k, stride, pad, dil, groups, og = (int(v) for v in
                                                refs[f'dcn{i}_cfg'])
  args = [jnp.asarray(refs[f'dcn{i}_{n}'], jnp.float32)
          for n in ('x', 'offset', 'kernel')]
  return args, (stride, pad, dil, groups)


@pytest.mark.parametrize('budget,cases', [(1 << 25, (0, 1, 2, 3)),
                                          (9216, (1, 2))])
def test_matches_torchvision_values_and_gradients(budget, cases):
  """budget=9216 forces the row-chunked (lax.map + checkpoint) path: one-row
  chunks for case 1, two-row chunks with a padded last chunk for case 2."""
  refs = np.load(_REFS)
  for i in cases:
    args, cfg = _tv_case(refs, i)

    @jax.jit
    def value_and_vjp(x, o, k, cot, cfg=cfg):
      y, vjp = jax.vjp(
          lambda *a: ops.deform_conv2d(*a, *cfg, max_gather_elements=budget),
          x, o, k)
      return y, vjp(cot)

    y, grads = value_and_vjp(*args, jnp.asarray(refs[f'dcn{i}_cot'],
                                                 jnp.float32))
    np.testing.assert_allclose(y, refs[f'dcn{i}_y'], atol=1e-4, rtol=0)
    for g, name in zip(grads, ('gx', 'goffset', 'gkernel')):
      np.testing.assert_allclose(g, refs[f'dcn{i}_{name}'], atol=1e-4, rtol=0,
                                 err_msg=f'case {i} {name}')


def test_gradients_finite_differences():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(1, 5, 6, 4)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)))
    # Keep sample points 0.2 px away from integer coordinates, where the
    # bilinear interpolation has kinks; some point outside the image.
    frac = rng.uniform(0.2, 0.8, (1, 5, 6, 36))
    whole = rng.integers(-3, 3, (1, 5, 6, 36))
    offset = jnp.asarray(whole + frac)
    mask = jnp.asarray(rng.uniform(size=(1, 5, 6, 18)))
    fn = jax.jit(lambda a, o, k, m: ops.deform_conv2d(
        a, o, k, padding=1, feature_group_count=2, mask=m))
    check_grads(fn, (x, offset, kernel, mask), order=1, modes=('rev',),
                atol=1e-5, rtol=1e-5, eps=1e-6)


def test_deform_conv_at_points_equals_the_dense_map_read_there():
  """deform_conv2d_at on two maps of different sizes (one shared kernel, 2
  offset groups) against the dense deform_conv2d of each map (torchvision's
  values and gradients, above) read at the same positions, each position's
  offsets placed at it: values, and the gradients w.r.t. the maps, the
  offsets and the kernel."""
  rng = np.random.default_rng(3)
  b, cin, cout, k, g, n = 2, 8, 5, 3, 2, 7
  maps = [jnp.asarray(rng.normal(size=(b, 9, 11, cin)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, 4, 6, cin)), jnp.float32)]
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
  map_index = rng.integers(0, 2, size=(b, n))
  sizes = [m.shape[1:3] for m in maps]
  points = np.zeros((b, n, 2), np.int64)  # distinct positions per map
  for i in range(b):
    for m in range(2):
      js = np.flatnonzero(map_index[i] == m)
      flat = rng.choice(sizes[m][0] * sizes[m][1], size=len(js), replace=False)
      points[i, js] = np.stack(np.unravel_index(flat, sizes[m]), axis=-1)
  offset = rng.normal(scale=2.0, size=(b, n, 2 * g * k * k)).astype(np.float32)
  cot = rng.normal(size=(b, n, cout)).astype(np.float32)

  def at(mp, o, kern):
    return ops.deform_conv.deform_conv2d_at(
        mp, o, kern, jnp.asarray(map_index), jnp.asarray(points),
        padding=k // 2)

  def dense(mp, o, kern):
    """[B, N, Cout]: each map's dense conv, every position's offsets at it."""
    out = jnp.zeros((b, n, cout))
    for m in range(2):
      ii, jj = np.nonzero(map_index == m)
      yy, xx = points[ii, jj, 0], points[ii, jj, 1]
      dense_offset = jnp.zeros(maps[m].shape[:3] + (2 * g * k * k,))
      dense_offset = dense_offset.at[ii, yy, xx].set(o[ii, jj])
      full = ops.deform_conv.deform_conv2d(mp[m], dense_offset, kern,
                                           padding=k // 2)
      out = out.at[ii, jj].set(full[ii, yy, xx])
    return out

  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda mp, o, kern: jnp.sum(f(mp, o, kern) * cot), argnums=(0, 1, 2)))
  args = (maps, jnp.asarray(offset), kernel)
  out = jax.jit(at)(*args)
  assert out.shape == (b, n, cout)
  np.testing.assert_allclose(out, jax.jit(dense)(*args), rtol=1e-5, atol=1e-5)
  (_, got), (_, want) = loss(at)(*args), loss(dense)(*args)
  for g_got, g_want in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-4)
