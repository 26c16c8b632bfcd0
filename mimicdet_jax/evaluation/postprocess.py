"""Inference post-processing (SPEC section 4): dense outputs -> detections.

`postprocess` (pure jnp, static shapes) turns the model's dense outputs into
at most `eval.max_detections` boxes per image; `make_predict_fn` wraps the
model and `postprocess` into one jitted function (eval.py, predict,
benchmarks). Boxes are (x1, y1, x2, y2) float32 in *canvas* pixels (the
network input, resized and padded); coco_eval.to_original_pixels maps
them back to the image file.
"""
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from mimicdet_jax import ops
from mimicdet_jax.evaluation import tta as tta_lib
from mimicdet_jax.models import anchors as anchors_lib
from mimicdet_jax.models import mimicdet
from mimicdet_jax.ops.nms import NMS_KINDS
from mimicdet_jax.targets import proposals as proposals_lib

Array = jnp.ndarray


def select_positions(refine_logits: Array, topk: int) -> tuple[Array, Array]:
  """Top-`topk` dense positions per image by refinement objectness.

  Args:
    refine_logits: [B, A] objectness logits.
    topk: static; clamped to A.
  Returns:
    idx int32 [B, N] (flat origin indices, descending objectness) and the
    objectness probabilities float32 [B, N].
  """
  n = min(int(topk), refine_logits.shape[1])
  logits, idx = jax.lax.top_k(refine_logits.astype(jnp.float32), n)
  return idx.astype(jnp.int32), jax.nn.sigmoid(logits)


def inference_positions(refine_logits: Array, anchor_boxes: Array,
                        image_size: Array, config) -> tuple[Array, Array]:
  """The positions inference reads: `select_positions` with
  `eval.pre_nms_topk`, over the cells inside the image only when
  `proposals.inside_image` (padding cells get objectness 0).

  refine_logits [B, A], anchor_boxes [A, 4], image_size [B, 2] (h, w).
  """
  refine_logits = refine_logits.astype(jnp.float32)
  if config.proposals.inside_image:
    inside = proposals_lib.cells_inside_image(
        jnp.asarray(anchor_boxes, jnp.float32), image_size)
    refine_logits = jnp.where(inside, refine_logits, -jnp.inf)
  return select_positions(refine_logits, config.eval.pre_nms_topk)


def class_probs(cls_logits: Array) -> Array:
  """Softmax over [.., L] logits with the background (index 0) dropped."""
  return jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[..., 1:]


def select_detections(boxes: Array, probs: Array, *, score_threshold: float,
                      nms_threshold: float, max_detections: int,
                      nms: str = 'hard',
                      soft_nms_sigma: float = 0.5) -> dict[str, Array]:
  """Score threshold -> per-class NMS -> top `max_detections`, per image.

  Every (box, class) pair is a candidate, as in Faster R-CNN inference with
  class-agnostic box deltas. `batched_nms` (nms='hard') and `soft_nms`
  (nms='soft') return the kept pairs in descending score order, so their
  first `max_detections` are the top ones.

  Args:
    boxes: [B, N, 4] class-agnostic boxes (canvas pixels, already clipped).
    probs: [B, N, K] foreground class probabilities.
    score_threshold: pairs with a score below it are dropped (SPEC: 0.005);
      under soft-NMS also pairs whose decayed score falls below it.
    nms_threshold: IoU above which a same-class box is suppressed (hard).
    max_detections: static output length M.
    nms: one of ops.nms.NMS_KINDS (static).
    soft_nms_sigma: the Gaussian's sigma of soft-NMS.
  Returns:
    dict with boxes [B, M, 4], scores [B, M] (decayed under soft-NMS),
    classes int32 [B, M] in 1..K (0 where invalid), valid bool [B, M].
    Invalid rows are zero.
  """
  _, n, k = probs.shape

  def one_image(img_boxes, img_probs):
    scores = img_probs.reshape(n * k)
    box_idx = jnp.arange(n * k, dtype=jnp.int32) // k
    classes = jnp.arange(n * k, dtype=jnp.int32) % k + 1
    # Empty boxes (e.g. clipped away entirely) are not detections.
    nonempty = ops.box_area(img_boxes) > 0
    valid = (scores >= score_threshold) & nonempty[box_idx]
    if nms == 'hard':
      keep, keep_valid = ops.batched_nms(
          img_boxes[box_idx], scores, classes, nms_threshold,
          max_output_size=max_detections, valid=valid)
      keep_scores = scores[keep]
    elif nms == 'soft':
      keep, keep_scores, keep_valid = ops.soft_nms(
          img_boxes[box_idx], scores, classes, soft_nms_sigma,
          score_threshold, max_output_size=max_detections, valid=valid)
    else:
      raise ValueError(f'eval.nms={nms!r}; expected one of '
                       f'{NMS_KINDS}')
    out_boxes = jnp.where(keep_valid[:, None], img_boxes[box_idx[keep]], 0.0)
    return dict(boxes=out_boxes,
                scores=jnp.where(keep_valid, keep_scores, 0.0),
                classes=jnp.where(keep_valid, classes[keep], 0),
                valid=keep_valid)

  return jax.vmap(one_image)(boxes.astype(jnp.float32),
                             probs.astype(jnp.float32))


# eval.head -> (heads whose class scores, heads whose boxes are used); the
# crossed two are diagnostics (`eval_heads`).
EVAL_HEADS = {'s': (('s',), ('s',)), 't': (('t',), ('t',)),
              'both': (('s', 't'), ('s', 't')),
              's_cls+t_box': (('s',), ('t',)),
              't_cls+s_box': (('t',), ('s',))}


def eval_heads(head: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """eval.head -> (heads whose class scores, heads whose boxes are used).

  's', 't': one head for both; 'both': the mean of the two heads' class
  probabilities and of their boxes; 's_cls+t_box' / 't_cls+s_box': one
  head's scores on the other head's boxes (a diagnostic: is a gap between
  the heads in their scores or in their boxes? docs/S_HEAD_GAP.md E9).
  """
  return EVAL_HEADS[head]


def candidates(outputs: Mapping[str, Array], anchor_boxes: Array,
               image_size: Array, config,
               t_head_fn: Optional[Callable[..., tuple]] = None,
               anchor_level: Optional[Array] = None) -> tuple[Array, Array]:
  """SPEC section 4 on the model's dense outputs, up to NMS.

  Top `eval.pre_nms_topk` positions by objectness (cells inside the image
  only, with `proposals.inside_image`) -> refined boxes (anchor +
  refinement deltas, clipped to the image) -> class probabilities and boxes
  from the S-head (deltas on the refined boxes), the T-head on the same boxes,
  or the mean of both (`eval.head`) -> optional score x objectness.

  Args:
    outputs: the model's dict (refine_logits [B, A], refine_deltas [B, A, 4],
      s_cls_logits [B, A, L], s_deltas [B, A, 4]).
    anchor_boxes: [A, 4] canvas pixels, same flat order as the outputs.
    image_size: int [B, 2] (h, w) of the image inside the canvas; boxes are
      clipped to it.
    config: the resolved config (reads eval.*, refine.stds, s_head.stds,
      t_head.stds, box.scale_clip).
    t_head_fn: (refined boxes [B, N, 4], box_levels [B, N] or None) ->
      (t_cls_logits [B, N, L], _, t_deltas [B, N, 4]); needed when eval.head
      is 't' or 'both'.
    anchor_level: int [A] level of each position; needed for the T-head
      under `t_head.level_rule=staggered`.
  Returns:
    boxes [B, N, 4] (canvas pixels, clipped) and class probabilities
    [B, N, K], N = min(eval.pre_nms_topk, A): `select_detections`' inputs.
  """
  ev = config.eval
  scale_clip = config.box.scale_clip
  idx, objectness = inference_positions(outputs['refine_logits'],
                                        anchor_boxes, image_size, config)
  refined = ops.decode_deltas(
      mimicdet.gather_at(outputs['refine_deltas'], idx).astype(jnp.float32),
      jnp.asarray(anchor_boxes, jnp.float32)[idx], config.refine.stds,
      scale_clip=scale_clip)
  refined = ops.clip_boxes(refined, image_size)
  # Proposals carry no gradient in training either; the T-head sees the
  # same boxes as the S-head's deltas refer to.
  refined = jax.lax.stop_gradient(refined)

  cls_heads, box_heads = eval_heads(ev.head)
  raw = {}  # head -> (cls_logits, deltas, stds)
  if 's' in cls_heads + box_heads:
    raw['s'] = (mimicdet.gather_at(outputs['s_cls_logits'], idx),
                mimicdet.gather_at(outputs['s_deltas'], idx), config.s_head.stds)
  if 't' in cls_heads + box_heads:
    if t_head_fn is None:
      raise ValueError(f'eval.head={ev.head!r} needs t_head_fn')
    box_levels = None
    if config.t_head.level_rule != 'fpn':
      if anchor_level is None:
        raise ValueError('the staggered T-head level rule needs anchor_level')
      box_levels = mimicdet.t_head_box_levels(config, anchor_level, idx)
    t_cls_logits, _, t_deltas = t_head_fn(refined, box_levels)
    raw['t'] = (t_cls_logits, t_deltas, config.t_head.stds)

  probs = sum(class_probs(raw[h][0]) for h in cls_heads) / len(cls_heads)
  boxes = sum(ops.clip_boxes(
      ops.decode_deltas(raw[h][1].astype(jnp.float32), refined, raw[h][2],
                        scale_clip=scale_clip), image_size)
              for h in box_heads) / len(box_heads)
  if ev.score_times_objectness:
    probs = probs * objectness[..., None]
  # Padding cells picked only because fewer than topk cells are inside the
  # image (objectness -inf -> 0) are no detections.
  probs = jnp.where(objectness[..., None] > 0, probs, 0.0)
  return boxes, probs


def detections(boxes: Array, probs: Array, config) -> dict[str, Array]:
  """`select_detections` with the config's eval.* threshold and NMS."""
  ev = config.eval
  return select_detections(boxes, probs, score_threshold=ev.score_threshold,
                           nms_threshold=ev.nms_threshold,
                           max_detections=ev.max_detections, nms=ev.nms,
                           soft_nms_sigma=ev.soft_nms_sigma)


def postprocess(outputs: Mapping[str, Array], anchor_boxes: Array,
                image_size: Array, config,
                t_head_fn: Optional[Callable[..., tuple]] = None,
                anchor_level: Optional[Array] = None) -> dict[str, Array]:
  """SPEC section 4 on the model's dense outputs: `candidates` (arguments
  as there) -> `detections`, the dict of `select_detections`, boxes in
  canvas pixels."""
  return detections(*candidates(outputs, anchor_boxes, image_size, config,
                                t_head_fn, anchor_level), config)


def make_predict_fn(model, config) -> Callable[..., dict[str, Array]]:
  """One jitted function: images -> detections in canvas pixels.

  Returns fn(variables, images [B, Hc, Wc, 3], image_size [B, 2] or None)
  -> dict boxes [B, M, 4] (canvas pixels), scores [B, M], classes int32
  [B, M] (1..K), valid bool [B, M]. image_size None clips to the canvas.
  Shard `images` over devices (see `evaluate`) for data parallelism; the
  computation follows the input sharding.

  eval.tta='hflip': each image and its mirror (tta.hflip_images, inside
  the image's width) run as one batch of 2B, interleaved (image i at 2i,
  its mirror at 2i + 1, so a device's shard holds both); the mirror's
  candidates are flipped back (tta.unflip_boxes) and joined to the image's
  before the per-class NMS: 2N candidate boxes per image.
  """

  def predict(variables, images, image_size=None):
    canvas_hw = images.shape[1:3]
    if image_size is None:
      image_size = jnp.broadcast_to(jnp.asarray(canvas_hw, jnp.int32),
                                    (images.shape[0], 2))
    image_size = jnp.asarray(image_size, jnp.int32)
    b = images.shape[0]
    sizes = image_size
    if config.eval.tta == 'hflip':
      images = jnp.stack([images, tta_lib.hflip_images(images, image_size)],
                         axis=1).reshape((2 * b,) + images.shape[1:])
      sizes = jnp.repeat(image_size, 2, axis=0)
    elif config.eval.tta != 'none':
      raise ValueError(f'eval.tta={config.eval.tta!r}; expected one of '
                       f'{tta_lib.TTA_MODES}')
    outputs = model.apply(variables, images, train=False)
    anchors = anchors_lib.dense_anchors(
        canvas_hw, config.model.s_levels, config.model.anchor_scale)

    def t_head_fn(boxes, box_levels):
      return model.apply(variables, outputs['t_features'], boxes, box_levels,
                         method='t_head')

    boxes, probs = candidates(outputs, anchors['boxes'], sizes, config,
                              t_head_fn, anchor_level=anchors['level'])
    if config.eval.tta == 'hflip':  # [2B, N, .] -> [B, 2N, .]
      boxes = boxes.reshape((b, 2) + boxes.shape[1:])
      boxes = jnp.concatenate(
          [boxes[:, 0], tta_lib.unflip_boxes(boxes[:, 1], image_size[:, 1])],
          axis=1)
      probs = probs.reshape((b, -1) + probs.shape[2:])
    return detections(boxes, probs, config)

  return jax.jit(predict)
