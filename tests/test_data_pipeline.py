"""grain pipelines: device batch layout, 2-host sharding, resumable iterator,
padded eval batches, build_source."""
import collections
import itertools

import numpy as np
import pytest

from configs import common
from mimicdet_jax.data import coco
from mimicdet_jax.data import pipeline
from mimicdet_jax.data import synthetic

N = 12


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
  out = tmp_path_factory.mktemp('syn')
  ann = synthetic.write_split(str(out), 'train', N, seed=5, min_size=48,
                              max_size=96, image_format='png')
  return ann, str(out / 'train')


@pytest.fixture(scope='module')
def source(paths):
  return coco.CocoSource(*paths)


def _config(paths, batch_size=4, **data):
  c = common.base_config()
  c.data.train_annotations, c.data.train_images = paths
  c.data.val_annotations, c.data.val_images = paths
  c.data.train_min_sizes = (64, 80)
  c.data.min_size = 64
  c.data.max_size = 128
  c.data.canvas_buckets = ((128, 128),)
  c.data.max_boxes = 10
  c.data.update(data)
  c.train.batch_size = batch_size
  c.seed = 3
  return c


def test_uint8_batches_normalised_in_the_step_equal_host_float32(paths,
                                                                  source):
  """data.device_normalize: the same loader batches, uint8 pixels; the step's
  normalisation gives bit-identical model inputs (and identical labels)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  batches = {}
  for on_device in (True, False):
    config = _config(paths, batch_size=4, device_normalize=on_device)
    loader = pipeline.make_train_loader(config, source, num_local_devices=1,
                                        process_index=0, process_count=1)
    batches[on_device] = list(itertools.islice(iter(loader), 3))
  normalise = jax.jit(lambda i, s: transforms.normalize_on_device(
      i, s, config.data))
  for pixels, host in zip(batches[True], batches[False]):
    assert pixels['image'].dtype == np.uint8
    assert host['image'].dtype == np.float32
    assert (pixels['image_size'] < 128).any()  # padding is part of the check
    for k in host:
      if k != 'image':
        np.testing.assert_array_equal(pixels[k], host[k], err_msg=k)
    got = np.asarray(normalise(pixels['image'], pixels['image_size']))
    np.testing.assert_array_equal(got, host['image'])


def test_batches_have_device_layout_and_static_shapes(paths, source):
  config = _config(paths, batch_size=4)
  loader = pipeline.make_train_loader(config, source, num_local_devices=2,
                                      process_index=0, process_count=1)
  for batch in itertools.islice(iter(loader), 4):
    assert batch['image'].shape == (2, 2, 128, 128, 3)
    assert batch['image'].dtype == np.uint8  # data.device_normalize
    assert batch['boxes'].shape == (2, 2, 10, 4)
    for k in ('classes', 'box_mask', 'is_crowd'):
      assert batch[k].shape == (2, 2, 10)
    assert batch['image_size'].shape == (2, 2, 2) and batch['scale'].shape == (2, 2)
    assert batch['image_id'].shape == (2, 2)
    # Boxes inside the resized image; padding slots are zero with class 0.
    size = batch['image_size'][..., None, :]
    mask = batch['box_mask']
    assert (batch['boxes'][..., 2][mask] <= size[..., 1].repeat(10, -1)[mask]).all()
    assert (batch['classes'][~mask] == 0).all() and (batch['classes'][mask] >= 1).all()


def test_batch_size_must_divide_over_devices(paths, source):
  with pytest.raises(ValueError, match=r'train.batch_size=6 .*2 hosts x 2 local'):
    pipeline.make_train_loader(_config(paths, batch_size=6), source,
                               num_local_devices=2, process_index=0,
                               process_count=2)


def test_two_hosts_cover_every_example_once_per_epoch(paths, source):
  config = _config(paths, batch_size=4)  # 2 hosts x 1 device x 2 per device
  per_host = {}
  for host in (0, 1):
    loader = pipeline.make_train_loader(config, source, num_local_devices=1,
                                        process_index=host, process_count=2)
    ids = [b['image_id'].reshape(-1).tolist()
           for b in itertools.islice(iter(loader), 2 * N // 4)]  # two epochs
    per_host[host] = list(itertools.chain(*ids))
  half = N // 2
  epochs = [per_host[0][e * half:(e + 1) * half] + per_host[1][e * half:(e + 1) * half]
            for e in range(2)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(1, N + 1))  # each image exactly once
  assert not set(per_host[0][:half]) & set(per_host[1][:half])  # disjoint hosts
  assert per_host[0][:half] != per_host[0][half:]  # reshuffled each epoch


def test_same_seed_same_stream_other_seed_other_order(paths, source):
  def first_ids(seed):
    config = _config(paths, batch_size=4)
    config.seed = seed
    loader = pipeline.make_train_loader(config, source, num_local_devices=1,
                                        process_index=0, process_count=1)
    return [b['image_id'].tolist() for b in itertools.islice(iter(loader), 3)]
  assert first_ids(3) == first_ids(3)
  assert first_ids(3) != first_ids(4)


def test_restored_iterator_continues_with_the_identical_next_batch(paths, source):
  config = _config(paths, batch_size=2)
  loader = pipeline.make_train_loader(config, source, num_local_devices=1,
                                      process_index=0, process_count=1)
  it = iter(loader)
  for _ in range(7):  # past the end of the first epoch (6 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]

  fresh = pipeline.make_train_loader(config, coco.CocoSource(*paths),
                                     num_local_devices=1, process_index=0,
                                     process_count=1)
  resumed = iter(fresh)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:  # same examples, same random scale / flip
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_batches_cover_the_split_with_padding(paths, source, process_count):
  config = _config(paths)
  batch_size = 4
  seen, counts = [], set()
  for host in range(process_count):
    batches = list(pipeline.make_eval_batches(config, source, batch_size, host,
                                              process_count))
    counts.add(len(batches))
    for b in batches:
      assert b['image'].shape == (batch_size, 128, 128, 3)
      assert b['example_valid'].shape == (batch_size,)
      seen += b['image_id'][b['example_valid']].tolist()
  assert len(counts) == 1  # every host yields the same number of batches
  assert sorted(seen) == list(range(1, N + 1))  # each image exactly once
  if process_count == 1:
    assert counts == {3}


def test_eval_batches_are_the_eval_transform(paths, source):
  config = _config(paths)
  batch = next(pipeline.make_eval_batches(config, source, 5))
  np.testing.assert_array_equal(batch['example_valid'], [True] * 5)
  ex = source[2]
  h, w = ex['orig_size']
  fx = batch['image_size'][2, 1] / w
  fy = batch['image_size'][2, 0] / h
  n = len(ex['boxes'])
  np.testing.assert_allclose(batch['boxes'][2, :n],
                             ex['boxes'] * np.array([fx, fy, fx, fy]), rtol=1e-5)
  assert min(batch['image_size'][2]) == 64 or max(batch['image_size'][2]) == 128
  last = list(pipeline.make_eval_batches(config, source, 5))[-1]
  np.testing.assert_array_equal(last['example_valid'], [True, True, False, False, False])


def test_build_source_dispatch_and_errors(paths):
  config = _config(paths)
  src = pipeline.build_source(config.data, 'train')
  assert isinstance(src, coco.CocoSource) and len(src) == N
  config.data.val_annotations = ''
  with pytest.raises(ValueError, match='data.val_annotations'):
    pipeline.build_source(config.data, 'val')


@pytest.mark.slow
def test_worker_processes_give_the_same_examples(paths, source):
  """Workers split batches round robin, so the batch order differs from the
  in-process loader, but the same records get the same random transform."""
  def run(workers):
    config = _config(paths, batch_size=2, num_workers=workers)
    loader = pipeline.make_train_loader(config, source, num_local_devices=1,
                                        process_index=0, process_count=1)
    examples = {}
    for b in itertools.islice(iter(loader), 4):
      for i, image_id in enumerate(b['image_id'].reshape(-1).tolist()):
        examples[image_id] = (np.array(b['image'][0, i]), np.array(b['boxes'][0, i]))
    return examples
  serial, parallel = run(0), run(2)
  assert sorted(serial) == sorted(parallel) and len(serial) == 8
  for image_id, (image, boxes) in serial.items():
    np.testing.assert_array_equal(parallel[image_id][0], image)
    np.testing.assert_array_equal(parallel[image_id][1], boxes)


@pytest.mark.slow
def test_eval_batches_with_workers_match_in_process(paths, source):
  serial = list(pipeline.make_eval_batches(_config(paths), source, 5))
  parallel = list(pipeline.make_eval_batches(_config(paths, num_workers=2),
                                             source, 5))
  assert len(serial) == len(parallel) == 3
  for a, b in zip(serial, parallel):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_skipped_image_is_replaced_mid_epoch(paths, tmp_path):
  import json, shutil  # pylint: disable=g-import-not-at-top,multiple-imports
  ann, image_dir = paths
  work = tmp_path / 'imgs'
  shutil.copytree(image_dir, work)
  first = json.load(open(ann))['images'][0]['file_name']
  (work / first).unlink()
  src = coco.CocoSource(ann, str(work), bad_input='skip')
  config = _config(paths, batch_size=2)
  loader = pipeline.make_train_loader(config, src, num_local_devices=1,
                                      process_index=0, process_count=1)
  ids = collections.Counter(
      itertools.chain(*[b['image_id'].reshape(-1).tolist()
                        for b in itertools.islice(iter(loader), N // 2)]))
  assert 1 not in ids and sum(ids.values()) == N  # epoch completes
  assert ids[2] == 2  # the next image stands in for the missing one
