"""Small layers shared by the pyramid and the heads."""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimicdet_jax.ops.matmul import channel_matmul


class Conv1x1(nn.Module):
  """A 1x1 convolution computed as a matmul over the channel axis.

  Same parameters as `nn.Conv(features, (1, 1), strides=(s, s),
  use_bias=use_bias)` ('kernel' [1, 1, Cin, Cout], 'bias' [Cout] if
  use_bias) and the same values, but its weight gradient is a plain matmul
  (`ops.matmul.channel_matmul`): on XLA:CPU the convolution's fwd+bwd took
  2.4-3.3x as long as the equivalent dot (benchmarks/conv_vs_matmul.py,
  docs/BENCHMARKS.md), and on GPU/TPU a 1x1 conv is a matmul anyway. A
  stride s > 1 (torchvision's downsample shortcut: 1x1, stride 2, no
  padding) keeps every s-th pixel of the two spatial axes [..., H, W, Cin]
  first, as that convolution does.
  """
  features: int
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros
  dtype: Any = jnp.float32
  use_bias: bool = True
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., Cin] -> [..., features] in self.dtype ([..., H, W, Cin] ->
    [..., ceil(H / stride), ceil(W / stride), features] when stride > 1)."""
    kernel = self.param('kernel', self.kernel_init,
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    if self.stride > 1:
      x = x[..., ::self.stride, ::self.stride, :]
    y = channel_matmul(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if not self.use_bias:
      return y
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return y + bias.astype(self.dtype)
