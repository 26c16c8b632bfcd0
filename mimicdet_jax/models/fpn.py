"""Feature pyramid P2..P7 (FPN top-down path, RetinaNet-style P6/P7)."""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimicdet_jax.models.layers import Conv1x1

# detectron2's c2_xavier_fill (kaiming_uniform, a=1): Var = 1 / fan_in.
c2_xavier_fill = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')

BACKBONE_LEVELS = (2, 3, 4, 5)  # C2..C5


def upsample_nearest(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour upsampling [B, h, w, C] -> [B, H, W, C].

  Row i of the output reads row floor(i * h / H) of the input (torch's
  F.interpolate(mode='nearest')); for H = 2h that is the usual x2 repeat, and
  it stays correct when an odd size rounded up on the way down.
  """
  b, h, w, c = x.shape
  if out_hw[0] % h == 0 and out_hw[1] % w == 0:
    # An integer factor: a broadcast, whose backward is a sum, where the
    # general gather's is a scatter-add (and XLA:CPU transposed the lateral
    # conv's output around it: 4.5 ms of the demo step, docs/BENCHMARKS.md).
    fh, fw = out_hw[0] // h, out_hw[1] // w
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, fh, w, fw, c))
    return x.reshape(b, out_hw[0], out_hw[1], c)
  rows = (jnp.arange(out_hw[0]) * h) // out_hw[0]
  cols = (jnp.arange(out_hw[1]) * w) // out_hw[1]
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Lateral 1x1 + top-down nearest upsampling + 3x3 output convs.

  P6 = 3x3 stride-2 conv on the P5 *output* (RetinaNet), P7 = ReLU + 3x3
  stride-2 conv on P6. Only the requested levels (and those they depend on)
  are built, so a pyramid without P2 has no C2 lateral parameters.

  Attributes:
    channels: width of every level (model.fpn_channels).
    levels: the pyramid levels to return, subset of 2..7 (the union of
      model.t_levels and model.s_levels).
    dtype: compute dtype; parameters are float32.
  """
  channels: int
  levels: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c_features: Mapping[str, jax.Array]) -> dict[int, jax.Array]:
    """Args: c_features {'C2'..'C5': [B, H/2**l, W/2**l, C_l]}.

    Returns {level: [B, H_l, W_l, channels]} for each level in `levels`.
    """
    conv = lambda k, s, name: nn.Conv(  # pylint: disable=g-long-lambda
        self.channels, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2,
        dtype=self.dtype, param_dtype=jnp.float32, kernel_init=c2_xavier_fill,
        bias_init=nn.initializers.zeros, name=name)
    min_level, max_level = min(self.levels), max(self.levels)
    # The top-down path runs from C5 down to the finest requested level.
    top_down_levels = [l for l in BACKBONE_LEVELS if l >= min(min_level, 5)]
    p = {}
    inner = None
    for level in reversed(top_down_levels):
      lateral = Conv1x1(self.channels, kernel_init=c2_xavier_fill,
                        dtype=self.dtype, name=f'lateral_c{level}')(
          c_features[f'C{level}'].astype(self.dtype))
      if inner is not None:
        lateral = lateral + upsample_nearest(inner, lateral.shape[1:3])
      inner = lateral
      p[level] = conv(3, 1, f'output_p{level}')(inner)
    if max_level >= 6:
      p[6] = conv(3, 2, 'p6')(p[5])
    if max_level >= 7:
      p[7] = conv(3, 2, 'p7')(nn.relu(p[6]))
    return {level: p[level] for level in self.levels}
