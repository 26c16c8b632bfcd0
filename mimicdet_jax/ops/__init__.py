"""Numerical ops: box coding and IoU, NMS, RoIAlign, deformable convolution."""
from mimicdet_jax.ops.boxes import box_area
from mimicdet_jax.ops.boxes import box_iou
from mimicdet_jax.ops.boxes import clip_boxes
from mimicdet_jax.ops.boxes import decode_deltas
from mimicdet_jax.ops.boxes import encode_deltas
from mimicdet_jax.ops.boxes import xywh_to_xyxy
from mimicdet_jax.ops.boxes import xyxy_to_xywh
from mimicdet_jax.ops.deform_conv import deform_conv2d
from mimicdet_jax.ops.nms import batched_nms
from mimicdet_jax.ops.nms import nms
from mimicdet_jax.ops.nms import soft_nms
from mimicdet_jax.ops.roi_align import fpn_levels
from mimicdet_jax.ops.roi_align import multilevel_roi_align
from mimicdet_jax.ops.roi_align import multilevel_roi_align_einsum
from mimicdet_jax.ops.roi_align import roi_align

__all__ = [
    'batched_nms', 'box_area', 'box_iou', 'clip_boxes', 'decode_deltas',
    'deform_conv2d', 'encode_deltas', 'fpn_levels', 'multilevel_roi_align',
    'multilevel_roi_align_einsum', 'nms', 'roi_align', 'soft_nms', 'xywh_to_xyxy', 'xyxy_to_xywh',
]
