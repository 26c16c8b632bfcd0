"""The MimicDet training loss: L = L_R + L_S + L_T + L_mimic (SPEC 3).

`make_loss_fn(model, config)` returns `total_loss(params, frozen, batch, rng)`
-> `(loss, aux)`, a pure function of one device's batch (docs/ARCHITECTURE.md)
that training.step differentiates. The steps, in order:

  1. dense forward pass (backbone, pyramid, refinement module, S-head);
  2. refinement targets and loss (targets/refine.py);
  3. proposals from the refined boxes, no gradient (targets/proposals.py);
  4. T-head: sample boxes among proposals + gts, run the T-head on them,
     softmax CE + L1 (targets/roi_sampling.py);
  5. S-head: label every proposal, read the S-head at its origin, CE + L1 with
     online hard-example mining (or the T-head's balanced sampler,
     `s_head.sampling`);
  6. mimic: S-head vs T-head on the T-head's samples (losses/mimic.py).

Every count, threshold and weight comes from the config; the per-image target
functions are vmapped over the batch.
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimicdet_jax.data import transforms
from mimicdet_jax.losses import detection
from mimicdet_jax.losses import mimic as mimic_lib
from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.models import mimicdet
from mimicdet_jax.ops import boxes as box_ops
from mimicdet_jax.targets import proposals as proposals_lib
from mimicdet_jax.targets import refine as refine_lib
from mimicdet_jax.targets import roi_sampling

def gt_mask_of(batch: dict) -> jax.Array:
  """Gts the targets use, [B, G] bool: real, non-crowd, positive area."""
  boxes = batch['boxes']
  area_ok = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  return batch['box_mask'] & ~batch['is_crowd'] & area_ok


def proposal_recall(proposal_boxes: jax.Array, proposal_valid: jax.Array,
                    gt_boxes: jax.Array, gt_mask: jax.Array,
                    iou_threshold: float = 0.5) -> jax.Array:
  """Share of gts (over the batch) covered by a valid proposal with IoU >= threshold.

  Diagnostic only; 0 for a batch without gts.
  """
  iou = box_ops.box_iou(proposal_boxes, gt_boxes)  # [B, P, G]
  best = jnp.max(jnp.where(proposal_valid[..., None], iou, 0.0), axis=1)
  hit = gt_mask & (best >= iou_threshold)
  return jnp.sum(hit) / jnp.maximum(jnp.sum(gt_mask), 1).astype(jnp.float32)


# mimic.samples: which T-head samples the mimic pulls (`mimic_sample_mask`).
MIMIC_SAMPLES = ('all', 'foreground')


def mimic_sample_mask(t_samples: dict, *, samples: str,
                      include_gt: bool) -> jax.Array:
  """Which T-head samples enter the mimic loss, [B, S] bool (SPEC 3, "Mimic").

  `mimic.samples`: all valid samples or foreground only. Appended gt boxes
  are left out unless `mimic.include_gt`: a gt has no anchor of its own, and
  the cell the S-head would be read at (`gt_origin`) carries that cell's own
  refined box, possibly also a proposal's origin, so one student vector would
  be pulled toward two teachers.
  """
  mask = t_samples['valid'] if samples == 'all' else t_samples['foreground']
  if not include_gt:
    mask = mask & t_samples['is_proposal']
  return mask


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def alive_units(features: jax.Array, mask: jax.Array) -> jax.Array:
  """Share of units (last axis) > 0 on at least one masked row, no gradient.

  features [B, S, D] (post-ReLU), mask [B, S] bool -> scalar in [0, 1].
  A unit at 0 on every row of a batch gets no gradient from it: when the
  share falls and stays down, those ReLUs are dead.
  """
  on = (jax.lax.stop_gradient(features) > 0) & mask[..., None]
  return jnp.mean(jnp.any(on, axis=(0, 1)).astype(jnp.float32))


# The dead-ReLU diagnostics (`alive_units`) and the layer each one watches.
# At or under DEAD_UNIT_SHARE of its units alive a layer gets no gradient
# again: its mimic path is flat for the rest of the run (docs/S_HEAD_GAP.md
# E11, E12, E18: the T-head's at AdamW 3e-3 on the real-image proxy, by step
# 450).
DEAD_UNIT_KEYS = {'t_reg_alive': "the T-head's regression features",
                  's_reg_alive': "the S-head's regression features"}
DEAD_UNIT_SHARE = 0.01


class DeadUnitMonitor:
  """The loss's monitor for the training loop (`training.loop.Monitor`).

  monitor(step, scalars) -> one message per layer of DEAD_UNIT_KEYS the
  first time its share of alive units, averaged over a log window, is at or
  under DEAD_UNIT_SHARE; each layer is reported once per run.
  """

  def __init__(self):
    self.warned = set()

  def __call__(self, step: int, scalars) -> list[str]:
    messages = []
    for key, layer in DEAD_UNIT_KEYS.items():
      if key in self.warned or key not in scalars:
        continue
      if scalars[key] <= DEAD_UNIT_SHARE:
        self.warned.add(key)
        messages.append(
            f'step {step}: {key}={scalars[key]:.3f}: the units of {layer} '
            'are dead (zero on every mimic sample), so no gradient reaches '
            'them again and the mimic\'s regression path is flat from here; '
            'a lower optim.base_lr, or group_norm for t_head.norm and '
            's_head.norm, keeps them alive (docs/S_HEAD_GAP.md E12, E18)')
    return messages


def make_loss_fn(model: nn.Module,
                 config: ml_collections.FrozenConfigDict) -> Callable:
  """Builds total_loss(params, frozen, batch, rng) -> (loss, aux), a
  `training.step.LossFn`.

  Args:
    model: a `MimicDet` (or a fork with the same `__call__`/`t_head`).
    config: the resolved config.

  Returns:
    total_loss with
      params, frozen: the model's variable collections.
      batch: dict with image [B, H, W, 3] (float32 normalised, or uint8
        pixels that it normalises: data.device_normalize), image_size
        [B, 2] (h, w), boxes
        [B, G, 4], classes [B, G] (1..K), box_mask [B, G], is_crowd [B, G]
        (other keys are ignored).
      rng: PRNG key for the samplers.
    and aux a dict of float32 scalars: every loss term (`loss_*`), and the
    diagnostics num_positives (refinement positives per image),
    proposal_recall (IoU 0.5), num_proposals (valid, per image), t_num_fg
    (T-head foreground samples per image), t_fg_iou (their mean IoU),
    s_num_fg (foreground proposals per image), s_fg_share (foreground share
    of the proposals in the S-head loss),
    mimic_num_samples (T-head samples in the mimic, per image),
    mimic_cos_cls / mimic_cos_reg (mean cosine S vs T on the mimic samples,
    whatever the distance), t_reg_alive / s_reg_alive (share of the T-head's
    / S-head's regression-feature units that are > 0 on at least one mimic
    sample of the batch: a dead-ReLU monitor, docs/S_HEAD_GAP.md E12).
  """
  c = config
  levels = tuple(c.model.s_levels)
  mimic_paths = mimic_lib.mimic_paths(c.mimic.paths)

  refine_targets = jax.vmap(functools.partial(
      refine_lib.refine_targets, levels=levels,
      anchor_scale=c.model.anchor_scale, pos_shrink=c.refine.pos_shrink,
      stds=tuple(c.refine.stds)), in_axes=(None, None, 0, 0))
  sample_positions = jax.vmap(functools.partial(
      refine_lib.sample_positions, num_samples=c.refine.num_samples,
      pos_fraction=c.refine.pos_fraction))
  t_head_targets = jax.vmap(functools.partial(
      roi_sampling.t_head_targets, fg_iou=c.t_head.fg_iou,
      num_samples=c.t_head.num_samples, fg_fraction=c.t_head.fg_fraction,
      append_gt=c.t_head.append_gt, stds=tuple(c.t_head.stds)))
  num_proposals = c.proposals.num_proposals

  def sample_one(key, positive, negative):
    idx, _, ok = roi_sampling.balanced_sample(
        key, positive, negative, c.s_head.ohem_samples, c.s_head.fg_fraction)
    mask = jnp.zeros((num_proposals,), bool)
    return mask.at[idx].max(ok)

  sample_proposals = jax.vmap(sample_one)
  s_head_targets = jax.vmap(functools.partial(
      roi_sampling.s_head_targets, fg_iou=c.s_head.fg_iou,
      stds=tuple(c.s_head.stds)))

  def total_loss(params, frozen, batch, rng):
    variables = {'params': params, 'frozen': frozen}
    images = batch['image']
    if images.dtype == jnp.uint8:  # data.device_normalize: pixels, not inputs
      images = transforms.normalize_on_device(images, batch['image_size'],
                                              c.data)
    batch_size = images.shape[0]
    canvas = images.shape[1:3]
    anchors = anchors_lib.dense_anchors(canvas, levels, c.model.anchor_scale)
    gt_boxes = batch['boxes'].astype(jnp.float32)
    gt_classes = batch['classes'].astype(jnp.int32)
    gt_mask = gt_mask_of(batch)
    refine_key, t_key = jax.random.split(rng)

    # 1. Dense forward.
    out = model.apply(variables, images, train=True)

    # 2. Refinement.
    rt = refine_targets(anchors['boxes'], anchors['level'], gt_boxes, gt_mask)
    sampled = None
    if c.refine.cls_loss == 'bce':
      sampled = sample_positions(jax.random.split(refine_key, batch_size),
                                 rt['positive'])
    r_loss = detection.refine_loss(
        out['refine_logits'], out['refine_deltas'], rt['positive'],
        rt['delta_targets'], sampled, cls_loss=c.refine.cls_loss,
        focal_alpha=c.refine.focal_alpha, focal_gamma=c.refine.focal_gamma)

    # 3. Proposals (stop_gradient inside).
    props = jax.vmap(functools.partial(
        proposals_lib.generate_proposals,
        sizes=proposals_lib.level_sizes(canvas, levels),
        stds=tuple(c.refine.stds), scale_clip=c.box.scale_clip,
        pre_nms_topk=c.proposals.pre_nms_topk,
        nms_threshold=c.proposals.nms_threshold,
        num_proposals=c.proposals.num_proposals,
        inside_image=c.proposals.inside_image,
        nms_tile_size=c.proposals.nms_tile_size), in_axes=(0, 0, None, 0))(
            out['refine_logits'], out['refine_deltas'], anchors['boxes'],
            batch['image_size'])

    # 4. T-head on its samples.
    ts = t_head_targets(jax.random.split(t_key, batch_size), props['boxes'],
                        props['valid'], props['origin'], gt_boxes, gt_classes,
                        gt_mask, rt['gt_origin'])
    box_levels = mimicdet.t_head_box_levels(c, anchors['level'], ts['origin'])
    t_cls_logits, t_reg_feature, t_deltas = model.apply(
        variables, out['t_features'], ts['boxes'], box_levels,
        method='t_head')
    t_loss = detection.t_head_loss(t_cls_logits, t_deltas, ts['labels'],
                                   ts['delta_targets'], ts['valid'])

    # 5. S-head at every proposal's origin, hard-example mined.
    ss = s_head_targets(props['boxes'], props['valid'], gt_boxes, gt_classes,
                        gt_mask)
    s_sampled = None
    if c.s_head.sampling == 'balanced':
      # The T-head's sampler instead of hard-example mining. Its own key
      # (fold_in), so the other samplers draw as they do under ohem.
      s_sampled = sample_proposals(
          jax.random.split(jax.random.fold_in(rng, 2), batch_size),
          ss['foreground'], props['valid'] & ~ss['foreground'])
    s_loss = detection.s_head_loss(
        mimicdet.gather_at(out['s_cls_logits'], props['origin']),
        mimicdet.gather_at(out['s_deltas'], props['origin']), ss['labels'],
        ss['delta_targets'], props['valid'], c.s_head.ohem_samples, s_sampled)

    # 6. Mimic on the T-head's samples, S-head read at their origins.
    student = dict(cls=mimicdet.gather_at(out['s_cls_logits'], ts['origin']),
                   reg=mimicdet.gather_at(out['s_reg_feature'], ts['origin']))
    teacher = dict(cls=t_cls_logits, reg=t_reg_feature)
    mimic_mask = mimic_sample_mask(ts, samples=c.mimic.samples,
                                   include_gt=c.mimic.include_gt)
    aux = {}
    if c.mimic.enabled:
      mimic_loss, per_path = mimic_lib.mimic_loss(
          student, teacher, mimic_mask, paths=c.mimic.paths,
          cls_distance=c.mimic.cls_distance,
          reg_distance=c.mimic.reg_distance, temperature=c.mimic.temperature,
          teacher_grad=c.mimic.teacher_grad)
      for path in mimic_paths:
        aux[f'loss_mimic_{path}'] = per_path[path]
    else:
      mimic_loss = jnp.zeros((), jnp.float32)

    w = c.loss_weights
    loss = (w.refine * (r_loss['cls'] + r_loss['reg']) +
            w.s_head * s_loss['total'] +
            w.t_head * (t_loss['cls'] + t_loss['reg']))
    if c.mimic.enabled:
      loss = loss + c.mimic.weight * mimic_loss

    num_fg = jnp.sum(ts['foreground'])
    aux.update(
        loss_refine_cls=r_loss['cls'],
        loss_refine_reg=r_loss['reg'],
        loss_t_cls=t_loss['cls'],
        loss_t_reg=t_loss['reg'],
        loss_s_cls=s_loss['cls'],
        loss_s_reg=s_loss['reg'],
        loss_mimic=mimic_loss,
        num_positives=_f32(r_loss['num_positives']) / batch_size,
        proposal_recall=proposal_recall(props['boxes'], props['valid'],
                                        gt_boxes, gt_mask),
        num_proposals=_f32(jnp.sum(props['valid'])) / batch_size,
        t_num_fg=_f32(num_fg) / batch_size,
        s_num_fg=_f32(jnp.sum(ss['foreground'])) / batch_size,
        s_fg_share=_f32(s_loss['num_kept_fg']) /
        jnp.maximum(s_loss['num_kept'], 1).astype(jnp.float32),
        mimic_num_samples=_f32(jnp.sum(mimic_mask)) / batch_size,
        t_fg_iou=jnp.sum(jnp.where(ts['foreground'], ts['iou'], 0.0)) /
        jnp.maximum(num_fg, 1).astype(jnp.float32),
        mimic_cos_cls=mimic_lib.mean_cosine(student['cls'], teacher['cls'],
                                            mimic_mask),
        mimic_cos_reg=mimic_lib.mean_cosine(student['reg'], teacher['reg'],
                                            mimic_mask),
        t_reg_alive=alive_units(teacher['reg'], mimic_mask),
        s_reg_alive=alive_units(student['reg'], mimic_mask))
    return loss, {k: _f32(v) for k, v in aux.items()}

  return total_loss
