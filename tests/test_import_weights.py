"""Tests for torchvision/timm weight import, the orbax CLI and grafting.

Key names come from torchvision itself (the `{arch}_shapes` list recorded in
tests/data/torchvision_resnets.npz), not from the code under test.
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from mimicdet_jax.models import backbones as bb
from mimicdet_jax.tools import import_weights

DATA = os.path.join(os.path.dirname(__file__), 'data')
sys.path.insert(0, DATA)
import backbone_weights  # pylint: disable=g-import-not-at-top,wrong-import-position

HAS_TORCH = importlib.util.find_spec('torch') is not None


@pytest.fixture(scope='module')
def r50_state_dict():
  with np.load(os.path.join(DATA, 'torchvision_resnets.npz')) as f:
    shapes = json.loads(str(f['resnet50_shapes']))
  return backbone_weights.make_weights(shapes, seed=1)


@pytest.fixture(scope='module')
def r50_variables(r50_state_dict):
  return import_weights.variables_from_state_dict('resnet50',
                                                  r50_state_dict)


def test_mapping_and_layout(r50_state_dict, r50_variables):
  # Conv OIHW -> HWIO; frozen BN vectors copied as they are.
  sd = r50_state_dict
  p, f = r50_variables['params'], r50_variables['frozen']
  np.testing.assert_array_equal(p['conv1']['kernel'],
                                sd['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      p['layer3']['block0']['downsample_conv']['kernel'][0, 0],
      sd['layer3.0.downsample.0.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(
      p['layer4']['block2']['conv2']['kernel'][1, 2],
      sd['layer4.2.conv2.weight'][:, :, 1, 2].T)
  bn = f['layer2']['block1']['bn3']
  for ours, theirs in (('scale', 'weight'), ('bias', 'bias'),
                       ('mean', 'running_mean'), ('var', 'running_var')):
    np.testing.assert_array_equal(bn[ours], sd[f'layer2.1.bn3.{theirs}'])
  np.testing.assert_array_equal(
      f['layer1']['block0']['downsample_bn']['var'],
      sd['layer1.0.downsample.1.running_var'])
  # Every conv weight and BN vector of the state dict is used once.
  n_used = sum(1 for k in sd if not k.startswith('fc.')
               and not k.endswith('num_batches_tracked'))
  assert len(traverse_util.flatten_dict(r50_variables)) == n_used


def test_missing_unexpected_and_misshaped_keys_are_named(r50_state_dict):
  sd = dict(r50_state_dict)
  del sd['layer2.3.conv1.weight']
  del sd['layer1.0.downsample.1.running_mean']
  sd['layer5.0.conv1.weight'] = np.zeros((4, 4, 1, 1), np.float32)
  sd['layer3.1.bn2.bias'] = np.zeros((7,), np.float32)
  with pytest.raises(ValueError) as e:
    import_weights.variables_from_state_dict('resnet50', sd)
  msg = str(e.value)
  assert 'missing keys (2)' in msg
  assert 'layer2.3.conv1.weight' in msg
  assert 'layer1.0.downsample.1.running_mean' in msg
  assert 'unexpected keys (1): layer5.0.conv1.weight' in msg
  assert 'layer3.1.bn2.bias: file (7,) != expected (256,)' in msg


def test_wrong_arch_is_a_clear_error(r50_state_dict):
  with pytest.raises(ValueError, match='resnext101_32x8d'):
    import_weights.variables_from_state_dict('resnext101_32x8d',
                                             r50_state_dict)


def test_timm_key_names_and_prefixes(r50_state_dict, r50_variables):
  # timm's resnet50: torchvision names, often no num_batches_tracked, and
  # DDP / EMA wrappers add 'module.' / 'model.' prefixes.
  timm_sd = {f'module.model.{k}': v for k, v in r50_state_dict.items()
             if not k.endswith('num_batches_tracked')}
  got = import_weights.variables_from_state_dict('resnet50', timm_sd)
  flat_got = traverse_util.flatten_dict(got)
  flat_want = traverse_util.flatten_dict(r50_variables)
  assert flat_got.keys() == flat_want.keys()
  for k, v in flat_want.items():
    np.testing.assert_array_equal(flat_got[k], v)


def test_npz_and_safetensors_files_give_the_same_variables(
    tmp_path, r50_state_dict, r50_variables):
  save_file(r50_state_dict, str(tmp_path / 'w.safetensors'))
  np.savez(tmp_path / 'w.npz', **r50_state_dict)
  for name in ('w.safetensors', 'w.npz'):
    got = traverse_util.flatten_dict(
        import_weights.load_torchvision('resnet50', tmp_path / name))
    for k, v in traverse_util.flatten_dict(r50_variables).items():
      assert got[k].dtype == np.float32
      np.testing.assert_array_equal(got[k], v)
  with pytest.raises(ValueError, match='unsupported extension'):
    import_weights.load_torchvision('resnet50', tmp_path / 'w.h5')


@pytest.mark.skipif(HAS_TORCH, reason='checks the message shown without torch')
def test_pth_without_torch_says_how_to_convert(tmp_path):
  path = tmp_path / 'w.pth'
  path.write_bytes(b'not read')
  with pytest.raises(ImportError, match='safetensors'):
    import_weights.load_torchvision('resnet50', path)


@pytest.mark.torch
def test_pth_from_torchvision(tmp_path, r50_state_dict, r50_variables):
  torch = pytest.importorskip('torch')
  tv_models = pytest.importorskip('torchvision.models')
  model = tv_models.resnet50()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v))
                         for k, v in r50_state_dict.items()})
  model.eval()
  torch.save({'state_dict': model.state_dict()}, tmp_path / 'w.pth')
  got = import_weights.load_torchvision('resnet50', tmp_path / 'w.pth')
  for k, v in traverse_util.flatten_dict(r50_variables).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(got)[k], v)
  # And the forward against torchvision on a fresh image.
  x = np.random.default_rng(3).standard_normal((1, 64, 96, 3)).astype(
      np.float32)
  with torch.no_grad():
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    t = model.maxpool(model.relu(model.bn1(model.conv1(t))))
    ref = model.layer2(model.layer1(t)).numpy().transpose(0, 2, 3, 1)
  out = bb.ResNet('resnet50').apply(got, x)
  np.testing.assert_allclose(np.asarray(out['C3']), ref, rtol=1e-4, atol=1e-4)


def _tiny_state_dict(seed=0):
  """A torchvision-format state dict for resnet_tiny (which torchvision lacks)."""
  shapes = [(k, shape) for k, (_, _, shape) in import_weights.torch_key_map(
      'resnet_tiny').items()]
  return backbone_weights.make_weights(shapes, seed=seed)


def test_cli_checkpoint_roundtrip_and_graft(tmp_path):
  sd = _tiny_state_dict()
  src = tmp_path / 'tiny.safetensors'
  save_file(sd, str(src))
  out = tmp_path / 'ckpt'
  import_weights.main(['--arch', 'resnet_tiny', '--src', str(src),
                       '--out', str(out)])
  restored = import_weights.load_backbone_init(out)
  want = traverse_util.flatten_dict(
      import_weights.load_torchvision('resnet_tiny', src))
  got = traverse_util.flatten_dict(restored)
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v)

  # A stand-in for the full model's variables: backbone plus another module.
  shapes = bb.init_shapes('resnet_tiny')
  zeros = lambda tree: {k: jnp.zeros(v.shape, v.dtype) for k, v in
                        traverse_util.flatten_dict(dict(tree)).items()}
  full = {'params': {'backbone': traverse_util.unflatten_dict(
                         zeros(shapes['params'])),
                     'fpn': {'kernel': jnp.ones((3,))}},
          'frozen': {'backbone': traverse_util.unflatten_dict(
              zeros(shapes['frozen']))}}
  grafted = bb.graft_backbone(full, restored)
  np.testing.assert_array_equal(grafted['params']['fpn']['kernel'], 1.0)
  np.testing.assert_array_equal(
      grafted['params']['backbone']['layer4']['block0']['conv3']['kernel'],
      want[('params', 'layer4', 'block0', 'conv3', 'kernel')])
  np.testing.assert_array_equal(
      grafted['frozen']['backbone']['bn1']['var'],
      sd['bn1.running_var'])
  # The input tree is not modified.
  assert not np.asarray(full['frozen']['backbone']['bn1']['var']).any()


def test_graft_names_mismatches():
  shapes = bb.init_shapes('resnet_tiny')
  as_arrays = lambda tree: traverse_util.unflatten_dict(
      {k: np.zeros(v.shape, v.dtype)
       for k, v in traverse_util.flatten_dict(dict(tree)).items()})
  full = {'params': {'backbone': as_arrays(shapes['params'])},
          'frozen': {'backbone': as_arrays(shapes['frozen'])}}
  bad = {'params': as_arrays(shapes['params']),
         'frozen': as_arrays(shapes['frozen'])}
  bad['params']['layer2']['block0']['conv2']['kernel'] = np.zeros((1, 1, 1, 1))
  del bad['frozen']['bn1']['mean']
  bad['params']['head'] = {'kernel': np.zeros((2,))}
  with pytest.raises(ValueError) as e:
    bb.graft_backbone(full, bad)
  msg = str(e.value)
  assert 'shape params/backbone/layer2/block0/conv2/kernel' in msg
  assert 'missing in backbone variables: frozen/backbone/bn1/mean' in msg
  assert 'not in the model: params/backbone/head/kernel' in msg


def test_cli_as_module(tmp_path):
  src = tmp_path / 'tiny.npz'
  np.savez(src, **_tiny_state_dict())
  out = tmp_path / 'ckpt'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  res = subprocess.run(
      [sys.executable, '-m', 'mimicdet_jax.tools.import_weights', '--arch',
       'resnet_tiny', '--src', str(src), '--out', str(out)],
      capture_output=True, text=True, env=env, check=False)
  assert res.returncode == 0, res.stderr
  n = bb.count_parameters(bb.init_shapes('resnet_tiny'))
  assert f'{n:,} parameters' in res.stdout
  assert os.path.isdir(out)
  restored = import_weights.load_backbone_init(out)
  assert set(restored) == {'params', 'frozen'}
