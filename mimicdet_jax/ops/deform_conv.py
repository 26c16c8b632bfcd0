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
the matrix units. Each sample's four neighbours are one row gather from a
map of 2x2 neighbourhoods (4x the input), blended by a small contraction
(about 3x faster on CPU than four single-pixel gathers).

Offset channels follow torchvision: channel = g * 2*kh*kw + 2 * (i*kw + j) +
{0: dy, 1: dx}; mask channels: g * kh*kw + i*kw + j.

Memory: the im2col of a whole map can be large (5x5 taps, 256 channels on P4 of
an 800x1333 canvas, batch 2: ~215 MB in float32, and the gathered
neighbourhoods it is blended from are 4x that), so the output rows are
processed in chunks with `lax.map`, each chunk under `jax.checkpoint` so the
backward pass also only holds one chunk's buffers.
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Array = jnp.ndarray
IntPair = Union[int, Sequence[int]]

# Chunk the rows so one chunk's gathered neighbourhoods (4x its im2col) hold
# at most this many elements (32 Mi elements = 128 MB in float32).
DEFAULT_MAX_GATHER_ELEMENTS = 1 << 25


def _pair(v: IntPair) -> Tuple[int, int]:
  if isinstance(v, int):
    return v, v
  v = tuple(int(e) for e in v)
  if len(v) != 2:
    raise ValueError(f'expected an int or a pair, got {v}')
  return v


def _neighbourhoods(x: Array, offset_groups: int) -> Array:
  """[B, H, W, Cin] -> [B*G*(H+1)*(W+1), 4, Cg]: row (m, y, x) holds the 2x2
  neighbourhood of the zero-padded pixel (y, x), i.e. input pixels
  (y-1..y, x-1..x), so a sample's four neighbours are one row gather.
  Costs 4x the input in memory, far less than the im2col."""
  b, h, w, cin = x.shape
  g = offset_groups
  x = x.reshape(b, h, w, g, cin // g).transpose(0, 3, 1, 2, 4)
  x = jnp.pad(x.reshape(b * g, h, w, cin // g), ((0, 0), (1, 1), (1, 1), (0, 0)))
  quads = jnp.stack([x[:, :-1, :-1], x[:, :-1, 1:], x[:, 1:, :-1],
                     x[:, 1:, 1:]], axis=3)  # [B*G, H+1, W+1, 4, Cg]
  return quads.reshape(-1, 4, cin // g)


def _bilinear_taps(quads: Array, py: Array, px: Array, map_row: Array,
                   h, w, mask: Optional[Array]) -> Array:
  """Bilinear samples from the 2x2-neighbourhood table, zeros outside.

  Args:
    quads: [M, 4, Cg], the rows of one or more `_neighbourhoods` tables.
    py, px: float [..., G, K] sample positions in input pixels.
    map_row: int [..., G, 1], the first row of the sample's map in `quads`.
    h, w: the map's height and width (ints, or int arrays like map_row).
    mask: [..., G, K] modulation or None.
  Returns:
    [..., G, K, Cg].
  """
  y0 = jnp.floor(py)
  x0 = jnp.floor(px)
  ly = py - y0
  lx = px - x0
  # Weights of the 2x2 neighbourhood; a neighbour outside the image weighs 0.
  weights = []
  for cy, wy in ((y0, 1.0 - ly), (y0 + 1.0, ly)):
    for cx, wx in ((x0, 1.0 - lx), (x0 + 1.0, lx)):
      inside = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
      weights.append(jnp.where(inside, wy * wx, 0.0))
  weight = jnp.stack(weights, axis=-1)  # [..., G, K, 4]
  if mask is not None:
    weight = weight * mask[..., None].astype(weight.dtype)
  # One row gather from the 2x2-neighbourhood map (see `_neighbourhoods`).
  # Neighbourhoods wholly outside get clamped indices but all-zero weights.
  ys = jnp.clip(y0 + 1, 0, h).astype(jnp.int32)
  xs = jnp.clip(x0 + 1, 0, w).astype(jnp.int32)
  index = map_row + ys * (w + 1) + xs  # [..., G, K]
  patches = jnp.take(quads, index.reshape(-1), axis=0, mode='clip')
  patches = patches.reshape(index.shape + (4, -1))
  # A contraction, not multiply + sum: ~3x faster on CPU, and the
  # multiply + reduce form crashed XLA:CPU's backward for one-row chunks
  # (jax 0.10.2). 'highest' keeps TF32 out of the interpolation on GPUs.
  return jnp.einsum('...fc,...f->...c', patches, weight.astype(patches.dtype),
                    precision='highest')


def _sample_rows(quads: Array, offset: Array, mask: Optional[Array],
                 row_ids: Array, *, in_hw: Tuple[int, int],
                 kernel_hw: Tuple[int, int], stride: Tuple[int, int],
                 padding: Tuple[int, int], dilation: Tuple[int, int],
                 offset_groups: int) -> Array:
  """Bilinear im2col for a block of output rows.

  Args:
    quads: [B * G * (H + 1) * (W + 1), 4, Cg] from `_neighbourhoods`.
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
  tap_y, tap_x = _taps(kernel_hw, dilation, ftype)
  base_y = (row_ids * stride[0] - padding[0]).astype(ftype)
  base_x = (jnp.arange(wo) * stride[1] - padding[1]).astype(ftype)
  py = base_y[None, :, None, None, None] + tap_y + off[..., 0]  # [B,R,Wo,G,K]
  px = base_x[None, None, :, None, None] + tap_x + off[..., 1]
  maps = (jnp.arange(b)[:, None, None, None, None] * g +
          jnp.arange(g)[:, None])  # [B, 1, 1, G, 1]
  total = _bilinear_taps(
      quads, py, px, maps * ((h + 1) * (w + 1)), h, w,
      None if mask is None else mask.reshape(b, r, wo, g, k))
  # [B, R, Wo, G, K, Cg] -> [B, R, Wo, K, G * Cg]
  total = jnp.moveaxis(total, 3, 4)
  return total.reshape(b, r, wo, k, -1)


def _taps(kernel_hw, dilation, ftype) -> Tuple[Array, Array]:
  """Each tap's regular (y, x) place relative to the window's corner, [K]."""
  kh, kw = kernel_hw
  tap_y = (jnp.arange(kh) * dilation[0]).repeat(kw).astype(ftype)
  tap_x = jnp.tile(jnp.arange(kw) * dilation[1], kh).astype(ftype)
  return tap_y, tap_x


def deform_conv2d_at(maps: Sequence[Array], offset: Array, kernel: Array,
                     map_index: Array, points: Array, padding: IntPair = 0,
                     dilation: IntPair = 1) -> Array:
  """`deform_conv2d` (stride 1, one convolution group, no mask) evaluated
  only at given output positions of one or more maps sharing its kernel.

  Output (b, n) equals `deform_conv2d(maps[m], o, kernel, padding=...,
  dilation=...)[b, y, x]` with m = map_index[b, n], (y, x) = points[b, n]
  and o any offset map that holds offset[b, n] at (y, x): an output
  position reads only the input and its own offsets. A loss that reads a
  dense head at a few positions (the S-head at its proposals) pays for
  those alone.

  Args:
    maps: [B, H_m, W_m, Cin] each; their output maps are the same size
      (stride 1, padding k // 2 keeps it).
    offset: [B, N, 2 * G * kh * kw], torchvision channel order.
    kernel: [kh, kw, Cin, Cout].
    map_index: int [B, N] which map each position is on.
    points: int [B, N, 2] (y, x) output position in that map.
    padding, dilation: int or (h, w).
  Returns:
    [B, N, Cout].
  """
  return deform_conv2d_at_kernels(
      maps, [offset], [kernel], jnp.zeros_like(map_index), map_index, points,
      [padding], dilation)


def deform_conv2d_at_kernels(maps: Sequence[Array], offsets: Sequence[Array],
                             kernels: Sequence[Array], kernel_index: Array,
                             map_index: Array, points: Array,
                             paddings: Sequence[IntPair],
                             dilation: IntPair = 1) -> Array:
  """`deform_conv2d_at` with several kernels, each position through one.

  Output (b, n) equals `deform_conv2d_at(maps, offsets[v], kernels[v],
  map_index, points, paddings[v], dilation)[b, n]` for v = kernel_index[b,
  n]. Every position gathers the taps of its own kernel only (the larger
  kernel's count, the smaller's extra slots weighing zero) from one table
  of all the maps: the S-head's 3x3 conv on P3 and 5x5 conv on P4-P7 cost
  25 taps per position, not 9 + 25 (docs/BENCHMARKS.md, "The S-head at its
  positions, one kernel each").

  Args:
    maps: [B, H_m, W_m, Cin] each.
    offsets: per kernel [B, N, 2 * G * kh_v * kw_v] (the same G for all).
    kernels: per kernel [kh_v, kw_v, Cin, Cout].
    kernel_index: int [B, N] which kernel each position goes through.
    map_index, points: as `deform_conv2d_at`.
    paddings: per kernel, int or (h, w).
    dilation: int or (h, w), shared.
  Returns:
    [B, N, Cout].
  """
  dilation = _pair(dilation)
  cin, cout = kernels[0].shape[2:]
  ks = [kern.shape[0] * kern.shape[1] for kern in kernels]
  k_max = max(ks)
  b, n = offsets[0].shape[:2]
  g = offsets[0].shape[2] // (2 * ks[0])
  for off, kern, k in zip(offsets, kernels, ks):
    if (off.shape[2] != 2 * g * k or kern.shape[2:] != (cin, cout) or
        any(m.shape[-1] != cin for m in maps)):
      raise ValueError(f'offset {off.shape}, kernel {kern.shape} or maps '
                       f'{[m.shape for m in maps]} do not fit')
  tables = [_neighbourhoods(m, g) for m in maps]
  quads = jnp.concatenate(tables, axis=0) if len(tables) > 1 else tables[0]
  first_rows = [0]
  for t in tables[:-1]:
    first_rows.append(first_rows[-1] + t.shape[0])
  ftype = jnp.promote_types(offsets[0].dtype, jnp.float32)
  heights = jnp.array([m.shape[1] for m in maps], jnp.int32)[map_index]
  widths = jnp.array([m.shape[2] for m in maps], jnp.int32)[map_index]
  first = jnp.array(first_rows, jnp.int32)[map_index]  # [B, N]
  per_image = (heights + 1) * (widths + 1) * g
  maps_row = (first + jnp.arange(b)[:, None] * per_image)[..., None, None] + (
      jnp.arange(g)[:, None] * ((heights + 1) * (widths + 1))[..., None, None])
  py = px = None
  for v, (off, kern, k) in enumerate(zip(offsets, kernels, ks)):
    padding = _pair(paddings[v])
    off = off.reshape(b, n, g, k, 2).astype(ftype)
    tap_y, tap_x = _taps(kern.shape[:2], dilation, ftype)
    py_v = (points[..., 0] - padding[0]).astype(ftype)[..., None, None] + tap_y + off[..., 0]
    px_v = (points[..., 1] - padding[1]).astype(ftype)[..., None, None] + tap_x + off[..., 1]
    # A smaller kernel's extra slots sample two pixels above and left of the
    # map: all four neighbours outside, weight zero.
    pad = ((0, 0), (0, 0), (0, 0), (0, k_max - k))
    py_v = jnp.pad(py_v, pad, constant_values=-2.0)
    px_v = jnp.pad(px_v, pad, constant_values=-2.0)
    on = (kernel_index == v)[..., None, None]
    py = py_v if py is None else jnp.where(on, py_v, py)
    px = px_v if px is None else jnp.where(on, px_v, px)
  h = heights[..., None, None]
  w = widths[..., None, None]
  cols = _bilinear_taps(quads, py, px, maps_row, h, w, None)  # [B,N,G,K,Cg]
  cols = jnp.moveaxis(cols, 2, 3).reshape(b * n, k_max, cin)
  out = None
  for v, (kern, k) in enumerate(zip(kernels, ks)):
    out_v = jnp.dot(cols[:, :k].reshape(b * n, k * cin),
                    kern.reshape(k * cin, cout).astype(cols.dtype))
    on = (kernel_index.reshape(b * n) == v)[:, None]
    out = out_v if out is None else jnp.where(on, out_v, out)
  return out.reshape(b, n, cout)


def deform_conv2d(x: Array, offset: Array, kernel: Array,
                  stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, feature_group_count: int = 1,
                  mask: Optional[Array] = None,
                  max_gather_elements: int = DEFAULT_MAX_GATHER_ELEMENTS
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
    max_gather_elements: output rows are processed in chunks whose gathered
      2x2 neighbourhoods (4x the im2col) have at most this many elements
      (memory bound; the result does not depend on it).
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
  quads = _neighbourhoods(x, offset_groups)
  w_mat = kernel.reshape(k, cin_per_group, groups, cout // groups)
  sample = functools.partial(
      _sample_rows, in_hw=(h, w), kernel_hw=(kh, kw), stride=stride,
      padding=padding, dilation=dilation, offset_groups=offset_groups)

  def rows_out(quads, w_mat, offset, mask, row_ids):
    cols = sample(quads, offset, mask, row_ids)  # [B, R, Wo, K, Cin]
    if groups == 1:
      # One 2-D matmul [B R Wo, K Cin] x [K Cin, Cout]: XLA:CPU ran the
      # 5-D einsum below with the im2col transposed first (the demo's P3
      # and P4 convs ~2x faster forward, ~0.87x fwd + bwd; docs/BENCHMARKS.md,
      # "Layouts XLA:CPU chose around the matmuls").
      out = jnp.dot(cols.reshape(-1, k * cin),
                    w_mat.reshape(k * cin, cout).astype(cols.dtype))
      return out.reshape(cols.shape[:3] + (cout,))
    cols = cols.reshape(cols.shape[:4] + (groups, cin_per_group))
    out = jnp.einsum('brwkgc,kcgo->brwgo', cols, w_mat.astype(cols.dtype))
    return out.reshape(out.shape[:3] + (cout,))

  # A batch that is symbolic (jax.export) chunks as one image would: the
  # chunk size must be a Python int.
  per_row = (b if isinstance(b, int) else 1) * wo * k * cin * 4
  rows = max(1, min(ho, max_gather_elements // per_row))
  if rows >= ho:
    return rows_out(quads, w_mat, offset, mask, jnp.arange(ho))

  num_chunks = -(-ho // rows)
  pad = num_chunks * rows - ho

  def split(a):  # [B, Ho, ...] -> [num_chunks, B, rows, ...]
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    a = a.reshape((b, num_chunks, rows) + a.shape[2:])
    return jnp.moveaxis(a, 1, 0)

  row_ids = jnp.arange(num_chunks * rows).reshape(num_chunks, rows)
  chunk_fn = jax.checkpoint(rows_out)
  out = jax.lax.map(
      lambda args: chunk_fn(quads, w_mat, *args),
      (split(offset), None if mask is None else split(mask), row_ids))
  out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * rows, wo, cout)
  return out[:, :ho]
