"""Drawing boxes on images with Pillow (demo pictures, eval and predict output).

`draw_boxes` draws captioned boxes; `draw_detections` draws a detector's
output (labels 1..K named by `class_name`) over optional ground truth.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOR = (0, 200, 0)  # green: ground truth in eval --viz pictures
DET_COLOR = (255, 40, 40)  # red: detections beside ground truth

# Distinct, saturated colours; a label always gets the same one.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
)


def label_color(label: str) -> tuple[int, int, int]:
  """A stable palette colour for a label name (same in every picture)."""
  return PALETTE[zlib.crc32(label.encode('utf-8')) % len(PALETTE)]


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | np.ndarray | None = None,
    color: tuple[int, int, int] | None = None,
    line_width: int = 2,
) -> Image.Image:
  """Returns a copy of `image` with boxes and their captions drawn.

  Args:
    image: uint8 [H, W, 3] RGB.
    boxes: [n, 4] (x1, y1, x2, y2) in pixels of `image`, end exclusive.
    labels: n caption strings (class names).
    scores: optional n scores in [0, 1], appended to the captions.
    color: one RGB colour for every box; None picks a colour per label.
    line_width: box outline width in pixels.

  Returns:
    A PIL RGB image of the same size.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if len(labels) != len(boxes):
    raise ValueError(f'{len(boxes)} boxes but {len(labels)} labels')
  if scores is not None and len(scores) != len(boxes):
    raise ValueError(f'{len(boxes)} boxes but {len(scores)} scores')
  canvas = Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
    rgb = color if color is not None else label_color(labels[i])
    # Pillow's rectangle includes its end point; boxes are end exclusive.
    draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=rgb,
                   width=line_width)
    caption = labels[i] if scores is None else f'{labels[i]} {float(scores[i]):.2f}'
    tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), caption, font=font)
    tw, th = tx2 - tx1, ty2 - ty1
    ty = y1 - th - 3 if y1 - th - 3 >= 0 else y1  # above the box when it fits
    draw.rectangle((x1, ty, x1 + tw + 3, ty + th + 3), fill=rgb)
    text_rgb = (0, 0, 0) if sum(rgb) > 380 else (255, 255, 255)
    draw.text((x1 + 2 - tx1, ty + 1 - ty1), caption, fill=text_rgb, font=font)
  return canvas


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores, classes,
                    class_names: Sequence[str], score_threshold: float,
                    gt_boxes: np.ndarray | None = None,
                    gt_classes: Sequence[int] | None = None) -> Image.Image:
  """PIL picture: gt (green, 'gt:' captions) then detections (red) above
  `score_threshold`. Boxes in pixels of `image`; classes are labels 1..K."""
  image = np.asarray(image, np.uint8)
  if gt_boxes is not None and len(gt_boxes):
    image = np.asarray(draw_boxes(
        image, gt_boxes, [f'gt:{class_name(class_names, c)}' for c in gt_classes],
        color=GT_COLOR))
  keep = np.asarray(scores) >= score_threshold
  return draw_boxes(
      image, np.asarray(boxes)[keep],
      [class_name(class_names, c) for c in np.asarray(classes)[keep]],
      scores=np.asarray(scores)[keep], color=None if gt_boxes is None
      else DET_COLOR)


def class_name(class_names: Sequence[str], label) -> str:
  """Name of label 1..K, or "class k" when unknown."""
  label = int(label)
  if 1 <= label <= len(class_names):
    return str(class_names[label - 1])
  return f'class {label}'
