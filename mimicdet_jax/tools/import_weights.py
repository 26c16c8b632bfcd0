"""Converts torchvision / timm ResNet weights into an orbax backbone checkpoint.

  python -m mimicdet_jax.tools.import_weights --arch resnet50 \
      --src resnet50.safetensors --out weights/resnet50

The output directory is what configs name as `model.backbone_init`. The train
loop reads it with `load_backbone_init` and puts it into the full model with
`mimicdet_jax.models.backbones.graft_backbone` (under the `backbone`
submodule: params['backbone'][...], frozen['backbone'][...]).
"""
import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import orbax.checkpoint as ocp

from mimicdet_jax import errors
from mimicdet_jax.models import backbones


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
  variables = backbones.load_torchvision(args.arch, args.src)
  out = save_backbone_init(variables, args.out, force=args.force)
  n = backbones.count_parameters(variables)
  print(f'{args.arch}: {n:,} parameters (without fc) -> {out}\n'
        f'use it with --config.model.backbone_init={out}')


if __name__ == '__main__':
  errors.cli(main)(sys.argv[1:])
