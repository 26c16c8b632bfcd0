"""NumPy reference loops shared by several test files (written for clarity,
not speed): the independent references the JAX ops are checked against."""
import math

import numpy as np


def iou(a, b) -> float:
  """IoU of two [x1, y1, x2, y2] boxes; 0 when the union is empty."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) -
           inter)
  return inter / union if union > 0 else 0.0


def encode(box, ref, stds):
  """Box-regression deltas of `box` against `ref` ([x1, y1, x2, y2]): centre
  offsets over the ref's size and log size ratios, divided by `stds`."""
  w, h = box[2] - box[0], box[3] - box[1]
  rw, rh = ref[2] - ref[0], ref[3] - ref[1]
  d = [((box[0] + box[2]) / 2 - (ref[0] + ref[2]) / 2) / rw,
       ((box[1] + box[3]) / 2 - (ref[1] + ref[3]) / 2) / rh,
       math.log(w / rw), math.log(h / rh)]
  return np.array(d) / np.array(stds)


def soft_nms(boxes, scores, classes, sigma, threshold):
  """Gaussian soft-NMS as published (Bodla et al. 2017, Algorithm 1), per
  class: B the remaining boxes, D the kept ones. While B is not empty, the
  box M of B with the highest score (ties: the lower index) moves to D with
  its score; every box of B in M's class is rescored s * exp(-iou^2 / sigma)
  and the boxes whose score is now below `threshold` leave B. Boxes scoring
  below `threshold` at the start are never in B.

  Returns [(index, score)] in the order boxes entered D.
  """
  s = {i: float(scores[i]) for i in range(len(scores))
       if scores[i] >= threshold}
  kept = []
  while s:
    best = max(s.values())
    m = min(i for i, v in s.items() if v == best)
    kept.append((m, best))
    del s[m]
    for i in list(s):
      if classes is None or classes[i] == classes[m]:
        s[i] *= math.exp(-iou(boxes[m], boxes[i]) ** 2 / sigma)
        if s[i] < threshold:
          del s[i]
  return kept
