"""The real model through every user command, as a user runs them.

One chain of subprocesses on a tiny synthetic set (128 px canvas, narrow
heads, image ids past 2**31): train.py (one step, a checkpoint, evaluated:
the best checkpoint) -> train.py again (resumes, second step) -> eval.py for
head t (latest checkpoint) and head both (--checkpoint best) ->
eval.py --detections (scoring only) -> predict.py (head s) on a
folder with an unreadable file -> train.py with data.augment=lsj. Each stage
is checked on what it writes.

Speed (this runs in `make test`): every process shares one persistent JAX
compilation cache, so the resumed run and predict reuse what the first
processes compiled, and XLA's CPU backend skips its expensive LLVM passes.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from mimicdet_jax import checkpoint
from tests import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 2**40  # added to every image id: ids must not pass through int32
SUMMARY_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
MAX_DETECTIONS = 10

# configs/demo.py shrunk (as tests/eval_helper.tiny_config), on the command
# line as a user would; data paths are added per test.
TINY = [
    '--config.data.train_min_sizes=(128,)', '--config.data.min_size=128',
    '--config.data.max_size=128', '--config.data.canvas_buckets=((128,128),)',
    '--config.model.fpn_channels=16', '--config.refine.channels=16',
    '--config.s_head.channels=16', '--config.s_head.offset_hidden=(8,8)',
    '--config.s_head.cls_dim=32', '--config.s_head.reg_dim=32',
    '--config.t_head.fc_dim=32', '--config.t_head.conv_dim=16',
    '--config.t_head.num_convs=1', '--config.proposals.pre_nms_topk=32',
    '--config.proposals.num_proposals=32', '--config.t_head.num_samples=16',
    '--config.s_head.ohem_samples=16', '--config.eval.pre_nms_topk=32',
    f'--config.eval.max_detections={MAX_DETECTIONS}',
    '--config.eval.batch_size=4', '--config.eval.viz=2',
    '--config.train.batch_size=2', '--config.train.log_every=1',
    '--config.train.checkpoint_every=1', '--config.eval.at_end=False',
]


def _synthetic(root):
  """4 train + 4 val images; every image id shifted by BIG."""
  from mimicdet_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.main([root, '--num-train', '4', '--num-val', '4', '--seed', '0',
                  '--min-size', '96', '--max-size', '160', '--workers', '1'])
  for split in ('train', 'val'):
    path = os.path.join(root, 'annotations', f'{split}.json')
    with open(path) as f:
      d = json.load(f)
    for img in d['images']:
      img['id'] += BIG
    for ann in d['annotations']:
      ann['image_id'] += BIG
    with open(path, 'w') as f:
      json.dump(d, f)
  return synthetic.CATEGORIES


def _run(env, *argv):
  proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (argv, proc.stderr[-4000:])
  return proc


def _json(path):
  with open(path) as f:
    return json.load(f)


def _metrics_rows(work):
  with open(os.path.join(work, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _check_eval(work, gt, step):
  """WORKDIR/eval/{detections,metrics}.json of one eval.py run."""
  dets = _json(os.path.join(work, 'eval', 'detections.json'))
  metrics = _json(os.path.join(work, 'eval', 'metrics.json'))
  images = {i['id']: i for i in gt['images']}
  assert dets, 'no detections'
  assert {d['image_id'] for d in dets} <= set(images)
  assert min(d['image_id'] for d in dets) > BIG
  assert {d['category_id'] for d in dets} <= {c['id'] for c in gt['categories']}
  per_image = {}
  for d in dets:
    x, y, w, h = d['bbox']
    img = images[d['image_id']]
    assert x >= 0 and y >= 0 and w > 0 and h > 0
    assert x + w <= img['width'] + 0.01 and y + h <= img['height'] + 0.01
    assert 0 < d['score'] <= 1
    per_image[d['image_id']] = per_image.get(d['image_id'], 0) + 1
  assert max(per_image.values()) <= MAX_DETECTIONS
  assert set(SUMMARY_KEYS) <= set(metrics)
  assert all(-1 <= metrics[k] <= 1 for k in SUMMARY_KEYS)
  assert 0 <= metrics['AP'] <= metrics['AP50'] <= 1
  assert set(metrics['per_class']) == {c['name'] for c in gt['categories']}
  assert metrics['step'] == step
  assert metrics['num_images'] == len(gt['images'])
  assert metrics['num_detections'] == len(dets)
  return dets, metrics


def test_train_resume_eval_score_predict(tmp_path):
  data, work = str(tmp_path / 'data'), str(tmp_path / 'work')
  categories = _synthetic(data)
  env = dict(
      os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
      XLA_FLAGS=subprocess_env.xla_flags(1),  # the suite's fast-compile flags
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  flags = TINY + [
      f'--config.data.train_annotations={data}/annotations/train.json',
      f'--config.data.train_images={data}/train',
      f'--config.data.val_annotations={data}/annotations/val.json',
      f'--config.data.val_images={data}/val']
  train = ['train.py', '--config', 'configs/demo.py', '--workdir', work,
           # train.py's own cache (train.compile_cache): the test's, not ~
           f'--config.train.compile_cache={tmp_path / "jax_cache"}']

  # 1. Train one step: a checkpoint, the resolved config, the categories;
  # evaluated at its end, step 1 is the best checkpoint (train.keep_best).
  _run(env, *train, *flags, '--config.train.total_steps=1',
       '--config.train.eval_every=1')
  assert sorted(os.listdir(os.path.join(work, 'checkpoints'))) == ['1']
  assert sorted(os.listdir(os.path.join(work, checkpoint.BEST_DIR))) == [
      '1', 'best.json']
  config = _json(os.path.join(work, 'config.json'))
  assert config['model']['num_classes'] == len(categories)
  assert config['s_head']['num_logits'] == len(categories) + 1
  assert _json(os.path.join(work, 'categories.json')) == list(categories)
  first = _metrics_rows(work)
  assert [r['step'] for r in first] == [1]
  for key in ('loss', 'loss_refine_cls', 'loss_t_cls', 'loss_s_cls',
              'loss_mimic', 'grad_norm'):
    assert np.isfinite(first[0][key]) and first[0][key] > 0, key

  # 2. The same command with more steps resumes from step 1.
  proc = _run(env, *train, *flags, '--config.train.total_steps=2')
  assert 'resumed from step 1' in proc.stderr
  assert sorted(os.listdir(os.path.join(work, 'checkpoints'))) == ['1', '2']
  rows = _metrics_rows(work)
  assert [r['step'] for r in rows] == [1, 2]
  assert rows[0] == first[0]  # step 1's row kept as written
  assert np.isfinite(rows[1]['loss'])

  # 3. eval.py on a checkpoint (config from WORKDIR/config.json): head t on
  # the latest (step 2), head both on --checkpoint best (step 1). The
  # default head, s, runs in predict below; how each head combines the two
  # heads' outputs: tests/test_switches.py test_eval_head_switch.
  gt = _json(os.path.join(data, 'annotations', 'val.json'))
  results = {}
  for head, which in (('t', 'latest'), ('both', 'best')):
    proc = _run(env, 'eval.py', '--workdir', work, '--head', head,
                '--checkpoint', which)
    assert 'Average Precision' in proc.stdout
    results[head] = _check_eval(work, gt, step={'latest': 2, 'best': 1}[which])
  assert len(os.listdir(os.path.join(work, 'eval', 'viz'))) == 2
  # Each head scores its own boxes: --head reached the model, the S-head's
  # outputs count in `both`.
  key = lambda dets: [(d['image_id'], d['category_id'], d['bbox'])
                      for d in dets]
  assert key(results['both'][0]) != key(results['t'][0])

  # 4. Scoring only: the last detections file gives the same numbers.
  out = str(tmp_path / 'scored' / 'metrics.json')
  _run(env, 'eval.py', '--detections',
       os.path.join(work, 'eval', 'detections.json'), '--annotations',
       os.path.join(data, 'annotations', 'val.json'), '--metrics-out', out)
  scored = _json(out)
  for k in SUMMARY_KEYS:
    assert scored[k] == results['both'][1][k], k
  assert scored['per_class'] == results['both'][1]['per_class']

  # 5. predict on a folder: the four val images and one unreadable file.
  images = str(tmp_path / 'images')
  shutil.copytree(os.path.join(data, 'val'), images)
  with open(os.path.join(images, 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8 this is no jpeg')
  pred = str(tmp_path / 'pred')
  proc = _run(env, 'predict.py', '--workdir', work,
              '--images', images, '--out', pred)
  assert 'skipped 1 unreadable file(s): broken.jpg' in proc.stdout
  result = _json(os.path.join(pred, 'detections.json'))
  assert result['checkpoint_step'] == 2
  assert result['class_names'] == [c['name'] for c in categories]
  assert [s['file_name'] for s in result['skipped']] == ['broken.jpg']
  sizes = {i['file_name']: (i['height'], i['width']) for i in gt['images']}
  assert sorted(i['file_name'] for i in result['images']) == sorted(sizes)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for image in result['images']:
    h, w = sizes[image['file_name']]
    assert (image['height'], image['width']) == (h, w)
    stem = os.path.splitext(image['file_name'])[0]
    with Image.open(os.path.join(pred, f'{stem}.png')) as picture:
      assert picture.size == (w, h)
    assert 0 < len(image['detections']) <= MAX_DETECTIONS
    for d in image['detections']:
      x1, y1, x2, y2 = d['bbox']
      assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
      assert d['class_name'] == result['class_names'][d['label'] - 1]

  # 6. data.augment=lsj at the 128 px canvas stage 1 compiled: train.py runs
  # on the one lsj canvas, loading the same compiled step from the cache.
  lsj_work = str(tmp_path / 'lsj')
  _run(env, *train[:3], '--workdir', lsj_work, *train[5:], *flags,
       '--config.data.augment=lsj', '--config.data.lsj_size=128',
       '--config.train.total_steps=2')
  assert _json(os.path.join(lsj_work, 'config.json'))['data']['augment'] == 'lsj'
  rows = _metrics_rows(lsj_work)
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in rows)
