"""Converts torchvision / timm ResNet weights into an orbax backbone checkpoint.

  python -m mimicdet_jax.tools.import_weights --arch resnet50 \
      --src resnet50.safetensors --out weights/resnet50

`load_torchvision` reads a state dict (.safetensors, .npz, .pth) and maps its
torchvision key names onto `backbones.ResNet`'s variables (conv OIHW -> HWIO,
frozen-BN vectors as they are); the output directory is what configs name as
`model.backbone_init`. The train loop reads it with `load_backbone_init` and
puts it into the full model with `mimicdet_jax.models.backbones.graft_backbone`
(under the `backbone` submodule: params['backbone'][...],
frozen['backbone'][...]).
"""
import argparse
import os
import re
import sys
from typing import Any, Mapping, Sequence

from flax import traverse_util
import numpy as np
import orbax.checkpoint as ocp

from mimicdet_jax import errors
from mimicdet_jax.models import backbones


# Leaf name in Flax -> suffix of the torchvision state-dict key.
_FROZEN_BN_LEAF = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                   'var': 'running_var'}
# Wrappers and prefixes seen in torchvision / timm / training checkpoints.
_WRAPPER_KEYS = ('state_dict', 'model', 'module', 'state_dict_ema')
_PREFIXES = ('module.', 'model.', 'backbone.', 'encoder.')


def _torch_module(module_path: tuple[str, ...]) -> str:
  """Flax module path -> torchvision module name, e.g. layer1/block0/bn1 ->
  layer1.0.bn1 and .../downsample_conv -> ....downsample.0."""
  parts = []
  for p in module_path:
    if re.fullmatch(r'block\d+', p):
      parts.append(p[len('block'):])
    elif p == 'downsample_conv':
      parts += ['downsample', '0']
    elif p == 'downsample_bn':
      parts += ['downsample', '1']
    else:
      parts.append(p)
  return '.'.join(parts)


def torch_key_map(arch: str) -> dict[str, tuple[str, tuple[str, ...],
                                                tuple[int, ...]]]:
  """torchvision state-dict key -> (collection, flax path, torch shape).

  Derived from the Flax model's own variables, so every variable is mapped
  exactly once. Conv kernels are HWIO in Flax and OIHW in torch.
  """
  shapes = backbones.init_shapes(arch)
  out = {}
  for col, tree in shapes.items():
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
      module, name = path[:-1], path[-1]
      if col == 'params' and name == 'kernel':
        kh, kw, i, o = leaf.shape
        out[f'{_torch_module(module)}.weight'] = (col, path, (o, i, kh, kw))
      elif col == 'frozen':
        out[f'{_torch_module(module)}.{_FROZEN_BN_LEAF[name]}'] = (
            col, path, tuple(leaf.shape))
      else:
        raise AssertionError(f'unmapped variable {col}/{"/".join(path)}')
  return out


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors / .npz / .pth state dict as NumPy arrays."""
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  if path.endswith('.npz'):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(('.pth', '.pt', '.bin')):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'{path}: reading .pth needs torch, which is not installed. Convert '
          'it where torch is available, e.g. `safetensors.torch.save_file('
          'torch.load(p, map_location="cpu"), "w.safetensors")`, or save it '
          'with numpy.savez, and pass the .safetensors / .npz file.') from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    for key in _WRAPPER_KEYS:  # training checkpoints wrap the state dict
      if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
    return {k: v.detach().float().numpy() if v.is_floating_point()
            else v.detach().numpy()
            for k, v in obj.items() if hasattr(v, 'detach')}
  raise ValueError(f'{path}: unsupported extension; use .safetensors, .npz or '
                   '.pth')


def canonical_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision key names from torchvision or timm state dicts.

  timm's ResNet / ResNeXt use torchvision's names (conv1, bn1, layer1.0.conv1,
  layer1.0.downsample.0, fc), sometimes without num_batches_tracked and often
  under a 'module.' / 'model.' prefix; those prefixes are stripped when every
  key has them. The classifier (fc.*) and num_batches_tracked are dropped.
  """
  sd = dict(sd)
  stripped = True
  while stripped and sd:
    stripped = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        stripped = True
  return {k: v for k, v in sd.items()
          if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}


def _fmt_keys(keys, limit: int = 30) -> str:
  keys = sorted(keys)
  more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def variables_from_state_dict(arch: str, sd: Mapping[str, np.ndarray]
                              ) -> dict[str, Any]:
  """Maps a torchvision/timm state dict to {'params': ..., 'frozen': ...}.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key.
  """
  sd = canonical_state_dict(sd)
  key_map = torch_key_map(arch)
  missing = set(key_map) - set(sd)
  unexpected = set(sd) - set(key_map)
  mis_shaped = [f'{k}: file {tuple(np.shape(sd[k]))} != expected '
                f'{key_map[k][2]}'
                for k in sorted(set(sd) & set(key_map))
                if tuple(np.shape(sd[k])) != key_map[k][2]]
  if missing or unexpected or mis_shaped:
    msg = [f'state dict does not match torchvision {arch}:']
    if missing:
      msg.append(f'  missing keys ({len(missing)}): {_fmt_keys(missing)}')
    if unexpected:
      msg.append(f'  unexpected keys ({len(unexpected)}): '
                 f'{_fmt_keys(unexpected)}')
    if mis_shaped:
      msg.append(f'  mismatched shapes ({len(mis_shaped)}): '
                 + '; '.join(mis_shaped[:30]))
    raise ValueError('\n'.join(msg))
  flat = {}
  for key, (col, path, _) in key_map.items():
    value = np.asarray(sd[key], np.float32)
    if col == 'params':  # conv OIHW -> HWIO
      value = np.transpose(value, (2, 3, 1, 0))
    flat[(col,) + path] = np.ascontiguousarray(value)
  return traverse_util.unflatten_dict(flat)


def load_torchvision(arch: str, path: str | os.PathLike) -> dict[str, Any]:
  """Reads a torchvision (or timm) ResNet/ResNeXt state dict for ResNet(arch).

  Args:
    arch: a key of backbones.ARCHS (the checkpoint must be that
      architecture).
    path: .safetensors or .npz (always) or .pth (when torch is installed)
      with torchvision key names (timm names and 'module.'/'model.' prefixes
      accepted). fc.* is ignored.

  Returns:
    {'params': {...}, 'frozen': {...}} of float32 NumPy arrays, the variables
    of `backbones.ResNet(arch)` (norm='frozen_bn').
  """
  return variables_from_state_dict(arch, _read_state_dict(path))


def save_backbone_init(variables: Mapping[str, Any], out_dir: str | os.PathLike,
                       force: bool = False) -> str:
  """Writes backbone variables {'params', 'frozen'} as an orbax checkpoint.

  Returns:
    The absolute checkpoint directory.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir, dict(variables), force=force)
    ckptr.wait_until_finished()
  return out_dir


def load_backbone_init(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a checkpoint written by this tool.

  Returns:
    {'params': ..., 'frozen': ...} of the backbone alone (host arrays), ready
    for `backbones.graft_backbone(model_variables, <this>)`.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise errors.MissingFileError(
        f'model.backbone_init {path} is not a directory; create it with '
        'python -m mimicdet_jax.tools.import_weights')
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m mimicdet_jax.tools.import_weights', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', required=True, choices=sorted(backbones.ARCHS))
  parser.add_argument('--src', required=True,
                      help='torchvision/timm state dict: .safetensors, .npz '
                      'or .pth (needs torch)')
  parser.add_argument('--out', required=True, help='orbax checkpoint dir')
  parser.add_argument('--force', action='store_true',
                      help='overwrite --out if it exists')
  args = parser.parse_args(argv)
  if not os.path.isfile(args.src):
    raise errors.MissingFileError(f'--src {args.src}: file not found')
  variables = load_torchvision(args.arch, args.src)
  out = save_backbone_init(variables, args.out, force=args.force)
  n = backbones.count_parameters(variables)
  print(f'{args.arch}: {n:,} parameters (without fc) -> {out}\n'
        f'use it with --config.model.backbone_init={out}')


if __name__ == '__main__':
  errors.cli(main)(sys.argv[1:])
