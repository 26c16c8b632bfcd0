"""eval.py's scoring-only mode against pycocotools run directly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import warm_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gt_and_dets(rng):
  """Four images, categories 5 and 12 (non-contiguous), noisy detections."""
  images = [dict(id=i, width=200, height=160, file_name=f'{i}.png')
            for i in (1, 2, 3, 9)]
  categories = [dict(id=5, name='square'), dict(id=12, name='disc')]
  anns, dets = [], []
  for img in images:
    for k in range(3):
      cat = (5, 12)[k % 2]
      x, y = rng.uniform(0, 120, 2)
      w, h = rng.uniform(8, 70, 2)
      anns.append(dict(id=len(anns) + 1, image_id=img['id'], category_id=cat,
                       bbox=[x, y, w, h], area=w * h, iscrowd=0))
      if rng.uniform() < 0.8:  # some misses
        dets.append(dict(image_id=img['id'], category_id=cat,
                         bbox=[x + rng.normal(0, 4), y + rng.normal(0, 4),
                               w * rng.uniform(0.8, 1.2), h],
                         score=float(rng.uniform(0.1, 1))))
    # a false positive per image
    dets.append(dict(image_id=img['id'], category_id=12,
                     bbox=[150, 100, 30, 30], score=float(rng.uniform(0, 1))))
  return dict(images=images, categories=categories, annotations=anns), dets


def _pycocotools_stats(gt_path, dets):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  coco = COCO(gt_path)
  e = COCOeval(coco, coco.loadRes(dets), 'bbox')
  e.evaluate()
  e.accumulate()
  e.summarize()
  return e.stats


def _run_eval(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope='module')
def warm():
  """eval.py as a child of one interpreter that imported jax & co. once
  (tests/warm_cli.py; tests/test_cli_errors.py compares it with a fresh
  process): the quick command-line tests below, ~2.8 s of CPU each less."""
  runner = warm_cli.WarmRunner(dict(os.environ, JAX_PLATFORMS='cpu'))
  yield lambda *args: runner.run(os.path.join(ROOT, 'eval.py'), *args)
  runner.close()


def test_scoring_mode_gives_pycocotools_numbers(warm, tmp_path):
  gt, dets = _gt_and_dets(np.random.default_rng(0))
  gt_path, det_path = tmp_path / 'gt.json', tmp_path / 'dets.json'
  gt_path.write_text(json.dumps(gt))
  det_path.write_text(json.dumps(dets))
  out_path = tmp_path / 'out' / 'm.json'
  proc = warm('--detections', str(det_path), '--annotations',
              str(gt_path), '--metrics-out', str(out_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(out_path.read_text())
  stats = _pycocotools_stats(str(gt_path), dets)
  keys = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100',
          'ARs', 'ARm', 'ARl')
  for key, value in zip(keys, stats):
    assert metrics[key] == value, key  # exactly, not approximately
  assert 0 < metrics['AP'] < 1
  assert set(metrics['per_class']) == {'square', 'disc'}
  assert metrics['num_detections'] == len(dets)
  # The standard table and the per-class table are printed.
  assert 'Average Precision  (AP) @[ IoU=0.50:0.95' in proc.stdout
  assert 'Per-class bbox AP' in proc.stdout and 'square' in proc.stdout


def test_scoring_mode_default_path_and_empty_detections(warm, tmp_path):
  gt, _ = _gt_and_dets(np.random.default_rng(1))
  gt_path, det_path = tmp_path / 'gt.json', tmp_path / 'run' / 'dets.json'
  det_path.parent.mkdir()
  gt_path.write_text(json.dumps(gt))
  det_path.write_text('[]')
  proc = warm('--detections', str(det_path), '--annotations',
              str(gt_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  assert metrics['AP'] == 0.0 and metrics['AP50'] == 0.0
  assert 'no detections' in (proc.stdout + proc.stderr).lower()


def test_detections_without_annotations_is_a_usage_error(warm, tmp_path):
  proc = warm('--detections', str(tmp_path / 'x.json'))
  assert proc.returncode != 0
  assert '--annotations' in proc.stderr


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from tests import eval_helper
  return eval_helper.make_workdir(str(tmp_path_factory.mktemp('eval')))


@pytest.mark.slow
def test_eval_cli_on_a_checkpoint_writes_coco_results(workdir):
  """eval.py --workdir (config from WORKDIR/config.json), 8 CPU devices."""
  _, config, data_dir, work = workdir
  proc = _run_eval('--workdir', work, '--checkpoint', 'latest', '--viz', '2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  gt = json.loads(open(f'{data_dir}/annotations/val.json').read())
  dets = json.loads(open(f'{work}/eval/detections.json').read())
  gt_images = {i['id']: i for i in gt['images']}
  assert dets and {d['image_id'] for d in dets} <= set(gt_images)
  assert {d['category_id'] for d in dets} <= {c['id'] for c in gt['categories']}
  per_image = {}
  for d in dets:
    x, y, w, h = d['bbox']
    img = gt_images[d['image_id']]
    assert x >= 0 and y >= 0 and w >= 0 and h >= 0
    assert x + w <= img['width'] + 0.01 and y + h <= img['height'] + 0.01
    per_image[d['image_id']] = per_image.get(d['image_id'], 0) + 1
  assert max(per_image.values()) <= config.eval.max_detections
  metrics = json.loads(open(f'{work}/eval/metrics.json').read())
  assert metrics['step'] == 3 and metrics['num_detections'] == len(dets)
  assert all(-1 <= metrics[k] <= 1 for k in ('AP', 'AP50', 'AR100'))
  assert len(os.listdir(f'{work}/eval/viz')) == 2
  assert 'Average Precision' in proc.stdout


@pytest.mark.slow
def test_evaluate_t_and_both_heads(workdir, tmp_path):
  import ml_collections
  from mimicdet_jax import config_lib
  from mimicdet_jax.evaluation import evaluate as evaluate_lib
  from mimicdet_jax.evaluation import restore
  recipe, config, _, work = workdir
  variables, step = restore.restore_variables(work, str(3))
  boxes = {}
  for head in ('s', 't', 'both'):
    c = ml_collections.ConfigDict(recipe.to_dict())
    c.eval.head = head
    c.eval.score_times_objectness = True
    # Random weights: objectness starts near its prior, so products are tiny.
    c.eval.score_threshold = 0.0
    c = config_lib.resolve(c, config.model.num_classes)
    metrics = evaluate_lib.evaluate(c, variables, work, step, viz=0,
                                out_dir=str(tmp_path / head))
    assert metrics['num_detections'] > 0
    dets = json.loads((tmp_path / head / 'detections.json').read_text())
    assert len(dets) == metrics['num_detections']
    boxes[head] = [(d['image_id'], d['category_id'], d['bbox']) for d in dets]
  # Each head's own class scores and box deltas: three different results.
  assert boxes['t'] != boxes['s']
  assert boxes['both'] not in (boxes['s'], boxes['t'])


# ------------------------------------------- eval.nms and eval.tta by flag


@pytest.fixture(scope='module')
def config_only_workdir(tmp_path_factory):
  """A WORKDIR with config.json (configs/demo.py) and no checkpoint yet."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  work = tmp_path_factory.mktemp('eval_flags') / 'work'
  work.mkdir()
  resolved = config_lib.resolve(demo.get_config(), 6)
  (work / 'config.json').write_text(json.dumps(resolved.to_dict()))
  return str(work)


def test_nms_and_tta_flags_pass_the_config_checks(warm, config_only_workdir):
  """--config.eval.nms / --config.eval.tta reach the resolved config: the
  non-default values get past the checks to the missing checkpoint; a bad
  value stops there, one line naming the key and the choices."""
  from mimicdet_jax.evaluation import tta  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.ops.nms import NMS_KINDS  # pylint: disable=g-import-not-at-top
  base = ('--config', 'configs/demo.py', '--workdir', config_only_workdir)
  proc = warm(*base, '--config.eval.nms=soft', '--config.eval.tta=hflip',
              '--config.eval.soft_nms_sigma=0.3')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'no checkpoint' in proc.stderr, proc.stderr[-3000:]
  for key, bad, allowed in (('nms', 'greedy', NMS_KINDS),
                            ('tta', 'vflip', tta.TTA_MODES)):
    proc = warm(*base, f'--config.eval.{key}={bad}')
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert f"eval.{key}='{bad}'" in line and str(allowed) in line, line


@pytest.mark.slow
def test_eval_cli_with_soft_nms_and_hflip(workdir, tmp_path):
  """eval.py --config.eval.nms=soft --config.eval.tta=hflip on the
  checkpoint writes and scores its detections (on a copy of the workdir:
  eval writes WORKDIR/eval). The recipe is the workdir's tiny config as a
  file, since absl takes --config.* overrides only of a --config file."""
  import shutil  # pylint: disable=g-import-not-at-top
  _, config, data_dir, work = workdir
  recipe = tmp_path / 'tiny.py'
  recipe.write_text(
      'from tests import eval_helper\n\n\n'
      f'def get_config():\n  return eval_helper.tiny_config({data_dir!r})\n')
  copy = str(tmp_path / 'soft_hflip')
  shutil.copytree(work, copy)
  proc = _run_eval('--config', str(recipe), '--workdir', copy, '--viz', '0',
                   '--config.eval.nms=soft', '--config.eval.tta=hflip',
                   timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  dets = json.loads(open(f'{copy}/eval/detections.json').read())
  metrics = json.loads(open(f'{copy}/eval/metrics.json').read())
  assert metrics['num_detections'] == len(dets) > 0
  per_image = {}
  for d in dets:
    per_image[d['image_id']] = per_image.get(d['image_id'], 0) + 1
  assert max(per_image.values()) <= config.eval.max_detections
