"""Dense anchors: one square anchor per position of each pyramid level.

The flat index into these arrays is a proposal's *origin* (docs/ARCHITECTURE.md):
levels in the order given, row-major (y, then x) within a level. Every dense
S-side output of the model (`refine_logits`, `s_cls_logits`, ...) uses the same
order, so `anchors['level'][a], anchors['yx'][a]` say where index `a` lives.

Shapes are static (they follow from the canvas), so the anchors are NumPy
arrays computed at trace time and become constants of the compiled program.
"""
from typing import Sequence

import numpy as np


def level_shape(canvas_hw: Sequence[int], level: int) -> tuple[int, int]:
  """(H_l, W_l) of pyramid level `level` (stride 2**level) for a canvas.

  Every stride-2 layer of the backbone and the pyramid (3x3 pad 1, or 1x1 in a
  stride-2 bottleneck) outputs ceil(n / 2) rows; repeated, that is
  ceil(n / 2**level). Canvases are divisible by 128, so this is exact division
  for every recipe.
  """
  stride = 2**level
  return -(-int(canvas_hw[0]) // stride), -(-int(canvas_hw[1]) // stride)


def num_anchors(canvas_hw: Sequence[int], levels: Sequence[int]) -> int:
  """A = sum over levels of H_l * W_l."""
  return sum(h * w for h, w in (level_shape(canvas_hw, l) for l in levels))


def dense_anchors(canvas_hw: Sequence[int], levels: Sequence[int],
                  anchor_scale: float) -> dict[str, np.ndarray]:
  """All anchors of a canvas, flattened over (level, y, x).

  Args:
    canvas_hw: (height, width) of the padded network input in pixels.
    levels: pyramid levels, e.g. (3, 4, 5, 6, 7); stride of level l is 2**l.
    anchor_scale: anchor side in units of the level's stride (SPEC: 4, so
      32..512 px on P3..P7).

  Returns:
    dict with
      boxes: float32 [A, 4], (x1, y1, x2, y2) canvas pixels; the square of side
        anchor_scale * stride centred on the cell centre ((x + 0.5) * stride,
        (y + 0.5) * stride). Anchors are not clipped to the canvas.
      level: int32 [A], the pyramid level.
      yx: int32 [A, 2], (y, x) cell within the level.
      stride: float32 [A], 2**level in pixels.
  """
  boxes, level_ids, yxs, strides = [], [], [], []
  for level in levels:
    h, w = level_shape(canvas_hw, level)
    stride = float(2**level)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    cy, cx = (ys + 0.5) * stride, (xs + 0.5) * stride
    half = 0.5 * anchor_scale * stride
    boxes.append(np.stack([cx - half, cy - half, cx + half, cy + half], axis=1))
    level_ids.append(np.full(h * w, level, np.int32))
    yxs.append(np.stack([ys, xs], axis=1))
    strides.append(np.full(h * w, stride, np.float32))
  return dict(
      boxes=np.concatenate(boxes).astype(np.float32),
      level=np.concatenate(level_ids).astype(np.int32),
      yx=np.concatenate(yxs).astype(np.int32),
      stride=np.concatenate(strides).astype(np.float32))
