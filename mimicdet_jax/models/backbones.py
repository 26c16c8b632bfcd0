"""ResNet / ResNeXt backbones (torchvision layout, NHWC).

The network is torchvision's `resnet50`, `resnet101`, `resnext101_32x8d` and
`resnext101_64x4d` (bottleneck blocks, stride on the 3x3 conv as in "v1.5"),
written in Flax linen with NHWC activations and HWIO kernels. `ResNet(arch)`
returns the outputs of torchvision's layer1..layer4 as C2..C5 (strides 4, 8,
16, 32).

Variables come in two collections:
  * 'params': conv kernels (and GroupNorm scale/bias when `norm='group_norm'`).
  * 'frozen': frozen-BatchNorm affine and statistics (scale, bias, mean, var),
    never a batch statistic and never differentiated or updated. They are
    initialised as the identity (scale 1, bias 0, mean 0, var 1), which is the
    from-scratch default; `tools.import_weights.load_torchvision` fills them
    from a pretrained state dict.

Module paths mirror torchvision's names so the weight mapping
(tools/import_weights.py) is mechanical:
  conv1, bn1                          <- conv1, bn1
  layer{s}/block{b}/conv{k}, bn{k}    <- layer{s}.{b}.conv{k}, bn{k}
  layer{s}/block0/downsample_conv     <- layer{s}.0.downsample.0
  layer{s}/block0/downsample_bn       <- layer{s}.0.downsample.1
Inside a MimicDet model the backbone submodule is named `backbone`, so the
full-model paths are params['backbone'][...] and frozen['backbone'][...].
"""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax.models.layers import Conv1x1
from mimicdet_jax.ops import grouped_conv

BN_EPS = 1e-5  # torchvision BatchNorm2d default
BACKBONE_NAME = 'backbone'  # name of the backbone submodule in MimicDet
NORMS = ('frozen_bn', 'group_norm')
GROUP_NORM_GROUPS = 32  # Wu & He; reduced to gcd(32, C) for narrow layers


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Shape of a bottleneck ResNet / ResNeXt.

  Attributes:
    stage_sizes: blocks per stage (layer1..layer4).
    groups: ResNeXt cardinality of the 3x3 conv.
    width_per_group: ResNeXt bottleneck width factor (64 for plain ResNet).
    stem_width: output channels of the 7x7 stem conv.
    base_planes: planes of stage 1; stage s has base_planes * 2**(s-1) planes
      and base_planes * 2**(s-1) * 4 output channels.
  """
  stage_sizes: tuple[int, ...]
  groups: int = 1
  width_per_group: int = 64
  stem_width: int = 64
  base_planes: int = 64

  expansion = 4  # bottleneck output = 4 * planes

  def planes(self, stage: int) -> int:
    """Planes of stage `stage` (0-based)."""
    return self.base_planes * 2**stage

  def out_channels(self) -> dict[str, int]:
    """Channels of C2..C5, e.g. {'C2': 256, ..., 'C5': 2048} for resnet50."""
    return {f'C{s + 2}': self.planes(s) * self.expansion
            for s in range(len(self.stage_sizes))}


ARCHS: dict[str, ArchSpec] = {
    'resnet50': ArchSpec((3, 4, 6, 3)),
    'resnet101': ArchSpec((3, 4, 23, 3)),
    'resnext101_32x8d': ArchSpec((3, 4, 23, 3), groups=32, width_per_group=8),
    'resnext101_64x4d': ArchSpec((3, 4, 23, 3), groups=64, width_per_group=4),
    # CPU demo: one block per stage, C2..C5 with 32/64/128/256 channels.
    'resnet_tiny': ArchSpec((1, 1, 1, 1), stem_width=16, base_planes=8),
}

# torchvision initialises convs with kaiming_normal_(mode='fan_out', 'relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class FrozenBatchNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias with fixed statistics.

  The four vectors live in the 'frozen' collection: they are never trained and
  never replaced by batch statistics. Computed as x * a + b with a, b folded
  in float32 and cast to `dtype`.
  """
  eps: float = BN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.variable('frozen', 'scale', jnp.ones, (c,), jnp.float32)
    bias = self.variable('frozen', 'bias', jnp.zeros, (c,), jnp.float32)
    mean = self.variable('frozen', 'mean', jnp.zeros, (c,), jnp.float32)
    var = self.variable('frozen', 'var', jnp.ones, (c,), jnp.float32)
    a = scale.value * jax.lax.rsqrt(var.value + self.eps)
    b = bias.value - mean.value * a
    return x * a.astype(self.dtype) + b.astype(self.dtype)


def _norm(norm: str, channels: int, dtype: Any, name: str) -> nn.Module:
  if norm == 'frozen_bn':
    return FrozenBatchNorm(dtype=dtype, name=name)
  if norm == 'group_norm':
    return nn.GroupNorm(num_groups=math.gcd(GROUP_NORM_GROUPS, channels),
                        epsilon=BN_EPS, dtype=dtype, param_dtype=jnp.float32,
                        name=name)
  raise ValueError(f'norm must be one of {NORMS}, got {norm!r}')


class GroupedConv3x3(nn.Module):
  """nn.Conv's 3x3 grouped conv (same 'kernel' parameter, padding 1) through
  `ops.grouped_conv` (`impl`: its IMPLS; 'auto' is block-diagonal on TPU)."""
  features: int
  stride: int
  groups: int
  impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _conv_init,
                        (3, 3, x.shape[-1] // self.groups, self.features),
                        jnp.float32)
    return grouped_conv.grouped_conv3x3(
        x.astype(self.dtype), kernel.astype(self.dtype), self.groups,
        self.stride, self.impl)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str,
          groups: int = 1, grouped_impl: str = 'auto') -> nn.Module:
  if kernel == 3 and groups > 1:
    return GroupedConv3x3(features, stride, groups, grouped_impl, dtype,
                          name=name)
  if kernel == 1 and groups == 1:
    # Same 'kernel' parameter as nn.Conv (checkpoints load unchanged), as a
    # matmul: XLA:CPU's weight-gradient 1x1 conv is 2-3x slower than a dot.
    return Conv1x1(features, kernel_init=_conv_init, dtype=dtype,
                   use_bias=False, stride=stride, name=name)
  # Explicit symmetric padding k//2 as torchvision; 'SAME' would pad
  # stride-2 convs asymmetrically and shift the output by half a pixel.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=_conv_init, name=name)


def _pool_taps(xp: jax.Array, ho: int, wo: int):
  """(i, j, tap) for the nine stride-2 taps of a 3x3 window over padded xp."""
  b, _, _, c = xp.shape
  for i in range(3):
    for j in range(3):
      yield i, j, jax.lax.slice(
          xp, (0, i, j, 0), (b, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c),
          (1, 2, 2, 1))


def _max_pool_with_index(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max over the nine taps, int8 index 3 i + j of the first maximal tap)."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = index = None
  for i, j, tap in _pool_taps(xp, (h + 1) // 2, (w + 1) // 2):
    if out is None:
      out, index = tap, jnp.zeros(tap.shape, jnp.int8)
    else:
      better = tap > out  # strict: ties keep the earlier tap, as torch does
      out = jnp.where(better, tap, out)
      index = jnp.where(better, jnp.int8(3 * i + j), index)
  return out, index


def _max_pool_reduce_window_with_index(x: jax.Array):
  """The max as one `lax.reduce_window` (what TPUs and GPUs do natively),
  the index of the first maximal tap by comparing the taps with it (dead
  code, removed by XLA, unless the backward pass reads it)."""
  out = jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                              (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  index = jnp.full(out.shape, 8, jnp.int8)
  for i, j, tap in reversed(list(_pool_taps(xp, (h + 1) // 2, (w + 1) // 2))):
    index = jnp.where(tap == out, jnp.int8(3 * i + j), index)
  return out, index


def _max_pool_and_index(x: jax.Array):
  """(max, first-maximum index): the nine-tap chain on CPU, `reduce_window`
  elsewhere. On a TPU the chain's nine strided slices of the stem's output
  (each materialised) cost the R50 backbone 0.8 GB per step of 2 images
  (docs/BENCHMARKS.md, "The stem's max pool on TPU")."""
  return jax.lax.platform_dependent(
      x, cpu=_max_pool_with_index, default=_max_pool_reduce_window_with_index)


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(3, stride=2, padding=1) on [B, H, W, C] (-inf padding).

  The max of the nine strided window taps; the values equal
  nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))) exactly. The gradient
  goes to the first maximal tap of each window, as torch's does: the
  forward keeps that tap's index (int8), and the backward spreads the
  output gradient back with nine strided pads. XLA's own gradients cost
  more on XLA:CPU: select-and-scatter 57 ms for [8, 128, 128, 16] fwd+bwd,
  the nine taps' select chain differentiated by JAX 3.2 ms for [4, 128,
  128, 16] alone but 11.7 ms inside the demo step, against 1.7 ms here
  (docs/BENCHMARKS.md, "The stem's max pool"). On other platforms the
  max is one `lax.reduce_window` (`_max_pool_and_index`); the same values
  and gradients.
  """
  return _max_pool_and_index(x)[0]


def _max_pool_fwd(x):
  out, index = _max_pool_and_index(x)
  return out, (index, x.shape[1:3])


def _max_pool_bwd(residuals, g):
  index, (h, w) = residuals
  ho, wo = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  grad = None
  for i in range(3):
    for j in range(3):
      # Tap (i, j) read x rows i - 1 + 2 r and columns j - 1 + 2 s.
      lo_h, lo_w = i - 1, j - 1
      part = jax.lax.pad(
          jnp.where(index == 3 * i + j, g, zero), zero,
          ((0, 0, 0), (lo_h, h - lo_h - 2 * ho + 1, 1),
           (lo_w, w - lo_w - 2 * wo + 1, 1), (0, 0, 0)))
      grad = part if grad is None else grad + part
  return (grad,)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (stride, groups) -> 1x1 (x4), + shortcut.

  Input [B, H, W, Cin] -> output [B, ceil(H / stride), ceil(W / stride),
  4 * planes]. The shortcut is a strided 1x1 conv + norm when the shape
  changes (the first block of each stage), else the identity.
  """
  planes: int
  stride: int = 1
  groups: int = 1
  width_per_group: int = 64
  norm: str = 'frozen_bn'
  dtype: Any = jnp.float32
  grouped_conv: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    out_ch = self.planes * ArchSpec.expansion
    y = _conv(width, 1, 1, self.dtype, 'conv1')(x)
    y = nn.relu(_norm(self.norm, width, self.dtype, 'bn1')(y))
    y = _conv(width, 3, self.stride, self.dtype, 'conv2', self.groups,
              self.grouped_conv)(y)
    y = nn.relu(_norm(self.norm, width, self.dtype, 'bn2')(y))
    y = _conv(out_ch, 1, 1, self.dtype, 'conv3')(y)
    y = _norm(self.norm, out_ch, self.dtype, 'bn3')(y)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = _conv(out_ch, 1, self.stride, self.dtype, 'downsample_conv')(x)
      x = _norm(self.norm, out_ch, self.dtype, 'downsample_bn')(x)
    return nn.relu(y + x)


class ResNetStage(nn.Module):
  """One stage (torchvision `layer{s}`): blocks named block0, block1, ..."""
  num_blocks: int
  planes: int
  stride: int
  groups: int = 1
  width_per_group: int = 64
  norm: str = 'frozen_bn'
  dtype: Any = jnp.float32
  grouped_conv: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for b in range(self.num_blocks):
      x = Bottleneck(self.planes, self.stride if b == 0 else 1, self.groups,
                     self.width_per_group, self.norm, self.dtype,
                     self.grouped_conv, name=f'block{b}')(x)
    return x


class ResNet(nn.Module):
  """Bottleneck ResNet / ResNeXt backbone returning C2..C5.

  Attributes:
    arch: a key of ARCHS.
    frozen_stages: 0 = nothing frozen; k >= 1 = stem and stages 1..k frozen
      (1 = stem + layer1, the detection default). Frozen stages get no
      gradient (stop_gradient on their outputs); the optimiser must also give
      their params no update and no weight decay: see `frozen_param_mask`.
    remat: wrap each stage in nn.remat (recompute activations in backward).
    dtype: compute dtype (e.g. jnp.bfloat16); params stay float32.
    norm: 'frozen_bn' (default; identity-initialised frozen BatchNorm, filled
      by pretrained weights) or 'group_norm' (trainable, for from-scratch
      training; not loadable from torchvision checkpoints).
    grouped_conv: how ResNeXt's grouped 3x3 convs run, one of
      `ops.grouped_conv.IMPLS` (same parameters and outputs for each).
  """
  arch: str
  frozen_stages: int = 1
  remat: bool = False
  dtype: Any = jnp.float32
  norm: str = 'frozen_bn'
  grouped_conv: str = 'auto'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False
               ) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      images: [B, H, W, 3] normalised images (NHWC).
      train: accepted for a uniform module interface; it has no effect
        (frozen BN and GroupNorm behave the same in training and inference).

    Returns:
      {'C2': [B, H/4, W/4, C2], ..., 'C5': [B, H/32, W/32, C5]} in `dtype`
      (sizes rounded up, as torchvision's padded convs do).
    """
    del train
    if self.arch not in ARCHS:
      raise ValueError(f'unknown arch {self.arch!r}; one of {sorted(ARCHS)}')
    spec = ARCHS[self.arch]
    if not 0 <= self.frozen_stages <= len(spec.stage_sizes):
      raise ValueError(f'frozen_stages must be in [0, {len(spec.stage_sizes)}]'
                       f', got {self.frozen_stages}')
    x = images.astype(self.dtype)
    x = _conv(spec.stem_width, 7, 2, self.dtype, 'conv1')(x)
    x = nn.relu(_norm(self.norm, spec.stem_width, self.dtype, 'bn1')(x))
    x = max_pool_3x3_s2(x)

    stage_cls = nn.remat(ResNetStage) if self.remat else ResNetStage
    outputs = {}
    for s, num_blocks in enumerate(spec.stage_sizes):
      x = stage_cls(num_blocks, spec.planes(s), 1 if s == 0 else 2,
                    spec.groups, spec.width_per_group, self.norm, self.dtype,
                    self.grouped_conv, name=f'layer{s + 1}')(x)
      if s < self.frozen_stages:
        # The stem only feeds layer1, so this also cuts the stem's gradient.
        x = jax.lax.stop_gradient(x)
      outputs[f'C{s + 2}'] = x
    return outputs


def frozen_module_names(frozen_stages: int) -> tuple[str, ...]:
  """Top-level backbone module names frozen by `frozen_stages`."""
  if frozen_stages <= 0:
    return ()
  return ('conv1', 'bn1') + tuple(f'layer{s + 1}' for s in range(frozen_stages))


def frozen_param_mask(params: Mapping[str, Any], frozen_stages: int) -> Any:
  """Pytree of bools like `params`, True where a leaf is frozen.

  For the optimiser (e.g. optax.masked / multi_transform): frozen leaves get
  no update, no weight decay and no optimiser state.

  Args:
    params: either the backbone's own params (top-level keys conv1, bn1,
      layer1..) or a full model's params holding the backbone under
      params['backbone']; in the latter case only that subtree can be frozen.
    frozen_stages: as `ResNet.frozen_stages`.
  """
  names = frozen_module_names(frozen_stages)
  under_backbone = BACKBONE_NAME in params

  def is_frozen(path, _):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if under_backbone:
      return len(keys) > 1 and keys[0] == BACKBONE_NAME and keys[1] in names
    return bool(keys) and keys[0] in names

  return jax.tree_util.tree_map_with_path(is_frozen, params)


def count_parameters(variables: Mapping[str, Any]) -> int:
  """Number of parameters as torchvision's `sum(p.numel() for p in parameters())`.

  Counts every 'params' leaf plus the frozen-BN scale and bias (nn.Parameters
  in torchvision); the running mean/var are buffers there and are not
  counted. Works on arrays or jax.ShapeDtypeStruct leaves.
  """
  n = sum(int(np.prod(v.shape))
          for v in jax.tree_util.tree_leaves(variables.get('params', {})))
  frozen = traverse_util.flatten_dict(dict(variables.get('frozen', {})))
  n += sum(int(np.prod(v.shape)) for k, v in frozen.items()
           if k[-1] in ('scale', 'bias'))
  return n


def init_shapes(arch: str, norm: str = 'frozen_bn') -> dict[str, Any]:
  """Variable shapes of ResNet(arch) as jax.ShapeDtypeStruct (no compute)."""
  model = ResNet(arch, norm=norm)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def graft_backbone(variables: Mapping[str, Any],
                   backbone_variables: Mapping[str, Any],
                   name: str = BACKBONE_NAME) -> dict[str, Any]:
  """Puts backbone variables into a full model's variables under `name`.

  Args:
    variables: the full model's variables, e.g. {'params': {'backbone': ...,
      'fpn': ...}, 'frozen': {'backbone': ...}}.
    backbone_variables: {'params': ..., 'frozen': ...} of the backbone alone
      (from `import_weights.load_torchvision` or `load_backbone_init`).
    name: the backbone submodule's name in the full model.

  Returns:
    A copy of `variables` with variables[col][name] replaced by NumPy arrays
    of the dtype of the leaves they replace; everything else is shared.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped variable.
  """
  out = {col: dict(tree) for col, tree in variables.items()}
  cols = set(backbone_variables) | {c for c, t in variables.items() if name in t}
  problems = []
  grafted = {}
  for col in sorted(cols):
    target = traverse_util.flatten_dict(
        dict(variables.get(col, {}).get(name, {})))
    source = traverse_util.flatten_dict(dict(backbone_variables.get(col, {})))
    fmt = lambda k, col=col: f'{col}/{name}/' + '/'.join(k)
    problems += [f'missing in backbone variables: {fmt(k)}'
                 for k in sorted(set(target) - set(source))]
    problems += [f'not in the model: {fmt(k)}'
                 for k in sorted(set(source) - set(target))]
    problems += [f'shape {fmt(k)}: model {tuple(target[k].shape)} != '
                 f'backbone {tuple(np.shape(source[k]))}'
                 for k in sorted(set(source) & set(target))
                 if tuple(target[k].shape) != tuple(np.shape(source[k]))]
    # NumPy (host) arrays: the caller decides placement and sharding.
    grafted[col] = traverse_util.unflatten_dict(
        {k: np.asarray(v, target[k].dtype) for k, v in source.items()
         if k in target})
  if problems:
    raise ValueError('backbone variables do not fit the model:\n  '
                     + '\n  '.join(problems[:60])
                     + (f'\n  ... (+{len(problems) - 60} more)'
                        if len(problems) > 60 else ''))
  for col, tree in grafted.items():
    out[col][name] = tree
  return out
