"""viz.draw_boxes draws outlines on the box edges and leaves the input alone."""
import numpy as np
import pytest

from mimicdet_jax import viz


def test_outline_on_the_box_edges():
  image = np.zeros((60, 80, 3), np.uint8)
  out = np.asarray(viz.draw_boxes(image, [[20, 30, 50, 55]], ['cat'],
                                  color=(255, 0, 0), line_width=1))
  assert out.shape == image.shape and (image == 0).all()  # input untouched
  red = (out[..., 0] == 255) & (out[..., 1] == 0)
  # End-exclusive box: outline on columns 20 and 49, rows 30 and 54.
  assert red[30:55, 20].all() and red[30:55, 49].all()
  assert red[30, 20:50].all() and red[54, 20:50].all()
  assert not red[31:54, 21:49].any()  # inside stays empty
  assert not red[56:, :].any() and not red[:, 51:].any()
  assert red[:30].any()  # caption background above the box


def test_label_colours_scores_and_argument_checks():
  image = np.full((40, 40, 3), 128, np.uint8)
  a = np.asarray(viz.draw_boxes(image, [[2, 20, 12, 30]], ['x'], scores=[0.5]))
  assert not (a == 128).all()
  assert viz.label_color('dog') == viz.label_color('dog')
  assert len({viz.label_color(n) for n in ('circle', 'square', 'triangle', 'star',
                                           'cross', 'ring')}) >= 4
  with pytest.raises(ValueError, match='labels'):
    viz.draw_boxes(image, [[0, 0, 5, 5]], [])
  with pytest.raises(ValueError, match='scores'):
    viz.draw_boxes(image, [[0, 0, 5, 5]], ['a'], scores=[])
  empty = np.asarray(viz.draw_boxes(image, np.zeros((0, 4)), []))
  np.testing.assert_array_equal(empty, image)
