"""Deformable convolution (v1, optional v2 mask) as bilinear im2col + matmul.

Definition (torchvision.ops.deform_conv2d, written NHWC): for output position
(ho, wo), kernel tap (i, j) and offset group g the input is sampled at

  y = ho * stride_h - pad_h + i * dilation_h + dy[g, i, j, ho, wo]
  x = wo * stride_w - pad_w + j * dilation_w + dx[g, i, j, ho, wo]

by bilinear interpolation with zeros outside the image (each of the four
neighbouring pixels contributes only if it lies inside), optionally times the
modulation mask (v2), for the input channels of offset group g. The samples
form an im2col tensor [B, Ho, Wo, kh*kw, Cin] that one einsum with the kernel
(grouped by `feature_group_count`) turns into the output, so the FLOPs run on
the matrix units.

Offset channels follow torchvision: channel = g * 2*kh*kw + 2 * (i*kw + j) +
{0: dy, 1: dx}; mask channels: g * kh*kw + i*kw + j.

Memory: the im2col of a whole map can be large (5x5 taps, 256 channels on P4 of
an 800x1333 canvas, batch 2: ~250 MB in float32, more while it is built), so
the output rows are processed in chunks with `lax.map`, each chunk under
`jax.checkpoint` so the backward pass also only holds one chunk's im2col.
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Array = jnp.ndarray
IntPair = Union[int, Sequence[int]]

# Chunk the rows so one chunk's im2col holds at most this many elements
# (16 Mi elements = 64 MB in float32).
DEFAULT_MAX_IM2COL_ELEMENTS = 1 << 24


def _pair(v: IntPair) -> Tuple[int, int]:
  if isinstance(v, int):
    return v, v
  v = tuple(int(e) for e in v)
  if len(v) != 2:
    raise ValueError(f'expected an int or a pair, got {v}')
  return v


def _sample_rows(x_flat: Array, offset: Array, mask: Optional[Array],
                 row_ids: Array, *, in_hw: Tuple[int, int],
                 kernel_hw: Tuple[int, int], stride: Tuple[int, int],
                 padding: Tuple[int, int], dilation: Tuple[int, int],
                 offset_groups: int) -> Array:
  """Bilinear im2col for a block of output rows.

  Args:
    x_flat: [B, G * H * W, Cg] input, offset group major.
    offset: [B, R, Wo, G * K * 2]; mask: [B, R, Wo, G * K] or None.
    row_ids: int [R] output rows of this block.
  Returns:
    [B, R, Wo, K, G * Cg] samples, tap major then input channel.
  """
  h, w = in_hw
  kh, kw = kernel_hw
  k = kh * kw
  g = offset_groups
  b, r, wo = offset.shape[:3]
  # Sample positions in at least float32 even for bfloat16 offsets.
  ftype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.reshape(b, r, wo, g, k, 2).astype(ftype)
  tap_y = (jnp.arange(kh) * dilation[0]).repeat(kw).astype(ftype)
  tap_x = jnp.tile(jnp.arange(kw) * dilation[1], kh).astype(ftype)
  base_y = (row_ids * stride[0] - padding[0]).astype(ftype)
  base_x = (jnp.arange(wo) * stride[1] - padding[1]).astype(ftype)
  py = base_y[None, :, None, None, None] + tap_y + off[..., 0]  # [B,R,Wo,G,K]
  px = base_x[None, None, :, None, None] + tap_x + off[..., 1]
  y0 = jnp.floor(py)
  x0 = jnp.floor(px)
  ly = py - y0
  lx = px - x0
  group_base = (jnp.arange(g) * (h * w))[:, None]  # [G, 1]
  dtype = x_flat.dtype
  total = None
  for cy, wy in ((y0, 1.0 - ly), (y0 + 1.0, ly)):
    for cx, wx in ((x0, 1.0 - lx), (x0 + 1.0, lx)):
      inside = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
      weight = jnp.where(inside, wy * wx, 0.0)
      if mask is not None:
        weight = weight * mask.reshape(b, r, wo, g, k).astype(ftype)
      yi = jnp.clip(cy, 0, h - 1).astype(jnp.int32)
      xi = jnp.clip(cx, 0, w - 1).astype(jnp.int32)
      index = group_base + yi * w + xi  # [B, R, Wo, G, K]
      values = jax.vmap(lambda f, i: jnp.take(f, i, axis=0, mode='clip'))(
          x_flat, index.reshape(b, -1))
      values = values.reshape(index.shape + (x_flat.shape[-1],))
      term = values * weight[..., None].astype(dtype)
      total = term if total is None else total + term
  # [B, R, Wo, G, K, Cg] -> [B, R, Wo, K, G * Cg]
  total = jnp.moveaxis(total, 3, 4)
  return total.reshape(b, r, wo, k, -1)


def deform_conv2d(x: Array, offset: Array, kernel: Array,
                  stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, feature_group_count: int = 1,
                  mask: Optional[Array] = None,
                  max_im2col_elements: int = DEFAULT_MAX_IM2COL_ELEMENTS
                  ) -> Array:
  """torchvision.ops.deform_conv2d in NHWC / HWIO layout (no bias).

  Args:
    x: [B, H, W, Cin].
    offset: [B, Ho, Wo, 2 * G * kh * kw], torchvision channel order (per
      offset group, per tap, dy then dx), in input pixels. G (offset groups)
      is inferred and must divide Cin.
    kernel: [kh, kw, Cin / feature_group_count, Cout].
    stride, padding, dilation: int or (h, w).
    feature_group_count: convolution groups (as lax.conv_general_dilated).
    mask: optional [B, Ho, Wo, G * kh * kw] modulation (DCNv2).
    max_im2col_elements: output rows are processed in chunks whose im2col
      has at most this many elements (memory bound; speed only).
  Returns:
    [B, Ho, Wo, Cout], Ho = (H + 2 pad_h - dil_h (kh - 1) - 1) // stride_h + 1.
    Differentiable in x, offset, kernel (and mask).
  """
  stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
  b, h, w, cin = x.shape
  kh, kw, cin_per_group, cout = kernel.shape
  k = kh * kw
  groups = feature_group_count
  ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
  wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
  if cin_per_group * groups != cin or cout % groups:
    raise ValueError(f'kernel {kernel.shape} does not fit Cin={cin} with '
                     f'{groups} groups')
  if offset.shape[:3] != (b, ho, wo) or offset.shape[3] % (2 * k):
    raise ValueError(f'offset {offset.shape} does not fit output '
                     f'{(b, ho, wo)} with {kh}x{kw} taps')
  offset_groups = offset.shape[3] // (2 * k)
  if cin % offset_groups:
    raise ValueError(f'{offset_groups} offset groups do not divide Cin={cin}')
  if mask is not None and mask.shape != (b, ho, wo, offset_groups * k):
    raise ValueError(f'mask {mask.shape} should be {(b, ho, wo, offset_groups * k)}')

  cg = cin // offset_groups
  x_flat = x.reshape(b, h * w, offset_groups, cg).transpose(0, 2, 1, 3)
  x_flat = x_flat.reshape(b, offset_groups * h * w, cg)
  w_mat = kernel.reshape(k, cin_per_group, groups, cout // groups)
  sample = functools.partial(
      _sample_rows, in_hw=(h, w), kernel_hw=(kh, kw), stride=stride,
      padding=padding, dilation=dilation, offset_groups=offset_groups)

  def rows_out(x_flat, w_mat, offset, mask, row_ids):
    cols = sample(x_flat, offset, mask, row_ids)  # [B, R, Wo, K, Cin]
    cols = cols.reshape(cols.shape[:4] + (groups, cin_per_group))
    out = jnp.einsum('brwkgc,kcgo->brwgo', cols, w_mat.astype(cols.dtype))
    return out.reshape(out.shape[:3] + (cout,))

  per_row = b * wo * k * cin
  rows = max(1, min(ho, max_im2col_elements // per_row))
  if rows >= ho:
    return rows_out(x_flat, w_mat, offset, mask, jnp.arange(ho))

  num_chunks = -(-ho // rows)
  pad = num_chunks * rows - ho

  def split(a):  # [B, Ho, ...] -> [num_chunks, B, rows, ...]
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    a = a.reshape((b, num_chunks, rows) + a.shape[2:])
    return jnp.moveaxis(a, 1, 0)

  row_ids = jnp.arange(num_chunks * rows).reshape(num_chunks, rows)
  chunk_fn = jax.checkpoint(rows_out)
  out = jax.lax.map(
      lambda args: chunk_fn(x_flat, w_mat, *args),
      (split(offset), None if mask is None else split(mask), row_ids))
  out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * rows, wo, cout)
  return out[:, :ho]
