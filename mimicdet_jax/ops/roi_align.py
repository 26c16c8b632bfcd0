"""RoIAlign (torchvision semantics) and its FPN multi-level form, NHWC.

Definition (torchvision.ops.roi_align, `sampling_ratio` > 0): a box
(x1, y1, x2, y2) in image pixels becomes, on a feature map of stride s,
start = x1 / s - 0.5 (the -0.5 only when aligned=True), extent (x2 - x1) / s
(forced >= 1 when aligned=False). It is cut into oh x ow bins; each bin is
the mean of sampling_ratio^2 bilinear samples at the centres of a regular
sub-grid. A sample with y < -1 or y > H (or x < -1 or x > W) is 0; otherwise
its coordinates are clamped into the map (y <= 0 -> 0; y >= H - 1 -> H - 1)
before bilinear interpolation.

Implementation: bilinear weights factor into a y part and an x part, so each
box needs 2*oh*sr row indices and 2*ow*sr column indices; one gather of the
(2 oh sr) x (2 ow sr) grid of C-vectors, a multiply by the outer product of
the weights and a sum over the sub-grid give the bins. No dense
[H, W]-sized weight matrices, no Python loop over boxes. Gradients flow to
the features (a scatter-add); boxes get none, as in torchvision.

`multilevel_roi_align_einsum` computes the same values without a gather:
per level, the bilinear weights of a box become two dense one-hot weight
matrices, rows [oh, H_l] and columns [ow, W_l], and the bins are two
contractions with the map (matmuls). Its gradient is the transposed
matmuls, with no scatter; the price is FLOPs proportional to every box times
every level's area (see its docstring and docs/BENCHMARKS.md for where
each form wins).
"""
import functools
from typing import Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax.ops.boxes import box_area

Array = jnp.ndarray


def _axis_samples(start: Array, extent: Array, size: Array, num_bins: int,
                  sampling_ratio: int) -> Tuple[Array, Array]:
  """Rows (or columns) and weights of the samples along one axis.

  Args:
    start, extent: [...] in feature-map cells.
    size: [...] the map's height (or width) as float.
  Returns:
    indices int32 [..., num_bins, 2 * sr] and weights [..., num_bins, 2 * sr];
    the weights already hold the 1/sr of the average and the outside test.
  """
  sr = sampling_ratio
  bin_size = (extent / num_bins)[..., None, None]
  offsets = (jnp.arange(num_bins, dtype=start.dtype)[:, None] +
             (jnp.arange(sr, dtype=start.dtype)[None, :] + 0.5) / sr)
  coord = start[..., None, None] + offsets * bin_size  # [..., bins, sr]
  size = size[..., None, None]
  inside = (coord >= -1.0) & (coord <= size)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord)
  at_end = low >= size - 1
  low = jnp.where(at_end, size - 1, low)
  high = jnp.where(at_end, size - 1, low + 1)
  coord = jnp.where(at_end, low, coord)
  frac = coord - low
  weights = jnp.stack([1.0 - frac, frac], axis=-1)
  weights = weights * (inside[..., None] / sr).astype(weights.dtype)
  indices = jnp.stack([low, high], axis=-1).astype(jnp.int32)
  shape = coord.shape[:-1] + (2 * sr,)
  return indices.reshape(shape), weights.reshape(shape)


def _roi_align_flat(table: Array, boxes: Array, scale: Array,
                    height: Array, width: Array, base: Array,
                    output_size: Tuple[int, int], sampling_ratio: int,
                    aligned: bool) -> Array:
  """RoIAlign on maps flattened into the rows of one table; every box
  carries its own map geometry.

  Args:
    table: [R, C], the pixels of one or several [H, W, C] maps, each map's
      rows contiguous and row-major.
    boxes: [B, N, 4] image pixels.
    scale, height, width, base: [B, N]: spatial scale, map height and width
      and the row of `table` that holds pixel (0, 0) of the box's map.
  Returns:
    [B, N, oh, ow, C].
  """
  oh, ow = output_size
  if sampling_ratio <= 0:
    raise ValueError('sampling_ratio must be > 0 (static shapes); got '
                     f'{sampling_ratio}.')
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  offset = 0.5 if aligned else 0.0
  x1 = boxes[..., 0] * scale - offset
  y1 = boxes[..., 1] * scale - offset
  roi_w = boxes[..., 2] * scale - offset - x1
  roi_h = boxes[..., 3] * scale - offset - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  rows, wy = _axis_samples(y1, roi_h, height.astype(jnp.float32), oh,
                           sampling_ratio)  # [B, N, oh, 2sr]
  cols, wx = _axis_samples(x1, roi_w, width.astype(jnp.float32), ow,
                           sampling_ratio)  # [B, N, ow, 2sr]
  per_box = (..., None, None, None, None)
  # [B, N, oh, ow, 2sr, 2sr]: each bin's 4 sr^2 neighbours contiguous, so
  # the gathered rows reshape into the contraction with no transpose (nor
  # one of their float32 cotangent in the backward).
  index = (base[per_box] + rows[..., :, None, :, None] * width[per_box] +
           cols[..., None, :, None, :])
  weight = wy[..., :, None, :, None] * wx[..., None, :, None, :]
  b, n = boxes.shape[:2]
  values = jnp.take(table, index.reshape(-1), axis=0, mode='clip')
  values = values.reshape((b, n, oh, ow, -1, table.shape[-1]))
  weight = weight.reshape(b, n, oh, ow, -1)
  # Blend the 4 sr^2 neighbours of each bin as a contraction (faster on CPU
  # than multiply + sum), accumulating in at least float32; 'highest' keeps
  # TF32 out of it on GPUs. (A bfloat16 result, the same values on CPU,
  # spares XLA:TPU a float32 copy of the gathered rows but raised the R50
  # step's HBM per chip: docs/BENCHMARKS.md, "The T-head's blend".)
  out = jnp.einsum('...fc,...f->...c', values, weight.astype(values.dtype),
                   precision='highest',
                   preferred_element_type=jnp.promote_types(values.dtype,
                                                            jnp.float32))
  return out.astype(values.dtype)


def roi_align(features: Array, boxes: Array,
              output_size: Tuple[int, int] = (7, 7),
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = True) -> Array:
  """torchvision.ops.roi_align on NHWC features, boxes per image.

  Args:
    features: [B, H, W, C].
    boxes: [B, N, 4] x1y1x2y2 in image pixels (padding boxes are fine; they
      give finite values that the caller masks).
    output_size: (oh, ow).
    spatial_scale: 1 / stride of `features`.
    sampling_ratio: samples per bin side; must be > 0 (static shapes).
    aligned: torchvision's aligned flag (True: pixel centres at +0.5).
  Returns:
    [B, N, oh, ow, C] in the features' dtype. Differentiable w.r.t. features.
  """
  b, h, w, c = features.shape
  n = boxes.shape[1]
  full = lambda v: jnp.full((b, n), v)
  base = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None] * (h * w),
                          (b, n))
  return _roi_align_flat(features.reshape(b * h * w, c), boxes,
                         full(jnp.float32(spatial_scale)), full(h), full(w),
                         base, tuple(output_size), sampling_ratio, aligned)


def fpn_levels(boxes: Array, min_level: int, max_level: int,
               canonical_size: float, canonical_level: int) -> Array:
  """FPN level of each box [..., 4] -> int32 [...].

  k = clamp(floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)),
  min_level, max_level) (FPN paper eq. 1, detectron2's eps; the paper's 224
  and 4 are `t_head.canonical_size` / `t_head.canonical_level`). Degenerate
  boxes (area 0) go to min_level.
  """
  size = jnp.sqrt(box_area(boxes.astype(jnp.float32)))
  level = jnp.floor(canonical_level +
                    jnp.log2(size / canonical_size + 1e-8))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _level_inputs(features, boxes, levels, canonical_size, canonical_level,
                  box_levels):
  """(maps in level order, level index [B, N] into `levels`)."""
  levels = tuple(int(l) for l in levels)
  if levels != tuple(range(levels[0], levels[0] + len(levels))):
    raise ValueError(f'levels must be consecutive and increasing: {levels}')
  if isinstance(features, Mapping):
    maps = [features[l] for l in levels]
  else:
    maps = list(features)
  if len(maps) != len(levels):
    raise ValueError(f'{len(maps)} feature maps for levels {levels}')
  if box_levels is None:
    if canonical_size is None or canonical_level is None:
      raise ValueError('the FPN level rule (box_levels=None) needs '
                       'canonical_size and canonical_level')
    box_levels = fpn_levels(boxes, levels[0], levels[-1], canonical_size,
                            canonical_level)
  return maps, jnp.clip(box_levels - levels[0], 0, len(levels) - 1)


def multilevel_roi_align(
    features: Union[Mapping[int, Array], Sequence[Array]],
    boxes: Array,
    levels: Sequence[int],
    output_size: Tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    aligned: bool = True,
    canonical_size: Optional[float] = None,
    canonical_level: Optional[int] = None,
    box_levels: Optional[Array] = None) -> Array:
  """RoIAlign of each box on its FPN level (stride 2**level).

  The maps of all levels are flattened and stacked into the rows of one
  [R, C] table, level after level and within a level image after image,
  and each box gathers from its own image's map of its own level: the cost
  is one copy of the pyramid (about 4/3 of the finest level) plus one
  single-level RoIAlign of N boxes, not one RoIAlign per level. (Stacked
  level-major, each level's [B, H, W, C] map is a block of rows as it lies
  in memory, so the stacking and the split of its gradient are plain
  copies; a [B, P, C] table, all levels of an image after each other, cost
  the T-head 1.34x the bytes on XLA:TPU: docs/BENCHMARKS.md "The T-head's
  level table".)

  Args:
    features: dict level -> [B, H_l, W_l, C], or a sequence of maps in the
      order of `levels`.
    boxes: [B, N, 4] x1y1x2y2 image pixels.
    levels: consecutive levels, e.g. (2, 3, 4, 5, 6).
    output_size, sampling_ratio, aligned: as `roi_align`.
    canonical_size, canonical_level: the FPN level rule (see `fpn_levels`),
      needed when box_levels is None.
    box_levels: optional int [B, N] levels to use instead of the rule.
  Returns:
    [B, N, oh, ow, C].
  """
  maps, idx = _level_inputs(features, boxes, levels, canonical_size,
                            canonical_level, box_levels)
  levels = tuple(int(l) for l in levels)
  b, c = maps[0].shape[0], maps[0].shape[-1]
  heights = np.array([m.shape[1] for m in maps], np.int32)
  widths = np.array([m.shape[2] for m in maps], np.int32)
  sizes = heights * widths
  bases = b * np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  table = jnp.concatenate([m.reshape(-1, c) for m in maps], axis=0)
  scale = jnp.exp2(-(idx + levels[0]).astype(jnp.float32))
  image = jnp.arange(b, dtype=jnp.int32)[:, None]
  base = jnp.asarray(bases)[idx] + image * jnp.asarray(sizes)[idx]
  return _roi_align_flat(table, boxes, scale, jnp.asarray(heights)[idx],
                         jnp.asarray(widths)[idx], base, tuple(output_size),
                         sampling_ratio, aligned)


def _one_hot_weights(start: Array, extent: Array, size: int, num_bins: int,
                     sampling_ratio: int, on_level: Array) -> Array:
  """Dense bilinear weights along one axis: [..., num_bins, size].

  Row r of bin i holds the summed weight of pixel r over the bin's samples
  (already / sr and zero outside), exactly what `_axis_samples` gives as
  (index, weight) pairs; boxes not `on_level` get all-zero rows.
  """
  indices, weights = _axis_samples(start, extent,
                                   jnp.full(start.shape, size, jnp.float32),
                                   num_bins, sampling_ratio)
  weights = weights * on_level[..., None, None].astype(weights.dtype)
  hot = indices[..., None] == jnp.arange(size, dtype=jnp.int32)
  return jnp.sum(jnp.where(hot, weights[..., None], 0.0), axis=-2)


def multilevel_roi_align_einsum(
    features: Union[Mapping[int, Array], Sequence[Array]],
    boxes: Array,
    levels: Sequence[int],
    output_size: Tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    aligned: bool = True,
    canonical_size: Optional[float] = None,
    canonical_level: Optional[int] = None,
    box_levels: Optional[Array] = None) -> Array:
  """`multilevel_roi_align` as matmuls with one-hot bilinear weights.

  Same arguments, same values (torchvision's RoIAlign), same gradient with
  respect to the features, but neither a gather in the forward pass nor a
  scatter in the backward pass. For each level l (a static loop): every
  box gets a row-weight matrix Wy [oh, H_l] and a column-weight matrix
  Wx [ow, W_l] (zero for boxes on other levels), and
  out[n, i, j] += sum_{h, w} Wy[n, i, h] Wx[n, j, w] F_l[h, w]
  as two contractions, the larger spatial axis first contracted against the
  smaller weight matrix so the intermediate is [N, oh, W_l, C] or
  [N, ow, H_l, C], whichever is smaller. This is the form of the TPU Mask
  R-CNN / scenic RoIAlign: dense matmuls suit the MXU, and the gradient is
  the transposed matmuls.

  Cost: about N C oh sum_l H_l W_l multiply-adds (every box against every
  pixel of every level, for oh = ow), against the gather's 4 sr^2 N C oh ow
  plus the gathered bytes: it pays where N is small (the T-head's 128
  sampled RoIs per image), the maps are small, or gathers are slow (TPU),
  not for thousands of boxes on a large P2 on a CPU. Accumulates in float32 (the intermediate too), returns the
  features' dtype.

  Args:
    features: dict level -> [B, H_l, W_l, C], or a sequence of maps in the
      order of `levels`.
    boxes: [B, N, 4] x1y1x2y2 image pixels (no gradient flows to them).
    levels: consecutive levels, e.g. (2, 3, 4, 5, 6).
    output_size, sampling_ratio, aligned: as `roi_align`.
    canonical_size, canonical_level: the FPN level rule (see `fpn_levels`),
      needed when box_levels is None.
    box_levels: optional int [B, N] levels to use instead of the rule.
  Returns:
    [B, N, oh, ow, C].
  """
  maps, idx = _level_inputs(features, boxes, levels, canonical_size,
                            canonical_level, box_levels)
  levels = tuple(int(l) for l in levels)
  oh, ow = output_size
  if sampling_ratio <= 0:
    raise ValueError('sampling_ratio must be > 0 (static shapes); got '
                     f'{sampling_ratio}.')
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  dtype = maps[0].dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  offset = 0.5 if aligned else 0.0
  out = None
  for i, (level, fmap) in enumerate(zip(levels, maps)):
    h, w = fmap.shape[1:3]
    scale = 2.0 ** -level
    x1 = boxes[..., 0] * scale - offset
    y1 = boxes[..., 1] * scale - offset
    roi_w = boxes[..., 2] * scale - offset - x1
    roi_h = boxes[..., 3] * scale - offset - y1
    if not aligned:
      roi_w = jnp.maximum(roi_w, 1.0)
      roi_h = jnp.maximum(roi_h, 1.0)
    on_level = idx == i
    wy = _one_hot_weights(y1, roi_h, h, oh, sampling_ratio,
                          on_level).astype(dtype)  # [B, N, oh, H]
    wx = _one_hot_weights(x1, roi_w, w, ow, sampling_ratio,
                          on_level).astype(dtype)  # [B, N, ow, W]
    contract = functools.partial(jnp.einsum, precision='highest',
                                 preferred_element_type=acc)
    if oh * w <= ow * h:
      rows = contract('bnih,bhwc->bniwc', wy, fmap)
      part = contract('bniwc,bnjw->bnijc', rows, wx.astype(acc))
    else:
      cols = contract('bnjw,bhwc->bnjhc', wx, fmap)
      part = contract('bnjhc,bnih->bnijc', cols, wy.astype(acc))
    out = part if out is None else out + part
  return out.astype(dtype)
