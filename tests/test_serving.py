"""serving/: the exported detector against the in-repo predictor and eval.py,
the loader's host rules against data/transforms.py and evaluation/coco.py,
and the errors of a broken artifact or input.

One artifact for the whole module: a tiny numpy-initialised checkpoint
(tests/eval_helper.py) exported by `export_workdir` for cpu, cuda and tpu.
Both sides compile with XLA's quick CPU options (they change compile time,
not what is computed). The in-repo side runs as eval.py runs it
(`evaluate`'s cached predict function over the 8 test devices), and its one
compiled batch of 8 serves both the detection and the AP comparison.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from configs import demo
from configs import mimicdet_r50_fpn_1x
from mimicdet_jax import errors
from mimicdet_jax.data import coco as coco_data
from mimicdet_jax.data import transforms
from mimicdet_jax.evaluation import coco as coco_eval
from mimicdet_jax.evaluation import evaluate as evaluate_lib
from mimicdet_jax.evaluation import exported
from mimicdet_jax.evaluation import inference
from mimicdet_jax.evaluation import predict
from mimicdet_jax.evaluation import restore
from mimicdet_jax.serving import detector as detector_lib
from mimicdet_jax.serving import export
from tests import eval_helper
from tests import warm_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_XLA = dict(xla_backend_optimization_level=0,
                 xla_llvm_disable_expensive_passes=True)
MAX_BATCH = 8


@contextlib.contextmanager
def _quick_xla():
  """JAX's switch for QUICK_XLA on every compile inside (restored after)."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', before)


def _edit(recipe):
  recipe.eval.batch_size = 8  # one compiled batch for evaluate and the test


def _odd_images():
  """Three images of other sizes and modes than the synthetic set's."""
  rng = np.random.default_rng(1)
  return [Image.fromarray(rng.integers(0, 255, (77, 131), np.uint8), 'L'),
          Image.fromarray(rng.integers(0, 255, (203, 61, 4), np.uint8), 'RGBA'),
          rng.integers(0, 255, (40, 300, 3), np.uint8)]


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('serving'))
  recipe, config, data_dir, work = eval_helper.make_workdir(
      root, init='numpy', edit=_edit)
  out = os.path.join(root, 'exported')
  signature = export.export_workdir(work, out, max_batch=MAX_BATCH)
  detector = detector_lib.Detector.load(out, compiler_options=QUICK_XLA)
  variables, step = restore.restore_variables(work)
  val = os.path.join(data_dir, 'val')
  paths = [os.path.join(val, n) for n in sorted(os.listdir(val))]
  return dict(recipe=recipe, config=restore.load_config(work), work=work,
              data=data_dir, out=out, signature=signature, detector=detector,
              variables=variables, step=step, paths=paths, root=root)


@pytest.fixture(scope='module')
def in_repo(served):
  """The checkpoint's detections of the 8 images (5 val + 3 odd), as
  eval.py computes them (evaluate's predict function, run_inference)."""
  config = served['config']
  images = ([coco_data.load_image(p) for p in served['paths']] +
            [detector_lib.read_image(im) for im in _odd_images()])
  raws = [dict(image=im, boxes=np.zeros((0, 4), np.float32),
               classes=np.zeros((0,), np.int32), is_crowd=np.zeros((0,), bool),
               image_id=np.int64(i), orig_size=np.array(im.shape[:2], np.int32))
          for i, im in enumerate(images)]
  batch = transforms.collate(
      [transforms.transform_example(r, config.data, train=False) for r in raws],
      config.data.canvas_buckets)
  predict_fn = evaluate_lib._predict_fn_of_config(config)  # pylint: disable=protected-access
  with _quick_xla():  # jit caches it: `evaluate` runs this executable too
    dets = inference.run_inference(predict_fn, served['variables'], [batch])
  pixels = transforms.collate(
      [transforms.transform_example(r, config.data, train=False,
                                    normalize=False) for r in raws],
      config.data.canvas_buckets)
  return dict(dets=dets, canvases=pixels['image'], sizes=pixels['image_size'])


def _category_ids(categories, labels):
  """Labels 1..K -> the ids of categories (label order), computed here."""
  return np.array([categories[int(k) - 1]['id'] for k in labels], np.int32)


def _same_detections(got, want, i, categories):
  """Artifact rows of image i against the in-repo rows (labels mapped)."""
  valid = want['valid'][i]
  n = int(valid.sum())
  assert int(got['num_detections'][i]) == n > 0
  np.testing.assert_array_equal(
      got['classes'][i][:n], _category_ids(categories, want['classes'][i][valid]))
  np.testing.assert_allclose(got['boxes'][i][:n], want['boxes'][i][valid],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(got['scores'][i][:n], want['scores'][i][valid],
                             atol=1e-6, rtol=0)
  assert np.all(got['classes'][i][n:] == -1)
  assert np.all(got['boxes'][i][n:] == 0)


def test_signature_and_platforms(served):
  sig = json.loads(open(os.path.join(served['out'], 'signature.json')).read())
  assert sig == json.loads(json.dumps(served['signature']))
  assert sig['platforms'] == ['cpu', 'cuda', 'tpu']
  assert sig['canvases'] == [[128, 128]] and sig['max_batch'] == MAX_BATCH
  assert sig['checkpoint_step'] == eval_helper.STEP
  assert sig['categories'] == restore.training_categories(
      served['config'], served['work'])[0]
  assert sig['resize']['min_size'] == 128 and sig['resize']['max_size'] == 128
  assert sig['jax_version'] == jax.__version__
  assert len(sig['config_hash']) == 64
  (entry,) = sig['artifacts']
  blob = open(os.path.join(served['out'], entry['file']), 'rb').read()
  assert entry['file'] == 'detector_128x128.jaxexport'
  assert entry['bytes'] == len(blob)
  # Self-contained, but without the T-head's weights: smaller than all the
  # checkpoint's variables (graph included).
  weights = sum(np.asarray(x).nbytes for x in jax.tree.leaves(
      served['variables']))
  t_head = sum(np.asarray(x).nbytes for x in jax.tree.leaves(
      served['variables']['params']['t_head_net']))
  assert weights - t_head < len(blob) < weights
  # Lowered for tpu and cuda on this CPU-only machine, in the same module.
  exp = jax.export.deserialize(bytearray(blob))
  assert exp.platforms == ('cpu', 'cuda', 'tpu')
  assert [str(a) for a in exp.in_avals] == ['uint8[b,128,128,3]', 'int32[b,2]']
  assert exp.nr_devices == 1


def test_artifact_matches_in_repo_predictor_at_batches_1_3_8(served, in_repo):
  detector, want = served['detector'], in_repo['dets']
  categories = served['signature']['categories']
  # Non-contiguous ids (1, 3, 5, ...): a label passed through unmapped fails.
  assert [c['id'] for c in categories] != list(range(1, len(categories) + 1))
  for n in (1, 3, 8):
    got = detector.detect_canvas(in_repo['canvases'][:n], in_repo['sizes'][:n])
    assert got['boxes'].shape == (n, 10, 4)
    for i in range(n):
      _same_detections(got, want, i, categories)
  assert sorted(k[1] for k in detector._compiled) == [1, 4, 8]  # pylint: disable=protected-access
  # From image files, PIL images and arrays: the loader's own host work
  # gives the same canvases and the boxes in original pixels.
  inputs = served['paths'] + _odd_images()
  batch = detector.preprocess(inputs)
  np.testing.assert_array_equal(batch['images'], in_repo['canvases'])
  np.testing.assert_array_equal(batch['image_sizes'], in_repo['sizes'])
  orig = coco_eval.to_original_pixels(want['boxes'], want['image_size'],
                                      want['orig_size'])
  for i, result in enumerate(detector(inputs)):
    valid = want['valid'][i]
    np.testing.assert_allclose(result['boxes'], orig[i][valid], atol=1e-4,
                               rtol=0)
    np.testing.assert_array_equal(
        result['category_ids'],
        _category_ids(categories, want['classes'][i][valid]))


@pytest.mark.slow
def test_artifact_carries_soft_nms_and_hflip_tta(served, in_repo):
  """Exported with eval.nms='soft' and eval.tta='hflip': signature.json
  records both, and the artifact detects as the in-repo predictor with the
  same config on the 8 canvases, not as the default (hard, none) one."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.evaluation import postprocess  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
  recipe = ml_collections.ConfigDict(served['recipe'].to_dict())
  recipe.eval.nms, recipe.eval.tta = 'soft', 'hflip'
  out = os.path.join(served['root'], 'exported_soft_hflip')
  sig = export.export_workdir(served['work'], out, recipe, platforms=('cpu',),
                              max_batch=MAX_BATCH)
  assert (sig['nms'], sig['tta'], sig['soft_nms_sigma']) == (
      'soft', 'hflip', 0.5)
  assert (served['signature']['nms'], served['signature']['tta']) == (
      'hard', 'none')
  detector = detector_lib.Detector.load(out, compiler_options=QUICK_XLA)
  got = detector.detect_canvas(in_repo['canvases'], in_repo['sizes'])
  config = restore.load_config(served['work'], recipe)
  predict_fn = postprocess.make_predict_fn(mimicdet.MimicDet(config), config)
  images = transforms.normalize_on_device(in_repo['canvases'],
                                          in_repo['sizes'], config.data)
  with _quick_xla():
    want = jax.tree.map(np.asarray, predict_fn(served['variables'], images,
                                               in_repo['sizes']))
  for i in range(len(in_repo['sizes'])):
    _same_detections(got, want, i, sig['categories'])
  default = served['detector'].detect_canvas(in_repo['canvases'],
                                             in_repo['sizes'])
  assert not np.allclose(got['scores'], default['scores'], atol=1e-6)


def test_exported_eval_gives_the_checkpoint_ap(served, in_repo):
  del in_repo  # compiled the predict function evaluate uses
  config = served['config']
  ckpt = evaluate_lib.evaluate(config, served['variables'], served['work'],
                               served['step'], viz=0,
                               out_dir=os.path.join(served['root'], 'ckpt'))
  out = os.path.join(served['root'], 'exported_eval')
  metrics = exported.evaluate_exported(config, served['detector'], out)
  for key in coco_eval.SUMMARY_KEYS:
    assert abs(metrics[key] - ckpt[key]) <= 1e-6, key
  assert metrics['per_class'] == pytest.approx(ckpt['per_class'], abs=1e-6)
  assert metrics['num_detections'] == ckpt['num_detections'] > 0
  assert metrics['step'] == ckpt['step'] == eval_helper.STEP
  a = json.loads(open(os.path.join(out, 'detections.json')).read())
  b = json.loads(open(os.path.join(served['root'], 'ckpt',
                                   'detections.json')).read())
  assert [(d['image_id'], d['category_id']) for d in a] == [
      (d['image_id'], d['category_id']) for d in b]
  np.testing.assert_allclose([d['bbox'] for d in a], [d['bbox'] for d in b],
                             atol=0.0101)


def test_predict_exported_writes_the_checkpoint_schema(served, tmp_path):
  images = tmp_path / 'images'
  shutil.copytree(os.path.join(served['data'], 'val'), images)
  (images / 'broken.jpg').write_bytes(b'\xff\xd8 no jpeg')
  result = predict.predict_folder_exported(served['detector'], str(images),
                                           str(tmp_path / 'out'), 0.0, 8)
  assert result['checkpoint_step'] == eval_helper.STEP
  names = [c['name'] for c in served['signature']['categories']]
  assert result['class_names'] == names
  assert [s['file_name'] for s in result['skipped']] == ['broken.jpg']
  assert 'UnidentifiedImageError' in result['skipped'][0]['error']
  direct = served['detector'](served['paths'])
  for image, want in zip(result['images'], direct):
    ids = [served['signature']['categories'][d['label'] - 1]['id']
           for d in image['detections']]
    assert ids == want['category_ids'].tolist()
    assert [d['class_name'] for d in image['detections']] == [
        names[d['label'] - 1] for d in image['detections']]
    np.testing.assert_allclose([d['bbox'] for d in image['detections']],
                               want['boxes'], atol=0.006)
  assert (tmp_path / 'out' / 'detections.json').exists()
  # What predict.py prints for it (the script itself runs in
  # test_command_line_errors_are_one_line, test_cli_errors and, to the end,
  # test_end_to_end; a successful run here would compile the artifact again).
  n = sum(len(image['detections']) for image in result['images'])
  assert predict.summary(result, 'OUT') == [
      f"{len(served['paths'])} pictures and detections.json ({n} detections) "
      'in OUT', 'skipped 1 unreadable file(s): broken.jpg']


def test_loader_imports_no_model_code_in_a_fresh_process(served):
  code = (
      'import json, sys\n'
      'from mimicdet_jax.serving.detector import Detector\n'
      f'd = Detector.load({served["out"]!r})\n'
      f'batch = d.preprocess([{served["paths"][0]!r}])\n'
      'mods = sorted(m for m in sys.modules if m.split(".")[0] in '
      '("flax", "optax", "orbax", "ml_collections", "grain") or '
      '(m.startswith("mimicdet_jax.") and m != "mimicdet_jax.serving" and '
      'not m.startswith("mimicdet_jax.serving.detector")))\n'
      'print(json.dumps(dict(mods=mods, canvases=d.canvases, '
      'sizes=batch["image_sizes"].tolist())))\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  # Loading deserialised (and checked) every artifact; none of these came.
  assert got['mods'] == []
  assert got['canvases'] == [[128, 128]]
  want = served['detector'].preprocess([served['paths'][0]])
  assert got['sizes'] == want['image_sizes'].tolist()


# ------------------------------------------------ host rules, bit for bit
@pytest.mark.parametrize('config_fn', [demo.get_config,
                                       mimicdet_r50_fpn_1x.get_config])
def test_resize_and_canvas_match_the_eval_transform(config_fn):
  data = config_fn().data
  rng = np.random.default_rng(0)
  sizes = [(1, 1), (7, 300), (300, 7), (255, 256), (256, 256), (480, 640),
           (333, 500), (1000, 20)] + [tuple(rng.integers(1, 700, 2))
                                      for _ in range(6)]
  for h, w in sizes:
    image = rng.integers(0, 255, (h, w, 3), np.uint8)
    want = transforms.transform_example(dict(
        image=image, boxes=np.zeros((0, 4), np.float32),
        classes=np.zeros((0,), np.int32), is_crowd=np.zeros((0,), bool),
        image_id=0, orig_size=np.array([h, w], np.int32)), data, train=False,
        normalize=False)
    got = detector_lib.resize_image(image, data.min_size, data.max_size)
    nh, nw = want['image_size']
    assert got.shape[:2] == (nh, nw), (h, w)
    np.testing.assert_array_equal(got, want['image'][:nh, :nw])
    assert detector_lib.choose_canvas([got.shape[:2]], data.canvas_buckets) == (
        want['image'].shape[:2])
  buckets = ((896, 1408), (1408, 896), (1408, 1408))
  for batch in ([(800, 1200)], [(1200, 800)], [(800, 1200), (1200, 800)],
                [(896, 896)]):
    assert detector_lib.choose_canvas(batch, buckets) == (
        transforms.choose_canvas(batch, buckets))


def test_original_pixels_match_coco_to_original_pixels():
  rng = np.random.default_rng(0)
  boxes = rng.uniform(-20, 1500, (3, 7, 4)).astype(np.float32)
  image_size = np.array([[800, 1199], [1333, 750], [1, 1]], np.int32)
  orig_size = np.array([[480, 719], [2000, 1125], [3, 9]], np.int32)
  got = detector_lib.to_original_pixels(boxes, image_size, orig_size)
  want = coco_eval.to_original_pixels(boxes, image_size, orig_size)
  assert got.dtype == want.dtype == np.float32
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------ errors
def _broken_copy(served, tmp_path, name):
  out = tmp_path / name
  shutil.copytree(served['out'], out)
  return out, out / served['signature']['artifacts'][0]['file']


def _set_signature(out, **changes):
  sig = json.loads((out / 'signature.json').read_text())
  sig.update(changes)
  (out / 'signature.json').write_text(json.dumps(sig))


def _load_error(path):
  with pytest.raises(detector_lib.DetectorError) as e:
    detector_lib.Detector.load(str(path))
  message = str(e.value)
  assert '\n' not in message
  return message


def test_broken_artifacts_are_named(served, tmp_path):
  out, art = _broken_copy(served, tmp_path, 'truncated')
  art.write_bytes(art.read_bytes()[:1000])
  assert f'{art}: its sha256' in _load_error(out)
  # Truncated, with a signature edited to match it: deserialisation fails.
  import hashlib  # pylint: disable=g-import-not-at-top
  entry = dict(served['signature']['artifacts'][0],
               sha256=hashlib.sha256(art.read_bytes()).hexdigest())
  _set_signature(out, artifacts=[entry])
  assert f'{art}: not a jax.export artifact' in _load_error(out)

  out, art = _broken_copy(served, tmp_path, 'corrupted')
  blob = bytearray(art.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  art.write_bytes(bytes(blob))
  assert f'{art}: its sha256' in _load_error(out)

  out, art = _broken_copy(served, tmp_path, 'mismatched')
  entry = dict(served['signature']['artifacts'][0], canvas=[256, 128])
  _set_signature(out, artifacts=[entry])
  message = _load_error(out)
  assert f'{art}:' in message and 'mismatched signature' in message

  out, _ = _broken_copy(served, tmp_path, 'future')
  _set_signature(out, calling_convention_version=99)
  assert 'calling_convention_version 99' in _load_error(out)
  out, _ = _broken_copy(served, tmp_path, 'tpu_only')
  _set_signature(out, platforms=['tpu'])
  assert 'not for cpu' in _load_error(out)
  (out / 'signature.json').unlink()
  assert f'{out / "signature.json"}: not found' in _load_error(out)


def test_bad_inputs_are_named(served):
  detector = served['detector']
  cases = [
      (lambda: detector([np.zeros((8, 8, 3), np.float32)]),
       'images[0]: dtype float32'),
      (lambda: detector([np.zeros((8, 8), np.uint8)]), 'images[0]: shape'),
      (lambda: detector([served['paths'][0]] * (MAX_BATCH + 1)),
       f'{MAX_BATCH + 1} images; the artifact takes 1 to max_batch={MAX_BATCH}'),
      (lambda: detector(np.zeros((8, 8, 3), np.uint8)), 'a list of images'),
      (lambda: detector([served['out']]), f'{served["out"]}: not a readable'),
      (lambda: detector.detect_canvas(np.zeros((1, 128, 128, 3), np.float32),
                                      np.ones((1, 2), np.int32)),
       'images: dtype float32'),
      (lambda: detector.detect_canvas(np.zeros((1, 64, 128, 3), np.uint8),
                                      np.ones((1, 2), np.int32)),
       'canvas 64x128'),
      (lambda: detector.detect_canvas(
          np.zeros((MAX_BATCH + 1, 128, 128, 3), np.uint8),
          np.ones((MAX_BATCH + 1, 2), np.int32)), f'max_batch={MAX_BATCH}'),
  ]
  for call, text in cases:
    with pytest.raises(detector_lib.DetectorError) as e:
      call()
    assert text in str(e.value) and '\n' not in str(e.value)
  # The evaluation tools re-raise it as a UserError (one line, exit 1).
  with pytest.raises(errors.ArtifactError):
    exported.detect(detector, [np.zeros((8, 8, 3), np.int64)])


@pytest.fixture
def warm():
  """The command lines below as children of one interpreter that imported
  jax & co. once (tests/warm_cli.py; tests/test_cli_errors.py compares it
  with a fresh process): ~2.8 s of CPU each less."""
  runner = warm_cli.WarmRunner(
      dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  yield runner.run
  runner.close()


def _one_line_error(proc, *texts):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
  assert ': error: ' in lines[0]
  for text in texts:
    assert text in lines[0], (text, lines[0])


def test_command_line_errors_are_one_line(served, warm, tmp_path):
  out, art = _broken_copy(served, tmp_path, 'truncated')
  art.write_bytes(art.read_bytes()[:500])
  _one_line_error(warm('predict.py', '--exported',
                       str(out), '--images', str(tmp_path), '--out',
                       str(tmp_path / 'o')), str(art), 'sha256')
  out, art = _broken_copy(served, tmp_path, 'mismatched')
  entry = dict(served['signature']['artifacts'][0], canvas=[256, 128])
  _set_signature(out, artifacts=[entry])
  _one_line_error(warm('eval.py', '--exported', str(out), '--workdir',
                       served['work']), str(art), 'mismatched signature')
  _one_line_error(warm('-m', 'mimicdet_jax.serving.export', '--workdir',
                       served['work'], '--out', str(tmp_path / 'x'),
                       '--platforms', 'cpu,gpu'),
                  '--platforms cpu,gpu', 'cuda')
