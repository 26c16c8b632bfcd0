"""Test-time augmentation (eval.tta): the horizontal flip of a padded canvas
batch, and of the mirror's boxes back (postprocess.make_predict_fn merges
both detections before NMS).

An image sits top-left on its canvas (data/transforms.py), so an image of
width w is mirrored inside its own columns, not the canvas': column x < w
takes column w - 1 - x and the padding stays where it is. A box (x1, x2) of
the mirror, in end-exclusive pixels, is (w - x2, w - x1) in the image, the
rule of the training flip (transforms.transform_example).
"""
import jax
import jax.numpy as jnp

Array = jnp.ndarray

# eval.tta: 'none', or the image and its horizontal mirror in one batch;
# config_lib.resolve checks the key against this tuple.
TTA_MODES = ('none', 'hflip')


def hflip_images(images: Array, image_size: Array) -> Array:
  """Mirrors each image inside its valid width.

  Args:
    images: [B, Hc, Wc, C] canvases, images top-left.
    image_size: int [B, 2] (h, w) of each image inside its canvas.
  Returns:
    [B, Hc, Wc, C]: columns [0, w) reversed, columns >= w unchanged.
  """
  x = jnp.arange(images.shape[2])[None, :]  # [1, Wc]
  w = image_size[:, 1:2].astype(x.dtype)  # [B, 1]
  source = jnp.where(x < w, w - 1 - x, x)  # [B, Wc]
  return jax.vmap(lambda image, cols: image[:, cols])(images, source)


def unflip_boxes(boxes: Array, image_width: Array) -> Array:
  """Boxes of the mirrored images back to the images.

  Args:
    boxes: [B, N, 4] x1y1x2y2 in pixels of the mirrored images.
    image_width: [B] w of each image (not of the canvas).
  Returns:
    [B, N, 4]: x1' = w - x2, x2' = w - x1; y unchanged.
  """
  w = image_width.astype(boxes.dtype)[:, None]
  return jnp.stack([w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0],
                    boxes[..., 3]], axis=-1)
