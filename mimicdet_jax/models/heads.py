"""MimicDet heads: refinement module, T-head (two-stage) and S-head (one-stage).

All modules compute in `dtype` (float32 or bfloat16) with float32 parameters.
Feature maps are dicts {level: [B, H_l, W_l, C]}, boxes (x1, y1, x2, y2) in
canvas pixels. Initialisations follow the literature (docs/MODEL.md):
RetinaNet/RPN for the dense convs, detectron2's FastRCNNConvFCHead for the
T-head, zero for the last offset layer of the S-head's micro-network.
"""
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimicdet_jax.models.fpn import c2_xavier_fill  # also the T-head's fcs
from mimicdet_jax.models.layers import Conv1x1
from mimicdet_jax.ops.boxes import decode_deltas
from mimicdet_jax.ops.deform_conv import deform_conv2d
from mimicdet_jax.ops.deform_conv import deform_conv2d_at
from mimicdet_jax.ops.deform_conv import deform_conv2d_at_kernels
from mimicdet_jax.ops.roi_align import multilevel_roi_align
from mimicdet_jax.ops.roi_align import multilevel_roi_align_einsum

# Dense prediction convs (RPN, RetinaNet): N(0, 0.01^2) weights, zero bias.
DENSE_INIT_STD = 0.01
# RetinaNet's prior-probability bias: sigmoid(objectness) = PRIOR_PROB at
# initialisation, so the many negatives do not swamp the first steps.
PRIOR_PROB = 0.01
# detectron2 FastRCNNOutputLayers: cls_score N(0, 0.01^2), bbox_pred N(0, 0.001^2).
T_CLS_INIT_STD = 0.01
T_BOX_INIT_STD = 0.001

normal = nn.initializers.normal
zeros = nn.initializers.zeros
# detectron2's c2_msra_fill (kaiming_normal, fan_out, ReLU) for the T-head convs
# (jax's 'normal' is untruncated, as torch's kaiming_normal_).
c2_msra_fill = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# He initialisation for the ReLU layers of the offset micro-network.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


# t_head.norm and s_head.norm (`_normed_relu`, `SHead`).
HEAD_NORMS = ('none', 'group_norm')
# t_head.roi_align_impl -> `THead`'s RoIAlign: one function in two forms, the
# same values (ops/roi_align.py).
ROI_ALIGN_IMPLS = {'gather': multilevel_roi_align,
                   'einsum': multilevel_roi_align_einsum}


def _normed_relu(x: jax.Array, norm: str, dtype: Any, name: str) -> jax.Array:
  """ReLU(x), or ReLU(GroupNorm(x)) for norm='group_norm' (t_head.norm,
  s_head.norm): 32 groups (fewer when the width needs), over the last axis
  and, for [B, H, W, C] maps, the positions (Wu & He's GN heads).

  The norm keeps each unit's pre-activation centred, so a unit cannot be
  pushed below zero on every input: under AdamW from scratch the plain
  ReLU regression features die (docs/S_HEAD_GAP.md, E12).
  """
  if norm == 'none':
    return nn.relu(x)
  gn = nn.GroupNorm(num_groups=math.gcd(32, x.shape[-1]), epsilon=1e-5,
                    dtype=dtype, param_dtype=jnp.float32, name=name)
  return nn.relu(gn(x))


def _conv(features: int, kernel: int, dtype: Any, kernel_init, name: str,
          bias_init=zeros) -> nn.Module:
  """A stride-1 conv with torch-style symmetric padding k // 2 (1x1: a matmul)."""
  if kernel == 1:
    return Conv1x1(features, kernel_init=kernel_init, bias_init=bias_init,
                   dtype=dtype, name=name)
  return nn.Conv(features, (kernel, kernel), padding=((kernel // 2,) * 2,) * 2,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                 bias_init=bias_init, name=name)


class RefinementModule(nn.Module):
  """3x3 conv + ReLU, then sibling 1x1 convs: objectness (1) and deltas (4).

  One anchor per position; weights shared across the levels it is applied to.
  Deltas are Faster R-CNN (dx, dy, dw, dh) on the anchor, in units of
  refine.stds.
  """
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[int, jax.Array]
               ) -> dict[int, tuple[jax.Array, jax.Array]]:
    """Returns {level: (objectness_logits [B, H, W], deltas [B, H, W, 4])}."""
    hidden = _conv(self.channels, 3, self.dtype, normal(DENSE_INIT_STD), 'conv')
    objectness = _conv(
        1, 1, self.dtype, normal(DENSE_INIT_STD), 'objectness',
        bias_init=nn.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB)))
    box_deltas = _conv(4, 1, self.dtype, normal(DENSE_INIT_STD), 'deltas')
    out = {}
    for level, x in features.items():
      h = nn.relu(hidden(x.astype(self.dtype)))
      out[level] = (objectness(h)[..., 0], box_deltas(h))
    return out


class THead(nn.Module):
  """Two-stage head on RoIAlign features of given boxes (the mimic teacher).

  cls: flatten -> fc fc_dim -> ReLU -> fc fc_dim -> ReLU -> fc num_logits.
  reg: num_convs x (3x3 conv conv_dim + ReLU) -> flatten -> fc fc_dim -> ReLU
       (the reg mimic feature) -> fc 4 (class-agnostic deltas, t_head.stds).
  Each box is pooled from one level of `levels`: the one given per box
  (`box_levels`, the staggered rule of `mimicdet.t_head_box_levels`), or by
  default the FPN rule floor(canonical_level + log2(sqrt(wh) /
  canonical_size)) clamped to levels (`t_head.canonical_*`; needed only
  for that rule).
  """
  levels: Sequence[int]
  num_logits: int
  roi_size: int = 7
  sampling_ratio: int = 2
  canonical_size: Optional[float] = None
  canonical_level: Optional[int] = None
  fc_dim: int = 1024
  num_convs: int = 4
  conv_dim: int = 256
  dtype: Any = jnp.float32
  roi_align_impl: str = 'gather'  # gather | einsum (t_head.roi_align_impl)
  norm: str = 'none'  # none (the paper) | group_norm (t_head.norm)

  @nn.compact
  def __call__(self, features: Mapping[int, jax.Array], boxes: jax.Array,
               box_levels: Optional[jax.Array] = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Args:
      features: {level: [B, H_l, W_l, C]} containing at least `levels`.
      boxes: float32 [B, N, 4], x1y1x2y2 canvas pixels (no gradient needed).
      box_levels: optional int [B, N] level of each box (None: FPN rule).

    Returns:
      t_cls_logits [B, N, num_logits], t_reg_feature [B, N, fc_dim],
      t_deltas [B, N, 4], all float32.
    """
    batch, num_boxes = boxes.shape[:2]
    levels = tuple(self.levels)
    boxes = boxes.astype(jnp.float32)
    rois = ROI_ALIGN_IMPLS[self.roi_align_impl](
        features, boxes, levels, output_size=(self.roi_size, self.roi_size),
        sampling_ratio=self.sampling_ratio, aligned=True,
        canonical_size=self.canonical_size,
        canonical_level=self.canonical_level,
        box_levels=box_levels)  # [B, N, r, r, C]
    rois = rois.reshape((batch * num_boxes,) + rois.shape[2:]).astype(self.dtype)

    dense = lambda n, init, name: nn.Dense(  # pylint: disable=g-long-lambda
        n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init,
        bias_init=zeros, name=name)
    x = rois.reshape(batch * num_boxes, -1)
    act = lambda h, name: _normed_relu(h, self.norm, self.dtype, name)  # pylint: disable=g-long-lambda
    x = act(dense(self.fc_dim, c2_xavier_fill, 'cls_fc1')(x), 'cls_fc1_norm')
    x = act(dense(self.fc_dim, c2_xavier_fill, 'cls_fc2')(x), 'cls_fc2_norm')
    t_cls_logits = dense(self.num_logits, normal(T_CLS_INIT_STD), 'cls_score')(x)

    y = rois
    for i in range(self.num_convs):
      y = act(_conv(self.conv_dim, 3, self.dtype, c2_msra_fill,
                    f'reg_conv{i + 1}')(y), f'reg_conv{i + 1}_norm')
    y = y.reshape(batch * num_boxes, -1)
    t_reg_feature = act(dense(self.fc_dim, c2_xavier_fill, 'reg_fc')(y),
                        'reg_fc_norm')
    t_deltas = dense(4, normal(T_BOX_INIT_STD), 'bbox_pred')(t_reg_feature)

    unflatten = lambda a: a.reshape(batch, num_boxes, -1).astype(jnp.float32)
    return unflatten(t_cls_logits), unflatten(t_reg_feature), unflatten(t_deltas)


class OffsetNet(nn.Module):
  """The S-head's offset micro-network: 1x1 convs on the refinement deltas.

  hidden widths with ReLU, then 2*k*k offsets in torchvision's channel order
  (per kernel tap: dy, dx). The last layer is zero so that training starts
  from an ordinary convolution.
  """
  hidden: Sequence[int]
  num_offsets: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, refine_deltas: jax.Array) -> jax.Array:
    """[B, H, W, 4] -> float32 [B, H, W, num_offsets] (pixels of the level)."""
    x = refine_deltas.astype(self.dtype)
    for i, width in enumerate(self.hidden):
      x = nn.relu(_conv(width, 1, self.dtype, he_normal, f'hidden{i + 1}')(x))
    offsets = _conv(self.num_offsets, 1, self.dtype, zeros, 'offsets')(x)
    # Sampling positions are offset + grid; keep them in float32 so bfloat16
    # does not round them to whole cells on large maps.
    return offsets.astype(jnp.float32)


# s_head.offset_mode: where `GuidedConv`'s deformable taps sample.
OFFSET_MODES = ('learned', 'box', 'box_learned')


def box_aligned_offsets(refine_deltas: jax.Array, kernel_size: int,
                        anchor_scale: float, stds: Sequence[float],
                        scale_clip: float) -> jax.Array:
  """Offsets that put a k x k deformable kernel on the refined box's bins.

  At every position the refinement deltas decode (one box coder,
  `ops.boxes.decode_deltas`) to the refined box around the position's anchor
  (side anchor_scale cells, centred on the cell). Tap (i, j) of the kernel is
  moved from its regular place (y + i - k//2, x + j - k//2) to the centre of
  bin (i, j) of a k x k grid over that box, so the S-head reads the region of
  the box it classifies, as the T-head's RoIAlign does (Cascade RPN's
  adaptive convolution, AlignDet). No parameters.

  Args:
    refine_deltas: [B, H, W, 4] the refinement module's deltas (units of
      `refine.stds`) on the anchors.
    kernel_size: k.
    anchor_scale: anchor side in cells of the level (`model.anchor_scale`).
    stds, scale_clip: `refine.stds`, `box.scale_clip`.
  Returns:
    float32 [B, H, W, 2 k k], torchvision order (per tap row-major: dy, dx),
    in cells of the level.
  """
  k = kernel_size
  half = 0.5 * anchor_scale
  anchor = jnp.array([-half, -half, half, half], jnp.float32)  # cell units
  box = decode_deltas(refine_deltas.astype(jnp.float32), anchor, stds,
                      scale_clip=scale_clip)  # [B, H, W, 4] relative to cell
  centres = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k  # bin centres in [0, 1]
  regular = jnp.arange(k, dtype=jnp.float32) - k // 2
  ys = box[..., 1:2] + centres * (box[..., 3:4] - box[..., 1:2]) - regular
  xs = box[..., 0:1] + centres * (box[..., 2:3] - box[..., 0:1]) - regular
  shape = ys.shape[:-1] + (k, k)
  dy = jnp.broadcast_to(ys[..., :, None], shape)
  dx = jnp.broadcast_to(xs[..., None, :], shape)
  return jnp.stack([dy, dx], axis=-1).reshape(ys.shape[:-1] + (2 * k * k,))


class GuidedConv(nn.Module):
  """k x k conv (+ ReLU) whose sampling grid is deformed by the refinement.

  deformable=True: offsets on the refinement deltas, then deform_conv2d;
  deformable=False: the same kernel as an ordinary conv. `offset_mode`
  (`s_head.offset_mode`): learned = `OffsetNet` (the paper); box =
  `box_aligned_offsets` (no parameters); box_learned = box plus the
  `OffsetNet` output as a learned correction (zero at initialisation).
  `offset_stop_grad` (`s_head.offset_stop_grad`): no gradient from the
  offsets into the refinement deltas. All modes have the same 'kernel'
  [k, k, Cin, features] and 'bias'.
  """
  features: int
  kernel_size: int
  deformable: bool = True
  offset_hidden: Sequence[int] = (64, 128)
  offset_stop_grad: bool = True
  offset_mode: str = 'learned'
  anchor_scale: float = 4.0
  refine_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
  scale_clip: Optional[float] = None  # box.scale_clip; box offset modes only
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, refine_deltas: jax.Array,
               points: Optional[tuple[jax.Array, jax.Array]] = None,
               sample: bool = True):
    """x [B, H, W, Cin], refine_deltas [B, H, W, 4] -> [B, H, W, features].

    With `points` = (map_index int [B, N], yx int [B, N, 2]) the conv runs
    only at those output positions (`ops.deform_conv.deform_conv2d_at`):
    x is a list of maps sharing this conv, refine_deltas [B, N, 4] the
    deltas at the positions, and the result [B, N, features] equals the
    dense output read there. Deformable only. With `sample=False` it
    returns (offsets [B, N, 2 k k], kernel, bias) instead, for a caller
    that samples several GuidedConvs in one gather (`SHead`).
    """
    k = self.kernel_size
    cin = (x[0] if points is not None else x).shape[-1]
    kernel = self.param('kernel', normal(DENSE_INIT_STD),
                        (k, k, cin, self.features), jnp.float32)
    bias = self.param('bias', zeros, (self.features,), jnp.float32)
    kernel = kernel.astype(self.dtype)
    if points is not None:
      if not self.deformable:
        raise ValueError('GuidedConv at points needs deformable=True')
      offsets = self._offsets(refine_deltas[:, :, None, :])[:, :, 0]
      if not sample:
        return offsets, kernel, bias
      y = deform_conv2d_at([m.astype(self.dtype) for m in x], offsets, kernel,
                           points[0], points[1], padding=k // 2)
      return nn.relu(y.astype(self.dtype) + bias.astype(self.dtype))
    x = x.astype(self.dtype)
    if self.deformable:
      offsets = self._offsets(refine_deltas)
      y = deform_conv2d(x, offsets, kernel, stride=1, padding=k // 2)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((k // 2, k // 2),) * 2,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return nn.relu(y.astype(self.dtype) + bias.astype(self.dtype))

  def _offsets(self, refine_deltas: jax.Array) -> jax.Array:
    """[B, H, W, 4] deltas -> float32 [B, H, W, 2 k k] offsets (s_head.offset_mode)."""
    k = self.kernel_size
    if self.offset_stop_grad:
      refine_deltas = jax.lax.stop_gradient(refine_deltas)
    offsets = 0.0
    if self.offset_mode in ('box', 'box_learned'):
      if self.scale_clip is None:
        raise ValueError(f'offset_mode={self.offset_mode!r} needs '
                         'scale_clip (box.scale_clip)')
      offsets = box_aligned_offsets(refine_deltas, k, self.anchor_scale,
                                    self.refine_stds, self.scale_clip)
    if self.offset_mode in ('learned', 'box_learned'):
      offsets = offsets + OffsetNet(self.offset_hidden, 2 * k * k,
                                    dtype=self.dtype,
                                    name='offset_net')(refine_deltas)
    # For diagnostics (experiments/offsets.py): apply with
    # mutable=['intermediates'] to read the offsets; a no-op otherwise.
    self.sow('intermediates', 'offsets', offsets)
    return offsets


class SHead(nn.Module):
  """Dense one-stage head (the mimic student) on the low-resolution levels.

  Guided (deformable) conv with kernel p3_kernel on the finest level and
  `kernel` on the others (one shared weight for those), then, shared across
  all levels: cls 1x1 cls_dim -> ReLU -> 1x1 num_logits; reg 1x1 reg_dim ->
  ReLU (the reg mimic feature) -> 1x1 4 (deltas on the refined box,
  s_head.stds).
  """
  levels: Sequence[int]
  num_logits: int
  channels: int = 256
  p3_kernel: int = 3
  kernel: int = 5
  offset_hidden: Sequence[int] = (64, 128)
  cls_dim: int = 1024
  reg_dim: int = 1024
  deformable: bool = True
  offset_stop_grad: bool = True
  offset_mode: str = 'learned'
  anchor_scale: float = 4.0
  refine_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
  scale_clip: Optional[float] = None  # box.scale_clip; box offset modes only
  dtype: Any = jnp.float32
  norm: str = 'none'  # none (the paper) | group_norm (s_head.norm)

  @nn.compact
  def __call__(self, features: Mapping[int, jax.Array],
               refine_deltas,
               points: Optional[tuple[jax.Array, jax.Array]] = None):
    """Args:
      features: {level: [B, H_l, W_l, C]} for `levels`.
      refine_deltas: {level: [B, H_l, W_l, 4]}, the refinement module's
        deltas; with `points`, [B, N, 4] at the points.
      points: None (dense), or (level_index int [B, N] into `levels`, sorted
        finest first; yx int [B, N, 2]) to run the head only there. Only
        without norm layers (a GroupNorm reads the whole map).

    Returns:
      {level: (s_cls_logits [B, H, W, num_logits], s_reg_feature
      [B, H, W, reg_dim], s_deltas [B, H, W, 4])} in the compute dtype;
      with `points`, one such triple of [B, N, ...] arrays.
    """
    if points is not None and self.norm != 'none':
      raise ValueError(f's_head.norm={self.norm!r} reads whole maps; the '
                       'S-head cannot run at points')
    guided = lambda k, name: GuidedConv(  # pylint: disable=g-long-lambda
        self.channels, k, deformable=self.deformable,
        offset_hidden=self.offset_hidden,
        offset_stop_grad=self.offset_stop_grad,
        offset_mode=self.offset_mode, anchor_scale=self.anchor_scale,
        refine_stds=self.refine_stds, scale_clip=self.scale_clip,
        dtype=self.dtype, name=name)
    finest = min(self.levels)
    fine_conv = guided(self.p3_kernel, f'p{finest}_conv')
    coarse_conv = guided(self.kernel, 'coarse_conv')  # shared by P4..P7
    init = normal(DENSE_INIT_STD)
    cls_hidden = _conv(self.cls_dim, 1, self.dtype, init, 'cls_hidden')
    cls_logits = _conv(self.num_logits, 1, self.dtype, init, 'cls_logits')
    reg_hidden = _conv(self.reg_dim, 1, self.dtype, init, 'reg_hidden')
    reg_deltas = _conv(4, 1, self.dtype, init, 'deltas')
    if self.norm == 'group_norm':  # one GroupNorm per layer, shared by levels
      cls_norm = nn.GroupNorm(num_groups=math.gcd(32, self.cls_dim),
                              epsilon=1e-5, dtype=self.dtype,
                              param_dtype=jnp.float32, name='cls_hidden_norm')
      reg_norm = nn.GroupNorm(num_groups=math.gcd(32, self.reg_dim),
                              epsilon=1e-5, dtype=self.dtype,
                              param_dtype=jnp.float32, name='reg_hidden_norm')
    else:  # 'none'
      cls_norm = reg_norm = lambda h: h
    def head(x):
      s_reg_feature = nn.relu(reg_norm(reg_hidden(x)))
      return (cls_logits(nn.relu(cls_norm(cls_hidden(x)))), s_reg_feature,
              reg_deltas(s_reg_feature))

    if points is not None:
      # Pointwise from here on (1x1 layers, no norm): each position on the
      # finest level through its conv, the others through the shared one,
      # in one gather of each position's own taps.
      level_index, yx = points
      on_finest = level_index == list(self.levels).index(finest)
      maps = [features[l].astype(self.dtype) for l in self.levels]
      convs = [conv(maps, refine_deltas, points, sample=False)
               for conv in (fine_conv, coarse_conv)]
      y = deform_conv2d_at_kernels(
          maps, [c[0] for c in convs], [c[1] for c in convs],
          (~on_finest).astype(jnp.int32), level_index, yx,
          [self.p3_kernel // 2, self.kernel // 2])
      bias = jnp.where(on_finest[..., None], convs[0][2], convs[1][2])
      return head(nn.relu(y.astype(self.dtype) + bias.astype(self.dtype)))
    out = {}
    for level in self.levels:
      conv = fine_conv if level == finest else coarse_conv
      out[level] = head(conv(features[level], refine_deltas[level]))
    return out
