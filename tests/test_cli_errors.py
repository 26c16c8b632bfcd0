"""A user's expected mistakes end in one line on stderr and exit status 1.

Every command-line entry point is run as the user runs it, in a child
process; the line must name the file, id or key at fault, and no traceback
may be printed. The children are forked from one warm interpreter that has
imported jax and the other third-party libraries (tests/warm_cli.py: ~2.8 s
of CPU a case less); one case also runs in a fresh process and must print
the same. Unexpected errors keep their traceback (last test).
"""
import json
import os
import subprocess
import sys

import pytest

from mimicdet_jax import errors
from tests import subprocess_env
from tests import warm_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=subprocess_env.xla_flags(1))


def _run(*argv):
  """A fresh process, as the user starts it."""
  return subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def warm():
  runner = warm_cli.WarmRunner(_env())
  yield runner
  runner.close()


def _coco(categories=((1, 'a'), (2, 'b')), bbox=(1, 1, 5, 5), image_id=1):
  return dict(
      images=[dict(id=image_id, file_name='x.png', width=20, height=20)],
      categories=[dict(id=i, name=n) for i, n in categories],
      annotations=[dict(id=7, image_id=image_id, category_id=1,
                        bbox=list(bbox), area=25, iscrowd=0)])


def _write(path, obj):
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def _data_flags(train_ann, val_ann='', extra=()):
  return [f'--config.data.train_annotations={train_ann}',
          '--config.data.train_images=/nonexistent',
          f'--config.data.val_annotations={val_ann}', *extra]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('cli_errors')
  f = dict(
      empty=_write(d / 'empty.json', ''),
      bad_box=_write(d / 'bad_box.json', _coco(bbox=(1, 1, 0, 5))),
      gt=_write(d / 'gt.json', _coco()),
      other_cats=_write(d / 'other_cats.json',
                        _coco(categories=((1, 'a'), (3, 'b')))),
      not_json=_write(d / 'dets.json', '[{"image_id": 1,'),
      unknown_ids=_write(d / 'dets_ids.json', [
          dict(image_id=1, category_id=1, bbox=[1, 1, 4, 4], score=0.9),
          dict(image_id=2**40, category_id=1, bbox=[1, 1, 4, 4], score=0.8)]),
      unknown_cat=_write(d / 'dets_cat.json', [
          dict(image_id=1, category_id=99, bbox=[1, 1, 4, 4], score=0.9)]),
      missing=str(d / 'missing.json'),
      empty_dir=str(d / 'no_images'),
  )
  os.makedirs(f['empty_dir'])
  # A training workdir that has its config but no checkpoint yet.
  from configs import demo  # pylint: disable=g-import-not-at-top
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  work = d / 'work'
  work.mkdir()
  resolved = config_lib.resolve(demo.get_config(), 6)
  (work / 'config.json').write_text(json.dumps(resolved.to_dict()))
  f['work'] = str(work)
  return f


# (name, argv given the files, text the one line must hold)
CASES = [
    ('train_empty_annotation_file',
     lambda f: ['train.py', '--config', 'configs/demo.py', '--workdir',
                f['work'] + '_t1', *_data_flags(f['empty'])],
     lambda f: [f['empty'], 'cannot read the annotation file as JSON']),
    ('train_bad_input_fail',
     lambda f: ['train.py', '--config', 'configs/demo.py', '--workdir',
                f['work'] + '_t2',
                *_data_flags(f['bad_box'],
                             extra=['--config.data.bad_input=fail'])],
     lambda f: [f['bad_box'], 'annotation 7 (image 1)', 'non-positive size']),
    ('train_unknown_config_key',
     lambda f: ['train.py', '--config', 'configs/demo.py', '--workdir',
                f['work'] + '_t3', '--config.train.no_such_key=3'],
     lambda f: ["'train.no_such_key'", 'configs/demo.py']),
    ('train_val_categories_differ',
     lambda f: ['train.py', '--config', 'configs/demo.py', '--workdir',
                f['work'] + '_t4', *_data_flags(f['gt'], f['other_cats'])],
     lambda f: [f['gt'], f['other_cats'], "2='b'", "3='b'"]),
    ('train_head_lr_mult_not_positive',
     lambda f: ['train.py', '--config', 'configs/demo.py', '--workdir',
                f['work'] + '_t5', *_data_flags(f['gt']),
                '--config.optim.t_head_lr_mult=0'],
     lambda f: ['optim.t_head_lr_mult=0.0', 'expected > 0']),
    ('eval_detections_missing',
     lambda f: ['eval.py', '--detections', f['missing'], '--annotations',
                f['gt']],
     lambda f: [f['missing'], 'not found']),
    ('eval_detections_not_json',
     lambda f: ['eval.py', '--detections', f['not_json'], '--annotations',
                f['gt']],
     lambda f: [f['not_json'], 'JSON']),
    ('eval_detections_unknown_image_ids',
     lambda f: ['eval.py', '--detections', f['unknown_ids'], '--annotations',
                f['gt']],
     lambda f: [f['unknown_ids'], f['gt'], f'image ids {2**40}']),
    ('eval_detections_unknown_category_ids',
     lambda f: ['eval.py', '--detections', f['unknown_cat'], '--annotations',
                f['gt']],
     lambda f: [f['unknown_cat'], 'category ids 99']),
    ('eval_annotations_missing',
     lambda f: ['eval.py', '--detections', f['unknown_cat'], '--annotations',
                f['missing']],
     lambda f: [f['missing'], 'annotation file not found']),
    ('eval_workdir_without_checkpoint',
     lambda f: ['eval.py', '--workdir', f['work']],
     lambda f: [os.path.join(f['work'], 'checkpoints'), 'no checkpoint']),
    ('eval_not_a_workdir',
     lambda f: ['eval.py', '--workdir', f['empty_dir']],
     lambda f: [os.path.join(f['empty_dir'], 'config.json'), 'not found']),
    ('predict_workdir_without_checkpoint',
     lambda f: ['predict.py', '--workdir', f['work'],
                '--images', f['empty_dir'], '--out', f['empty_dir'] + '_out'],
     lambda f: ['no checkpoint']),
    ('import_weights_missing_source',
     lambda f: ['-m', 'mimicdet_jax.tools.import_weights', '--arch',
                'resnet50', '--src', f['missing'], '--out', f['work'] + '_w'],
     lambda f: [f['missing'], 'not found']),
    ('synthetic_sizes_it_cannot_draw',
     lambda f: ['-m', 'mimicdet_jax.data.synthetic', f['work'] + '_s',
                '--min-size', '200', '--max-size', '100'],
     lambda f: ['--min-size 200 --max-size 100', 'need 16 <= --min-size']),
    ('photos_sizes_it_cannot_draw',
     lambda f: ['-m', 'mimicdet_jax.data.photos', f['work'] + '_p',
                '--min-size', '32'],
     lambda f: ['--min-size 32 --max-size 384', 'need 64 <= --min-size']),
    ('glyphs_sizes_it_cannot_draw',  # a 60 px em must fit
     lambda f: ['-m', 'mimicdet_jax.data.glyphs', f['work'] + '_g',
                '--min-size', '100'],
     lambda f: ['--min-size 100 --max-size 384', 'need 120 <= --min-size']),
    ('crowds_sizes_it_cannot_draw',
     lambda f: ['-m', 'mimicdet_jax.data.crowds', f['work'] + '_c',
                '--min-size', '300'],
     lambda f: ['--min-size 300 --max-size 288', 'need 64 <= --min-size']),
    ('demo_without_data',
     lambda f: ['-m', 'mimicdet_jax.demo', '--workdir', f['work'] + '_d',
                '--data', f['empty_dir']],
     lambda f: ['train.json not found', 'mimicdet_jax.data.synthetic']),
]


@pytest.mark.parametrize('name,argv,expected', CASES,
                         ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_status_1(files, warm, name, argv,
                                                  expected):
  del name
  proc = warm.run(*argv(files))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert ': error: ' in lines[0]
  for text in expected(files):
    assert text in lines[0], (text, lines[0])


def test_fresh_process_prints_what_the_warm_child_prints(files, warm):
  """The warm interpreter's imports printed nothing (a fresh process would
  show it to the user), and a case run both ways gives the same result."""
  argv = dict((c[0], c[1]) for c in CASES)['train_val_categories_differ']
  fresh, child = _run(*argv(files)), warm.run(*argv(files))
  assert (fresh.returncode, fresh.stderr, fresh.stdout) == (
      child.returncode, child.stderr, child.stdout)
  assert fresh.returncode == 1
  assert warm.server_stderr() == ''


def test_unexpected_errors_keep_their_traceback(capsys):
  def bug():
    raise KeyError('a bug, not a user mistake')

  def mistake():
    raise errors.MissingFileError('a.json: not found\nsecond line')

  with pytest.raises(KeyError):
    errors.cli(bug)()
  with pytest.raises(SystemExit) as e:
    errors.cli(mistake)()
  assert e.value.code == 1
  assert capsys.readouterr().err.endswith(
      ': error: a.json: not found; second line\n')
