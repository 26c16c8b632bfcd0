"""dense_anchors against a plain NumPy loop over (level, y, x)."""
import numpy as np
import pytest

from mimicdet_jax.models import anchors


def _loop_anchors(canvas_hw, levels, scale):
  boxes, level_ids, yx, strides = [], [], [], []
  for level in levels:
    s = 2**level
    h, w = int(np.ceil(canvas_hw[0] / s)), int(np.ceil(canvas_hw[1] / s))
    for y in range(h):
      for x in range(w):
        cx, cy, side = (x + 0.5) * s, (y + 0.5) * s, scale * s
        boxes.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
        level_ids.append(level)
        yx.append([y, x])
        strides.append(s)
  return (np.array(boxes, np.float32), np.array(level_ids), np.array(yx),
          np.array(strides, np.float32))


@pytest.mark.parametrize('canvas_hw', [(256, 256), (384, 640), (200, 300)])
def test_dense_anchors_match_loop(canvas_hw):
  levels = (3, 4, 5, 6, 7)
  got = anchors.dense_anchors(canvas_hw, levels, 4.0)
  boxes, level_ids, yx, strides = _loop_anchors(canvas_hw, levels, 4.0)
  np.testing.assert_allclose(got['boxes'], boxes, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(got['level'], level_ids)
  np.testing.assert_array_equal(got['yx'], yx)
  np.testing.assert_array_equal(got['stride'], strides)
  assert got['boxes'].dtype == np.float32 and got['level'].dtype == np.int32
  assert got['yx'].dtype == np.int32
  assert anchors.num_anchors(canvas_hw, levels) == len(boxes)


def test_anchor_sizes_follow_spec():
  # SPEC: side 4 x stride, 32 px on P3 .. 512 px on P7, centred on the cell.
  a = anchors.dense_anchors((256, 256), (3, 4, 5, 6, 7), 4.0)
  sides = a['boxes'][:, 2] - a['boxes'][:, 0]
  np.testing.assert_array_equal(sides, 4.0 * a['stride'])
  first_per_level = {l: a['boxes'][np.argmax(a['level'] == l)] for l in range(3, 8)}
  assert first_per_level[3].tolist() == [4 - 16, 4 - 16, 4 + 16, 4 + 16]
  assert first_per_level[7][2] - first_per_level[7][0] == 512
  # Origin order: level 3 first (32 x 32 cells), then level 4 starts.
  assert a['level'][32 * 32 - 1] == 3 and a['level'][32 * 32] == 4
  assert a['yx'][33].tolist() == [1, 1]


def test_level_shape_rounds_up_like_strided_convs():
  assert anchors.level_shape((896, 1408), 7) == (7, 11)
  assert anchors.level_shape((200, 300), 3) == (25, 38)
  assert anchors.level_shape((200, 300), 7) == (2, 3)
