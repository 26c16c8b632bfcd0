"""The MimicDet network: backbone, staggered pyramid, refinement, S-head, T-head.

`model.apply(variables, images, train=...)` runs everything but the T-head and
returns the dict of docs/ARCHITECTURE.md ("Model outputs");
`model.apply(variables, t_features, boxes, method=MimicDet.t_head)` runs the
T-head on given boxes. Inference only uses the first call, so the T-head costs
nothing at test time.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from mimicdet_jax.models.backbones import ResNet
from mimicdet_jax.models.fpn import FPN
from mimicdet_jax.models.heads import RefinementModule
from mimicdet_jax.models.heads import SHead
from mimicdet_jax.models.heads import THead


def t_head_levels(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Levels the T-head reads: model.t_levels, or model.s_levels if not staggered."""
  model = config.model
  return tuple(model.t_levels if model.staggered else model.s_levels)


# model.dtype: the compute dtype (`MimicDet.setup`); params stay float32.
DTYPES = ('float32', 'bfloat16')
# t_head.level_rule (`t_head_box_levels`).
T_HEAD_LEVEL_RULES = ('staggered', 'fpn')


def t_head_box_levels(config: ml_collections.ConfigDict,
                      anchor_level: jax.Array,
                      origin: jax.Array) -> Optional[jax.Array]:
  """Pyramid level the T-head pools each box from (SPEC 2, "T-head input").

  `t_head.level_rule`:
    staggered (default): one level finer than the box's origin, i.e. P_l of
      the S-head's set -> P_(l-1) of the T-head's (the shift is
      min(s_levels) - min(t_levels): 1 when staggered, 0 when
      `model.staggered` is False, where the T-head reads the S-head's levels).
      An appended gt box's origin is the position of its refinement level
      (targets.refine `gt_origin`), so it is pooled from that level - 1.
    fpn: None, and `THead` applies the FPN rule
      floor(4 + log2(sqrt(wh) / 224)) to the box itself.

  Args:
    config: reads t_head.level_rule, model.s_levels, model.t_levels,
      model.staggered.
    anchor_level: int [A], `anchors.dense_anchors(...)['level']`.
    origin: int [B, N] flat dense index each box came from.
  Returns:
    int32 [B, N] levels within the T-head's levels, or None (fpn rule).
  """
  if config.t_head.level_rule == 'fpn':
    return None
  t_levels = t_head_levels(config)
  shift = min(config.model.s_levels) - min(t_levels)
  level = jnp.asarray(anchor_level, jnp.int32)[origin] - shift
  return jnp.clip(level, min(t_levels), max(t_levels)).astype(jnp.int32)


def s_head_sparse(config: ml_collections.ConfigDict) -> bool:
  """Whether the training loss can run the S-head at its samples only
  (`MimicDet.s_head_at`): a deformable S-head without norm layers, whose
  every layer after its input maps is per position."""
  return (config.s_head.sparse_train and config.s_head.deformable and
          config.s_head.norm == 'none')


def flatten_levels(per_level: list[jax.Array]) -> jax.Array:
  """[B, H_l, W_l, ...] per level -> [B, A, ...], row-major within each level.

  The order is the proposal origin of `anchors.dense_anchors`.
  """
  return jnp.concatenate(
      [x.reshape((x.shape[0], -1) + x.shape[3:]) for x in per_level], axis=1)


def gather_at(dense: jax.Array, index: jax.Array) -> jax.Array:
  """Reads dense outputs [B, A, ...] at flat positions index [B, N] -> [B, N, ...].

  A position is a proposal's origin in the `flatten_levels` order (the
  losses read the S-head at their samples, post-processing at its top-k).
  """
  index = index.reshape(index.shape + (1,) * (dense.ndim - 2))
  return jnp.take_along_axis(dense, index, axis=1)


class MimicDet(nn.Module):
  """Attributes: config, the whole resolved config (FrozenConfigDict) with
  model.num_classes and s_head.num_logits positive."""
  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.model.dtype)
    self.s_levels = tuple(c.model.s_levels)
    self.t_levels = t_head_levels(c)
    self.backbone = ResNet(c.model.backbone.arch,
                           frozen_stages=c.model.backbone.frozen_stages,
                           remat=c.model.backbone.remat,
                           norm=c.model.backbone.norm, dtype=dtype,
                           grouped_conv=c.model.backbone.grouped_conv)
    self.fpn = FPN(c.model.fpn_channels,
                   levels=tuple(sorted(set(self.t_levels) | set(self.s_levels))),
                   dtype=dtype)
    self.refinement = RefinementModule(c.refine.channels, dtype=dtype)
    self.s_head_net = SHead(
        levels=self.s_levels,
        num_logits=c.s_head.num_logits,
        channels=c.s_head.channels,
        p3_kernel=c.s_head.p3_kernel,
        kernel=c.s_head.kernel,
        offset_hidden=tuple(c.s_head.offset_hidden),
        cls_dim=c.s_head.cls_dim,
        reg_dim=c.s_head.reg_dim,
        deformable=c.s_head.deformable,
        offset_stop_grad=c.s_head.offset_stop_grad,
        offset_mode=c.s_head.offset_mode,
        anchor_scale=c.model.anchor_scale,
        refine_stds=tuple(c.refine.stds),
        scale_clip=c.box.scale_clip,
        dtype=dtype,
        norm=c.s_head.norm)
    self.t_head_net = THead(
        levels=self.t_levels,
        num_logits=c.model.num_classes + 1,
        roi_size=c.t_head.roi_size,
        sampling_ratio=c.t_head.sampling_ratio,
        canonical_size=c.t_head.canonical_size,
        canonical_level=c.t_head.canonical_level,
        fc_dim=c.t_head.fc_dim,
        num_convs=c.t_head.num_convs,
        conv_dim=c.t_head.conv_dim,
        dtype=dtype,
        roi_align_impl=c.t_head.roi_align_impl,
        norm=c.t_head.norm)

  def __call__(self, images: jax.Array, train: bool = False,
               dense_s_head: bool = True) -> dict:
    """Backbone, pyramid, refinement module and S-head on a batch of images.

    Args:
      images: float32 [B, H, W, 3], normalised and padded to the canvas.
      train: passed to the backbone; no layer behaves differently today
        (frozen BatchNorm, no dropout).

    Returns:
      dict (docs/ARCHITECTURE.md, "Model outputs"); A = sum over
      model.s_levels of H_l * W_l, flattened as `anchors.dense_anchors`:
        t_features: {level: [B, H_l, W_l, fpn_channels]} for the T-head's
          levels, in the compute dtype (it only feeds `t_head`).
        refine_logits [B, A], refine_deltas [B, A, 4] (on the anchors),
        s_cls_logits [B, A, num_logits], s_reg_feature [B, A, reg_dim],
        s_deltas [B, A, 4] (on the refined boxes): float32.
    """
    pyramid = self.fpn(self.backbone(images, train=train))
    t_features = {level: pyramid[level] for level in self.t_levels}
    s_features = {level: pyramid[level] for level in self.s_levels}

    refine = self.refinement(s_features)
    refine_deltas = {level: refine[level][1] for level in self.s_levels}
    def gather(outputs, i):
      return flatten_levels([outputs[l][i] for l in self.s_levels]).astype(jnp.float32)

    out = dict(t_features=t_features, refine_logits=gather(refine, 0),
               refine_deltas=gather(refine, 1))
    if not dense_s_head and not self.is_initializing():
      out['s_features'] = s_features  # for `s_head_at`
      return out
    s_out = self.s_head_net(s_features, refine_deltas)

    if self.is_initializing():
      # The T-head only runs through `t_head`; call it once here so that
      # `model.init` creates its parameters too.
      batch = images.shape[0]
      dummy_boxes = jnp.tile(jnp.array([[[0.0, 0.0, 64.0, 64.0]]]), (batch, 1, 1))
      self.t_head_net(t_features, dummy_boxes)

    out.update(s_cls_logits=gather(s_out, 0), s_reg_feature=gather(s_out, 1),
               s_deltas=gather(s_out, 2))
    return out

  def s_head_at(self, s_features: dict, refine_deltas: jax.Array,
                origin: jax.Array) -> dict:
    """The S-head's outputs at flat dense positions only.

    Equal to `__call__`'s s_cls_logits / s_reg_feature / s_deltas read at
    `origin` (`gather_at`), at the cost of those positions alone: the
    training loss reads the S-head at its proposals and mimic samples
    (~2k of the ~26k positions of an 896x1408 canvas), and everything the
    S-head does after its input maps is per position (SHead, `points`).
    Needs s_head.norm 'none' and a deformable S-head (`s_head_sparse`).

    Args:
      s_features: {level: [B, H_l, W_l, C]}, `__call__(...,
        dense_s_head=False)['s_features']`.
      refine_deltas: [B, A, 4], `__call__`'s refine_deltas.
      origin: int [B, N] flat positions (the `flatten_levels` order).
    Returns:
      dict s_cls_logits [B, N, num_logits], s_reg_feature [B, N, reg_dim],
      s_deltas [B, N, 4], float32.
    """
    starts, widths, total = [], [], 0
    for level in self.s_levels:
      h, w = s_features[level].shape[1:3]
      starts.append(total)
      widths.append(w)
      total += h * w
    starts_arr = jnp.array(starts, jnp.int32)
    # Loop-free (searchsorted lowers to a while loop, whose bytes XLA's cost
    # analysis counts once, not per trip).
    level_index = jnp.sum(origin[..., None] >= starts_arr, axis=-1) - 1
    local = origin - starts_arr[level_index]
    width = jnp.array(widths, jnp.int32)[level_index]
    yx = jnp.stack([local // width, local % width], axis=-1)
    cls, reg, deltas = self.s_head_net(
        s_features, gather_at(refine_deltas, origin),
        (level_index.astype(jnp.int32), yx.astype(jnp.int32)))
    f32 = lambda x: x.astype(jnp.float32)
    return dict(s_cls_logits=f32(cls), s_reg_feature=f32(reg),
                s_deltas=f32(deltas))

  def t_head(self, t_features: dict, boxes: jax.Array,
             box_levels: Optional[jax.Array] = None):
    """T-head on boxes [B, N, 4] (x1y1x2y2 canvas pixels).

    box_levels: int [B, N] pyramid level to pool each box from
    (`t_head_box_levels`); None applies the FPN rule to the box size.

    Returns (t_cls_logits [B, N, num_classes + 1], t_reg_feature
    [B, N, t_head.fc_dim], t_deltas [B, N, 4]), float32.
    """
    return self.t_head_net(t_features, boxes, box_levels)
