"""A small Flax model and grain data for the training-machinery tests.

Imported by tests/test_training.py and tests/test_checkpoint.py, and run as
a script (a separate process) by the SIGKILL/SIGTERM and two-process tests:

  python tests/train_helper.py --workdir DIR --total_steps 6 \
      [--kill_at 4 --kill_signal KILL] [--coordinator localhost:PORT
      --num_processes 2 --process_id 0] [--parallelism shard_map]
      [--demo SYNTHETIC_DATA_DIR] [--kill_in_save 4]

The toy model has the pieces the loop must handle: a 'backbone' subtree with
a frozen part, a 'frozen' variable collection, dropout driven by the loss's
PRNG key (so the key policy matters), and 1-D biases (no weight decay).
"""
import argparse
import json
import os
import signal
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from mimicdet_jax.training import launch
from mimicdet_jax.training import loop as loop_lib

IMAGE = 8  # toy images are [IMAGE, IMAGE, 3]


class ToyBackbone(nn.Module):

  @nn.compact
  def __call__(self, x):
    scale = self.variable('frozen', 'scale', lambda: jnp.full((3,), 0.5))
    x = x * scale.value
    x = nn.relu(nn.Conv(4, (3, 3), name='stem')(x))
    return nn.relu(nn.Conv(4, (3, 3), strides=2, name='layer2')(x))


class ToyNet(nn.Module):

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = ToyBackbone(name='backbone')(images)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(2, name='head')(x)


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.optim.base_lr = 0.05
  c.optim.base_batch_size = 8
  c.optim.warmup_steps = 2
  c.optim.decay_steps = (4,)
  c.train.batch_size = 8
  c.train.total_steps = 6
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 3
  c.eval.at_end = False
  for k, v in train_overrides.items():
    setattr(c.train, k, v)
  return c


def toy_variables(seed: int = 0) -> dict:
  variables = ToyNet().init(jax.random.PRNGKey(seed),
                            jnp.zeros((1, IMAGE, IMAGE, 3)))
  return jax.device_get(dict(variables))


def toy_frozen_mask(params) -> dict:
  """The backbone stem is frozen, like MimicDet's stem + stage 1."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: [p.key for p in path][:2] == ['backbone', 'stem'],
      params)


def toy_loss(params, frozen, batch, rng):
  """Mean squared error of the toy net with dropout; aux has two terms."""
  out = ToyNet().apply({'params': params, 'frozen': frozen}, batch['image'],
                       train=True, rngs={'dropout': rng})
  err = jnp.square(out - batch['target'])
  return jnp.mean(err), {'err_x': jnp.mean(err[:, 0]),
                         'err_y': jnp.mean(err[:, 1])}


def _example(index: int, nan_from: int) -> dict:
  rng = np.random.default_rng(index)
  image = rng.normal(size=(IMAGE, IMAGE, 3)).astype(np.float32)
  if nan_from >= 0 and index >= nan_from:
    image[0, 0, 0] = np.nan
  return {'image': image,
          'target': rng.normal(size=(2,)).astype(np.float32),
          'index': np.int32(index)}


def toy_iterator(global_batch: int, *, num_local_devices: int,
                 process_index: int = 0, process_count: int = 1,
                 nan_from: int = -1):
  """A grain iterator of [num_local_devices, per_device, ...] batches.

  Example i (of an endless stream) is fixed by i alone; process p reads
  examples p, p + P, p + 2P, ... Examples with index >= nan_from carry a NaN
  pixel.
  """
  local_batch = global_batch // process_count
  per_device = local_batch // num_local_devices
  ds = (grain.MapDataset.range(10**6)[process_index::process_count]
        .map(lambda i: _example(int(i), nan_from))
        .batch(local_batch, drop_remainder=True)
        .map(lambda b: jax.tree.map(
            lambda x: x.reshape((num_local_devices, per_device) + x.shape[1:]),
            b)))
  return iter(ds.to_iter_dataset())


class Recording:
  """A training iterator that records the example ids it handed out."""

  def __init__(self, iterator, key: str):
    self.iterator, self.key, self.seen = iterator, key, []

  def __next__(self):
    batch = next(self.iterator)
    self.seen.extend(np.asarray(batch[self.key]).ravel().tolist())
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def demo_config(data_dir: str, **train_overrides) -> ml_collections.ConfigDict:
  """configs/demo.py shrunk for tests: 128 px canvas, 32 proposals."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.data.train_annotations = os.path.join(data_dir, 'annotations/train.json')
  c.data.train_images = os.path.join(data_dir, 'train')
  c.data.val_annotations = os.path.join(data_dir, 'annotations/val.json')
  c.data.val_images = os.path.join(data_dir, 'val')
  c.data.train_min_sizes = (128,)
  c.data.min_size = c.data.max_size = 128
  c.data.canvas_buckets = ((128, 128),)
  c.proposals.pre_nms_topk = c.proposals.num_proposals = 32
  c.eval.pre_nms_topk = 32
  c.t_head.num_samples = 16
  c.s_head.ohem_samples = 16
  c.eval.at_end = False
  c.train.batch_size = 2
  c.train.total_steps = 3
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  for k, v in train_overrides.items():
    setattr(c.train, k, v)
  return c


def run_demo(workdir: str, config: ml_collections.ConfigDict, *,
             on_step_end=None):
  """training.launch's MimicDet wiring, with the consumed image ids recorded."""
  kwargs = launch.build_training(config, str(workdir))
  kwargs['train_iter'] = Recording(kwargs['train_iter'], 'image_id')
  kwargs['eval_fn'] = None
  recording = kwargs['train_iter']
  final = loop_lib.run_training(kwargs.pop('config'), kwargs.pop('workdir'),
                                 on_step_end=on_step_end, **kwargs)
  return final, recording.seen


def run_toy(workdir: str, config: ml_collections.ConfigDict, *,
            nan_from: int = -1, on_step_end=None, loss_fn=toy_loss,
            monitors=(), finish_module=None):
  """run_training on the toy model; returns (final state, example indices seen)."""
  variables = toy_variables()
  it = toy_iterator(config.train.batch_size,
                    num_local_devices=jax.local_device_count(),
                    process_index=jax.process_index(),
                    process_count=jax.process_count(), nan_from=nan_from)
  recording = Recording(it, 'index')
  final = loop_lib.run_training(
      config, str(workdir), variables=variables,
      frozen_mask=toy_frozen_mask(variables['params']), loss_fn=loss_fn,
      train_iter=recording, on_step_end=on_step_end, monitors=monitors,
      finish_module=finish_module)
  return final, recording.seen


def flat_params(params) -> dict:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def kill_inside_save(step: int) -> None:
  """SIGKILLs this process in the middle of writing checkpoint `step`.

  The kill comes from inside orbax's save, when grain's handler asks the
  iterator snapshot for its state: the step's temporary directory exists
  and the save has not been committed. (A kill after `save` returns races
  with the background writer and may land after the commit.)
  """
  from mimicdet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  saving = []
  save, get_state = checkpoint.Checkpointer.save, checkpoint._IteratorSnapshot.get_state

  def recording_save(self, s, *args, **kwargs):
    saving[:] = [s]
    return save(self, s, *args, **kwargs)

  def killing_get_state(self):
    if saving == [step]:
      print(f'KILLED IN SAVE {step}', flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return get_state(self)

  checkpoint.Checkpointer.save = recording_save
  checkpoint._IteratorSnapshot.get_state = killing_get_state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--total_steps', type=int, default=6)
  parser.add_argument('--kill_at', type=int, default=-1)
  parser.add_argument('--kill_signal', default='KILL')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--parallelism', default='pmap',
                      help='train.parallelism: pmap | shard_map')
  parser.add_argument('--demo', default='',
                      help='synthetic data dir: train MimicDet (demo_config)')
  parser.add_argument('--kill_in_save', type=int, default=-1,
                      help='SIGKILL inside the save of this step')
  args = parser.parse_args()
  if args.kill_in_save >= 0:
    kill_inside_save(args.kill_in_save)

  launch.initialize_distributed(args.coordinator, args.num_processes,
                                   args.process_id)

  def on_step_end(step):
    print(f'STEP {step}', flush=True)
    if step == args.kill_at:
      os.kill(os.getpid(), getattr(signal, 'SIG' + args.kill_signal))

  if args.demo:
    final, seen = run_demo(args.workdir, demo_config(
        args.demo, total_steps=args.total_steps,
        parallelism=args.parallelism), on_step_end=on_step_end)
  else:
    final, seen = run_toy(args.workdir,
                          toy_config(total_steps=args.total_steps,
                                     parallelism=args.parallelism),
                          on_step_end=on_step_end)
  index = jax.process_index()
  np.savez(os.path.join(args.workdir, f'final_{index}.npz'),
           **flat_params(final.params))
  with open(os.path.join(args.workdir, f'seen_{index}.json'), 'w') as f:
    json.dump(seen, f)
  print('DONE', int(final.step), flush=True)


if __name__ == '__main__':
  main()
