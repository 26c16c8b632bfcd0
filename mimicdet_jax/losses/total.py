"""The MimicDet training loss: L = L_R + L_S + L_T + L_mimic (SPEC 3).

`make_loss_fn(model, config)` returns `total_loss(params, frozen, batch, rng)`
-> `(loss, aux)`, a pure function of one device's batch (docs/ARCHITECTURE.md)
that training.step differentiates. It composes these stages, each a function
below with its inputs and outputs in its signature, in this order:

  1. `dense_forward`: backbone, pyramid, refinement module, S-head (or the
     S-head later, only where it is read: `s_head.sparse_train`);
  2. `refinement_loss`: refinement targets and L_R (targets/refine.py);
  3. `proposals`: from the refined boxes, no gradient (targets/proposals.py);
  4. `t_head_loss`: sample boxes among proposals + gts, run the T-head on
     them, softmax CE + L1 (targets/roi_sampling.py);
  5. `s_head_sampling`, `s_head_at_positions`, `s_head_loss`: label every
     proposal, read the S-head at its origin, CE + L1 with online
     hard-example mining (or the T-head's balanced sampler,
     `s_head.sampling`);
  6. `mimic`: S-head vs T-head on the T-head's samples (losses/mimic.py);
  7. `weighted_total` and `diagnostics`: L and the aux scalars.

Every count, threshold and weight comes from the config; the per-image target
functions are vmapped over the batch.
"""
import functools
from typing import Callable, Optional

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


# ------------------------------------------------------------------ stages
# Each stage is a pure function of what it names; `make_loss_fn` composes
# them in this order (the order also fixes the traced program).


def model_inputs(batch: dict, data_config) -> jax.Array:
  """The network input [B, H, W, 3] float32: uint8 pixels are normalised on
  device (`data.device_normalize`), float32 inputs are taken as they are."""
  images = batch['image']
  if images.dtype == jnp.uint8:
    images = transforms.normalize_on_device(images, batch['image_size'],
                                            data_config)
  return images


def ground_truth(batch: dict) -> dict:
  """Gt boxes float32 [B, G, 4], classes int32 [B, G] (1..K) and the mask of
  those the targets use [B, G] (`gt_mask_of`)."""
  return dict(boxes=batch['boxes'].astype(jnp.float32),
              classes=batch['classes'].astype(jnp.int32),
              mask=gt_mask_of(batch))


def dense_forward(model: nn.Module, variables: dict, images: jax.Array, *,
                  sparse_s_head: bool) -> dict:
  """Backbone, pyramid, refinement module and, unless `sparse_s_head`, the
  dense S-head: the model's output dict (docs/ARCHITECTURE.md, "Model
  outputs"). With `sparse_s_head` the S-head runs later, only where the
  losses read it (`s_head_at_positions`)."""
  return model.apply(variables, images, train=True,
                     **({'dense_s_head': False} if sparse_s_head else {}))


def refinement_loss(outputs: dict, anchors: dict, gts: dict, key: jax.Array,
                    config) -> tuple[dict, dict]:
  """Refinement targets on the anchors (targets/refine.py) and L_R.

  Returns:
    (losses: cls, reg, num_positives of `detection.refine_loss`;
     targets: `refine_targets`' dict, whose gt_origin the T-head's sampler
     reads).
  """
  c = config
  batch_size = gts['boxes'].shape[0]
  targets = jax.vmap(functools.partial(
      refine_lib.refine_targets, levels=tuple(c.model.s_levels),
      anchor_scale=c.model.anchor_scale, pos_shrink=c.refine.pos_shrink,
      stds=tuple(c.refine.stds)), in_axes=(None, None, 0, 0))(
          anchors['boxes'], anchors['level'], gts['boxes'], gts['mask'])
  sampled = None
  if c.refine.cls_loss == 'bce':
    sampled = jax.vmap(functools.partial(
        refine_lib.sample_positions, num_samples=c.refine.num_samples,
        pos_fraction=c.refine.pos_fraction))(
            jax.random.split(key, batch_size), targets['positive'])
  losses = detection.refine_loss(
      outputs['refine_logits'], outputs['refine_deltas'], targets['positive'],
      targets['delta_targets'], sampled, cls_loss=c.refine.cls_loss,
      focal_alpha=c.refine.focal_alpha, focal_gamma=c.refine.focal_gamma)
  return losses, targets


def proposals(outputs: dict, anchors: dict, image_size: jax.Array,
              canvas: tuple[int, int], config) -> dict:
  """Proposals from the refined boxes, no gradient (targets/proposals.py):
  boxes [B, P, 4], valid [B, P], origin [B, P] (flat dense position)."""
  c = config
  return jax.vmap(functools.partial(
      proposals_lib.generate_proposals,
      sizes=proposals_lib.level_sizes(canvas, tuple(c.model.s_levels)),
      stds=tuple(c.refine.stds), scale_clip=c.box.scale_clip,
      pre_nms_topk=c.proposals.pre_nms_topk,
      nms_threshold=c.proposals.nms_threshold,
      num_proposals=c.proposals.num_proposals,
      inside_image=c.proposals.inside_image,
      nms_tile_size=c.proposals.nms_tile_size), in_axes=(0, 0, None, 0))(
          outputs['refine_logits'], outputs['refine_deltas'], anchors['boxes'],
          image_size)


def t_head_loss(model: nn.Module, variables: dict, outputs: dict,
                anchor_level: jax.Array, proposal_set: dict, gts: dict,
                gt_origin: jax.Array, key: jax.Array,
                config) -> tuple[dict, dict, dict]:
  """The T-head on its samples among proposals + gts, softmax CE + L1.

  Returns:
    (samples: `roi_sampling.t_head_targets`' dict [B, S, ...];
     teacher: cls_logits [B, S, K+1], reg_feature [B, S, fc_dim],
       deltas [B, S, 4] of the T-head on the samples;
     losses: cls, reg of `detection.t_head_loss`).
  """
  c = config
  batch_size = gts['boxes'].shape[0]
  samples = jax.vmap(functools.partial(
      roi_sampling.t_head_targets, fg_iou=c.t_head.fg_iou,
      num_samples=c.t_head.num_samples, fg_fraction=c.t_head.fg_fraction,
      append_gt=c.t_head.append_gt, stds=tuple(c.t_head.stds)))(
          jax.random.split(key, batch_size), proposal_set['boxes'],
          proposal_set['valid'], proposal_set['origin'], gts['boxes'],
          gts['classes'], gts['mask'], gt_origin)
  box_levels = mimicdet.t_head_box_levels(c, anchor_level, samples['origin'])
  cls_logits, reg_feature, deltas = model.apply(
      variables, outputs['t_features'], samples['boxes'], box_levels,
      method='t_head')
  losses = detection.t_head_loss(cls_logits, deltas, samples['labels'],
                                 samples['delta_targets'], samples['valid'])
  return samples, dict(cls_logits=cls_logits, reg_feature=reg_feature,
                       deltas=deltas), losses


def s_head_sampling(proposal_set: dict, gts: dict, rng: jax.Array,
                    config) -> tuple[dict, Optional[jax.Array]]:
  """Labels every proposal for the S-head and draws the proposals its loss
  takes with the sampler `s_head.sampling` names
  (`roi_sampling.S_HEAD_SAMPLERS`).

  Returns:
    (targets: `roi_sampling.s_head_targets`' dict [B, P, ...];
     sampled: [B, P] bool, or None from a sampler that leaves the choice to
       the loss (ohem: `detection.s_head_loss` mines the hardest)).
  """
  c = config
  targets = jax.vmap(functools.partial(
      roi_sampling.s_head_targets, fg_iou=c.s_head.fg_iou,
      stds=tuple(c.s_head.stds)))(proposal_set['boxes'], proposal_set['valid'],
                                  gts['boxes'], gts['classes'], gts['mask'])
  # The sampler's own key (fold_in), so the other samplers draw the same
  # whichever it is.
  batch_size = gts['boxes'].shape[0]
  sampled = jax.vmap(functools.partial(
      roi_sampling.S_HEAD_SAMPLERS[c.s_head.sampling],
      num_samples=c.s_head.ohem_samples, fg_fraction=c.s_head.fg_fraction))(
          jax.random.split(jax.random.fold_in(rng, 2), batch_size),
          targets['foreground'],
          proposal_set['valid'] & ~targets['foreground'])
  return targets, sampled


def s_head_at_positions(model: nn.Module, variables: dict, outputs: dict,
                        proposal_origin: jax.Array, sample_origin: jax.Array,
                        *, sparse_s_head: bool) -> tuple[dict, dict]:
  """The S-head (s_cls_logits, s_reg_feature, s_deltas) at the proposals'
  origins [B, P] and at the T-head samples' [B, S], in one read: run there
  (`MimicDet.s_head_at`) under `sparse_s_head`, else gathered from the dense
  outputs. Returns (at the proposals, at the samples)."""
  num_proposals = proposal_origin.shape[1]
  origins = jnp.concatenate([proposal_origin, sample_origin], axis=1)
  if sparse_s_head:
    read = model.apply(variables, outputs['s_features'],
                       outputs['refine_deltas'], origins, method='s_head_at')
  else:
    read = {k: mimicdet.gather_at(outputs[k], origins)
            for k in ('s_cls_logits', 's_reg_feature', 's_deltas')}
  return ({k: v[:, :num_proposals] for k, v in read.items()},
          {k: v[:, num_proposals:] for k, v in read.items()})


def s_head_loss(s_head: dict, proposal_set: dict, targets: dict,
                sampled: Optional[jax.Array], config) -> dict:
  """L_S on the proposals: CE + L1 on the mined (or sampled) ones
  (`detection.s_head_loss`: total, cls, reg, num_kept, num_kept_fg)."""
  return detection.s_head_loss(
      s_head['s_cls_logits'], s_head['s_deltas'], targets['labels'],
      targets['delta_targets'], proposal_set['valid'],
      config.s_head.ohem_samples, sampled)


def mimic(student: dict, teacher: dict, t_samples: dict,
          config) -> tuple[jax.Array, dict, jax.Array]:
  """L_mimic: S-head vs T-head on the T-head's samples (losses/mimic.py).

  Args:
    student, teacher: dict(cls=[B, S, K+1] logits, reg=[B, S, D] features).
    t_samples: the T-head's samples (`mimic_sample_mask` reads them).
  Returns:
    (loss, {path: its term} for the enabled paths, mask [B, S] of the
    samples in it); a zero loss and no terms when mimic.enabled is False.
  """
  c = config
  mask = mimic_sample_mask(t_samples, samples=c.mimic.samples,
                           include_gt=c.mimic.include_gt)
  if not c.mimic.enabled:
    return jnp.zeros((), jnp.float32), {}, mask
  loss, per_path = mimic_lib.mimic_loss(
      student, teacher, mask, paths=c.mimic.paths,
      cls_distance=c.mimic.cls_distance, reg_distance=c.mimic.reg_distance,
      temperature=c.mimic.temperature, teacher_grad=c.mimic.teacher_grad)
  return loss, {path: per_path[path]
                for path in mimic_lib.mimic_paths(c.mimic.paths)}, mask


def weighted_total(refine: dict, t_head: dict, s_head: dict,
                   mimic_loss: jax.Array, config) -> jax.Array:
  """L = L_R + L_S + L_T + L_mimic with `loss_weights` and `mimic.weight`."""
  w = config.loss_weights
  loss = (w.refine * (refine['cls'] + refine['reg']) +
          w.s_head * s_head['total'] +
          w.t_head * (t_head['cls'] + t_head['reg']))
  if config.mimic.enabled:
    loss = loss + config.mimic.weight * mimic_loss
  return loss


def diagnostics(refine: dict, proposal_set: dict, gts: dict, t_samples: dict,
                s_targets: dict, s_losses: dict, student: dict,
                teacher: dict, mimic_mask: jax.Array) -> dict:
  """The aux diagnostics (`make_loss_fn`), float32 scalars, no gradient use."""
  batch_size = gts['boxes'].shape[0]
  num_fg = jnp.sum(t_samples['foreground'])
  return dict(
      num_positives=_f32(refine['num_positives']) / batch_size,
      proposal_recall=proposal_recall(proposal_set['boxes'],
                                      proposal_set['valid'], gts['boxes'],
                                      gts['mask']),
      num_proposals=_f32(jnp.sum(proposal_set['valid'])) / batch_size,
      t_num_fg=_f32(num_fg) / batch_size,
      s_num_fg=_f32(jnp.sum(s_targets['foreground'])) / batch_size,
      s_fg_share=_f32(s_losses['num_kept_fg']) /
      jnp.maximum(s_losses['num_kept'], 1).astype(jnp.float32),
      mimic_num_samples=_f32(jnp.sum(mimic_mask)) / batch_size,
      t_fg_iou=jnp.sum(jnp.where(t_samples['foreground'], t_samples['iou'],
                                 0.0)) /
      jnp.maximum(num_fg, 1).astype(jnp.float32),
      mimic_cos_cls=mimic_lib.mean_cosine(student['cls'], teacher['cls'],
                                          mimic_mask),
      mimic_cos_reg=mimic_lib.mean_cosine(student['reg'], teacher['reg'],
                                          mimic_mask),
      t_reg_alive=alive_units(teacher['reg'], mimic_mask),
      s_reg_alive=alive_units(student['reg'], mimic_mask))


class StagedLoss:
  """The loss as `forward` (the network on a batch) then `losses` (targets,
  samplers and loss terms on the network's outputs), so that the train
  step can run the network on a device's whole batch at once and the rest
  per image (training/step.py).

  Called as total_loss(params, frozen, batch, rng), it is
  losses(params, frozen, forward(params, frozen, batch), batch, rng).
  """

  def __init__(self, forward: Callable, losses: Callable):
    self.forward = forward
    self.losses = losses

  def __call__(self, params, frozen, batch, rng):
    return self.losses(params, frozen, self.forward(params, frozen, batch),
                       batch, rng)


def make_loss_fn(model: nn.Module,
                 config: ml_collections.FrozenConfigDict) -> Callable:
  """Builds total_loss(params, frozen, batch, rng) -> (loss, aux), a
  `training.step.LossFn`: the stages above, composed.

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
  # The S-head only where the losses read it, when it can
  # (`mimicdet.s_head_sparse`).
  sparse_s_head = mimicdet.s_head_sparse(c) and hasattr(model, 's_head_at')

  def forward(params, frozen, batch):
    variables = {'params': params, 'frozen': frozen}
    return dense_forward(model, variables, model_inputs(batch, c.data),
                         sparse_s_head=sparse_s_head)

  def losses(params, frozen, outputs, batch, rng):
    variables = {'params': params, 'frozen': frozen}
    canvas = batch['image'].shape[1:3]
    anchors = anchors_lib.dense_anchors(canvas, tuple(c.model.s_levels),
                                        c.model.anchor_scale)
    gts = ground_truth(batch)
    refine_key, t_key = jax.random.split(rng)

    refine, refine_targets = refinement_loss(outputs, anchors, gts,
                                             refine_key, c)
    proposal_set = proposals(outputs, anchors, batch['image_size'], canvas, c)
    t_samples, teacher_out, t_head = t_head_loss(
        model, variables, outputs, anchors['level'], proposal_set, gts,
        refine_targets['gt_origin'], t_key, c)
    s_targets, s_sampled = s_head_sampling(proposal_set, gts, rng, c)
    s_at_proposals, s_at_samples = s_head_at_positions(
        model, variables, outputs, proposal_set['origin'],
        t_samples['origin'], sparse_s_head=sparse_s_head)
    s_head = s_head_loss(s_at_proposals, proposal_set, s_targets, s_sampled,
                         c)
    # The mimic pairs the S-head read at each T-head sample's origin with
    # the T-head on that sample.
    student = dict(cls=s_at_samples['s_cls_logits'],
                   reg=s_at_samples['s_reg_feature'])
    teacher = dict(cls=teacher_out['cls_logits'],
                   reg=teacher_out['reg_feature'])
    mimic_loss, mimic_paths, mimic_mask = mimic(student, teacher, t_samples,
                                                c)
    loss = weighted_total(refine, t_head, s_head, mimic_loss, c)

    aux = {f'loss_mimic_{path}': v for path, v in mimic_paths.items()}
    aux.update(
        loss_refine_cls=refine['cls'], loss_refine_reg=refine['reg'],
        loss_t_cls=t_head['cls'], loss_t_reg=t_head['reg'],
        loss_s_cls=s_head['cls'], loss_s_reg=s_head['reg'],
        loss_mimic=mimic_loss)
    aux.update(diagnostics(refine, proposal_set, gts, t_samples, s_targets,
                           s_head, student, teacher, mimic_mask))
    return loss, {k: _f32(v) for k, v in aux.items()}

  return StagedLoss(forward, losses)
