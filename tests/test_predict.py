"""mimicdet_jax.evaluation.predict: odd-sized grey and RGBA images through a checkpoint."""
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from configs import demo
from mimicdet_jax.evaluation import restore
from mimicdet_jax.evaluation import predict
from tests import eval_helper


def _write_odd_images(folder):
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (77, 131), dtype=np.uint8), 'L').save(
      os.path.join(folder, 'grey.png'))
  Image.fromarray(rng.integers(0, 255, (203, 61, 4), dtype=np.uint8),
                  'RGBA').save(os.path.join(folder, 'rgba.png'))
  with open(os.path.join(folder, 'notes.txt'), 'w') as f:
    f.write('not an image')
  return {'grey.png': (77, 131), 'rgba.png': (203, 61)}


def test_batches_of_grey_and_rgba_images(tmp_path):
  sizes = _write_odd_images(str(tmp_path))
  paths = predict.list_images(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['grey.png', 'rgba.png']
  config = demo.get_config()  # 256 x 256 canvas
  (batch,) = list(predict._batches(paths, config.data, 8))
  assert batch['image'].shape == (2, 256, 256, 3)
  np.testing.assert_array_equal(batch['orig_size'], [sizes['grey.png'],
                                                     sizes['rgba.png']])
  # Shorter side to 256 unless the longer would pass 256: longer -> 256.
  np.testing.assert_array_equal(batch['image_size'],
                                [[150, 256], [256, 77]])
  np.testing.assert_array_equal(batch['image_id'], [0, 1])
  # Normalised pixels inside, zeros in the padding.
  assert np.all(batch['image'][0, 150:] == 0)
  assert np.any(batch['image'][0, :150] != 0)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return eval_helper.make_workdir(str(tmp_path_factory.mktemp('predict')))


@pytest.mark.slow
def test_predict_folder_on_odd_grey_and_rgba_images(workdir, tmp_path):
  _, _, _, work = workdir
  sizes = _write_odd_images(str(tmp_path / 'images'))
  config = restore.load_config(work)  # from WORKDIR/config.json
  variables, step = restore.restore_variables(work)
  assert step == eval_helper.STEP
  out = tmp_path / 'out'
  result = predict.predict_folder(config, variables, str(tmp_path / 'images'),
                                  str(out), ['c%d' % i for i in range(6)],
                                  step)
  written = json.loads((out / 'detections.json').read_text())
  assert written == json.loads(json.dumps(result))
  assert written['checkpoint_step'] == eval_helper.STEP
  for image in written['images']:
    h, w = sizes[image['file_name']]
    assert (image['height'], image['width']) == (h, w)
    picture = Image.open(out / image['file_name'])
    assert picture.size == (w, h) and picture.mode == 'RGB'
    dets = image['detections']
    assert 0 < len(dets) <= config.eval.max_detections
    for d in dets:
      x1, y1, x2, y2 = d['bbox']
      assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
      assert d['class_name'] == 'c%d' % (d['label'] - 1)
      assert d['score'] >= config.eval.score_threshold
    scores = [d['score'] for d in dets]
    assert scores == sorted(scores, reverse=True)


def test_batches_skip_and_name_an_unreadable_file(tmp_path):
  _write_odd_images(str(tmp_path))
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  paths = predict.list_images(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['broken.jpg', 'grey.png',
                                                  'rgba.png']
  skipped = []
  (batch,) = list(predict._batches(paths, demo.get_config().data, 8, skipped))
  # The readable images keep their index into `paths` as image_id.
  np.testing.assert_array_equal(batch['image_id'], [1, 2])
  assert [os.path.basename(p) for p, _ in skipped] == ['broken.jpg']
  assert 'UnidentifiedImageError' in skipped[0][1]
  with pytest.raises(OSError):  # without a list to report to, it raises
    list(predict._batches(paths, demo.get_config().data, 8))
