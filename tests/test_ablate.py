"""The ablation grid runner: variants, schedule, shards, resume, report.

The fast tests drive `run_grid` with a stand-in for the per-run work (the
`run_fn` argument, which is `train_and_score` in real use) that writes a
metrics.jsonl like training does; they check the grid logic, the resume and
the report. The slow test runs the real CLI on a tiny synthetic set, kills it
after its first run and checks that the re-run reuses that run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import configs.demo
from mimicdet_jax import errors
from mimicdet_jax.experiments import ablate
from mimicdet_jax.experiments import report
from tests import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- variants


def test_named_adhoc_and_combined_variants():
  base = configs.demo.get_config()
  assert ablate.variant_overrides('mimic_off', base) == {'mimic.enabled': False}
  assert ablate.variant_overrides('no_stagger+cls', base) == {
      'model.staggered': False, 'mimic.paths': 'cls'}
  got = ablate.variant_overrides(
      'mimic.weight=2+model.staggered=false+mimic.reg_distance=l2'
      '+optim.decay_steps=(10,20)', base)
  assert got == {'mimic.weight': 2.0, 'model.staggered': False,
                 'mimic.reg_distance': 'l2', 'optim.decay_steps': (10, 20)}
  assert isinstance(got['mimic.weight'], float)
  with pytest.raises(ValueError, match='unknown variant'):
    ablate.variant_overrides('mimic_of', base)
  with pytest.raises(errors.ConfigError, match='mimic.wieght'):
    ablate.variant_overrides('mimic.wieght=2', base)
  with pytest.raises(ValueError):
    ablate.variant_overrides('model.staggered=maybe', base)
  # Every named variant sets existing keys to allowed values.
  from mimicdet_jax import config_lib  # pylint: disable=g-import-not-at-top
  for name in ablate.VARIANTS:
    config, _ = ablate.run_config(base, name, 0, None, {})
    config_lib.resolve(config, 6)
  assert ablate.variant_dirname('optim.decay_steps=(1, 2)') == (
      'optim.decay_steps=_1__2_')
  # A long entry gets a name a file system takes, distinct per entry.
  long_a, long_b = ('+'.join(f'mimic.weight={w}' for w in range(40 + k))
                    for k in (0, 1))
  names = {ablate.variant_dirname(v) for v in (long_a, long_b)}
  assert len(names) == 2 and all(len(n) <= ablate.MAX_DIRNAME for n in names)


def test_grid_items_keep_the_commas_of_their_values():
  assert ablate._split('both, optim.decay_steps=(10,20)+mimic.weight=2,cls') == [
      'both', 'optim.decay_steps=(10,20)+mimic.weight=2', 'cls']
  assert ablate._split('a=[1,2],b') == ['a=[1,2]', 'b']
  base = configs.demo.get_config()
  config, _ = ablate.run_config(base, 'optim.decay_steps=(10,20)', 0, None, {})
  assert tuple(config.optim.decay_steps) == (10, 20)
  # A value of the wrong type is a ConfigError naming the key (one line at
  # the command line), not ml_collections' TypeError.
  with pytest.raises(errors.ConfigError, match='optim.decay_steps'):
    ablate.run_config(base, 'optim.decay_steps=soon', 0, None, {})


def test_run_config_order_schedule_and_seed():
  base = configs.demo.get_config()
  base.train.total_steps = 1500  # a schedule fixed here, not the demo's
  base.optim.warmup_steps = 100
  base.optim.decay_steps = (1200, 1400)
  base.train.log_every = 50
  base.train.checkpoint_every = 500
  config, overrides = ablate.run_config(
      base, 'mimic.weight=3.0', 7, 300,
      {'mimic.weight': 2.0, 'optim.base_lr': 0.01})
  assert config.train.total_steps == 300
  assert config.optim.warmup_steps == 20
  assert tuple(config.optim.decay_steps) == (240, 280)
  assert config.train.log_every == 6 and config.train.checkpoint_every == 100
  assert config.mimic.weight == 3.0  # the variant wins over --config
  assert config.optim.base_lr == 0.01
  assert config.seed == 7 and overrides['seed'] == 7
  assert not config.eval.at_end and config.train.eval_every == 0
  assert base.train.total_steps == 1500 and base.mimic.weight == 1.0
  # Without --steps the recipe's schedule is kept.
  config, _ = ablate.run_config(base, 'both', 0, None, {})
  assert config.train.total_steps == 1500
  assert tuple(config.optim.decay_steps) == (1200, 1400)


def test_shards_partition_the_grid():
  runs = ablate.grid_runs(['a', 'b', 'c'], [0, 1])
  assert runs[:3] == [('a', 0), ('a', 1), ('b', 0)]
  shards = [ablate.select_runs(runs, shard=(i, 4)) for i in range(4)]
  assert sorted(r for s in shards for r in s) == sorted(runs)
  assert sum(len(s) for s in shards) == len(runs)
  assert ablate.select_runs(runs, only=['b']) == [('b', 0), ('b', 1)]
  assert ablate.select_runs(runs, only=['c'], shard=(1, 2)) == [('c', 1)]
  with pytest.raises(ValueError):
    ablate.select_runs(runs, only=['z'])
  with pytest.raises(ValueError):
    ablate.select_runs(runs, shard=(2, 2))


def test_val_subset_keeps_categories_and_only_kept_annotations(tmp_path):
  src = tmp_path / 'val.json'
  src.write_text(json.dumps(dict(
      images=[dict(id=i, file_name=f'{i}.jpg') for i in (5, 2, 9)],
      annotations=[dict(id=1, image_id=5), dict(id=2, image_id=9),
                   dict(id=3, image_id=2), dict(id=4, image_id=2)],
      categories=[dict(id=1, name='a'), dict(id=3, name='b')])))
  dst = ablate.subset_annotations(str(src), str(tmp_path / 'sub.json'), 2)
  sub = json.loads(open(dst).read())
  assert [im['id'] for im in sub['images']] == [5, 2]
  assert sorted(a['id'] for a in sub['annotations']) == [1, 3, 4]
  assert sub['categories'] == json.loads(src.read_text())['categories']


# ----------------------------------------------------------------- numbers


def test_spread_and_paired_summary():
  records = {('mimic_off', 0): dict(s_AP=0.20, t_AP=0.30),
             ('mimic_off', 1): dict(s_AP=0.24, t_AP=0.31),
             ('both', 0): dict(s_AP=0.25, t_AP=0.33),
             ('both', 1): dict(s_AP=0.26, t_AP=0.30)}
  s = ablate.summarize(records, ['mimic_off', 'both', 'cls'], [0, 1])
  np.testing.assert_allclose(s['both']['s_AP']['mean'], 0.255)
  # Sample standard deviation (ddof 1) of two values: |a - b| / sqrt(2).
  np.testing.assert_allclose(s['both']['s_AP']['std'], 0.01 / np.sqrt(2))
  np.testing.assert_allclose(s['both']['delta_s_AP']['values'], [0.05, 0.02])
  np.testing.assert_allclose(s['both']['delta_t_AP']['mean'], 0.01)
  assert 'delta_s_AP' not in s['mimic_off']
  assert s['cls']['s_AP']['n'] == 0 and s['cls']['seeds_pending'] == [0, 1]
  table = ablate.format_table(s, [0, 1])
  assert '25.5 ± 0.7' in table and '2/2' in table and '0/2' in table
  assert 'pending' in table.splitlines()[-1]
  assert report.spread([0.5])['std'] == 0.0


def test_train_time_and_final_value():
  rows = [dict(step=2, step_time=5.0, c=0.0), dict(step=6, step_time=1.0, c=1.0),
          dict(step=10, step_time=0.5, c=3.0)]
  assert ablate.train_time(rows) == 2 * 5.0 + 4 * 1.0 + 4 * 0.5
  assert ablate.final_value(rows, 'c') == 3.0
  assert ablate.final_value(rows, 'c', fraction=1.0) == pytest.approx(4 / 3)
  assert ablate.final_value(rows, "missing") is None
  assert ablate.median_step_time(rows) == 1.0


# ---------------------------------------------------- grid resume (stand-in)


class Killed(Exception):
  """Plays a kill of the grid process in the middle of a run."""


class StandInRun:
  """Per-run work without training: writes metrics.jsonl, returns numbers.

  Raises at the run named `fail_at` to play a grid killed mid-way.
  """

  def __init__(self, fail_at=None, diverge=()):
    self.calls = []
    self.fail_at = fail_at
    self.diverge = diverge

  def __call__(self, config, workdir):
    name = (os.path.basename(os.path.dirname(workdir)), config.seed)
    self.calls.append(name)
    if name == self.fail_at:
      raise Killed()
    if name in self.diverge:
      return {'diverged': 'training stopped at step 3: 3 consecutive ...'}
    os.makedirs(workdir, exist_ok=True)
    ap = 0.1 * config.mimic.enabled + 0.01 * config.seed
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for step in range(1, config.train.total_steps + 1):
        f.write(json.dumps(dict(step=step, step_time=0.5, loss=1.0 / step,
                                loss_mimic=0.1 / step, mimic_cos_cls=0.5,
                                mimic_cos_reg=0.6, t_reg_alive=0.9)) + '\n')
    return dict(s_AP=ap, s_AP50=2 * ap, t_AP=ap + 0.05, t_AP50=0.5, step=4,
                train_time_s=ablate.train_time(ablate.read_metrics(
                    os.path.join(workdir, 'metrics.jsonl'))),
                step_time_s=0.5,
                mimic_cos_cls=0.5, mimic_cos_reg=0.6)


def test_grid_resumes_without_redoing_finished_runs(tmp_path):
  base = configs.demo.get_config()
  grid, seeds = ['mimic_off', 'both'], [0, 1]
  first = StandInRun(fail_at=('both', 0))
  with pytest.raises(Killed):
    ablate.run_grid(base, str(tmp_path), grid, seeds, steps=4, run_fn=first,
                    log=lambda _: None)
  assert first.calls == [('mimic_off', 0), ('mimic_off', 1), ('both', 0)]
  done = ablate.read_json(str(tmp_path / 'mimic_off' / 'seed0' / 'run.json'))
  assert done['status'] == 'done'
  assert ablate.read_json(str(tmp_path / 'both' / 'seed0' / 'run.json'))[
      'status'] == 'running'
  partial = ablate.read_json(str(tmp_path / 'ablation.json'))
  assert len(partial['runs']) == 2
  assert 'pending' in (tmp_path / 'ablation.md').read_text()

  second = StandInRun()
  report = ablate.run_grid(base, str(tmp_path), grid, seeds, steps=4,
                           run_fn=second, log=lambda _: None)
  assert second.calls == [('both', 0), ('both', 1)]
  assert ablate.read_json(str(tmp_path / 'mimic_off' / 'seed0' / 'run.json')
                          ) == done  # untouched, finish time included
  assert len(report['runs']) == 4
  both = report['summary']['both']
  np.testing.assert_allclose(both['s_AP']['mean'], 0.105)
  np.testing.assert_allclose(both['delta_s_AP']['values'], [0.1, 0.1])
  np.testing.assert_allclose(both['train_time_s']['mean'], 2.0)
  md = (tmp_path / 'ablation.md').read_text()
  assert 'pending' not in md
  assert '| `both` | cls kl, reg cosine | 2/2 | 10.5 ± 0.7 |' in md
  assert (tmp_path / 'ablation.png').stat().st_size > 10000

  # A third call has nothing to do; other settings in the same DIR refuse.
  third = StandInRun()
  ablate.run_grid(base, str(tmp_path), grid, seeds, steps=4, run_fn=third,
                  log=lambda _: None, plot=False)
  assert third.calls == []
  with pytest.raises(ValueError, match='other settings'):
    ablate.run_grid(base, str(tmp_path), grid, seeds, steps=8, run_fn=third,
                    log=lambda _: None)


def test_diverged_run_is_reported_and_not_retried(tmp_path):
  base = configs.demo.get_config()
  grid, seeds = ['mimic_off', 'l2'], [0, 1]
  first = StandInRun(diverge=[('l2', 1)])
  report = ablate.run_grid(base, str(tmp_path), grid, seeds, steps=2,
                           run_fn=first, log=lambda _: None, plot=False)
  l2 = report['summary']['l2']
  assert l2['seeds_done'] == [0] and l2['seeds_diverged'] == [1]
  assert l2['s_AP']['n'] == 1 and l2['delta_s_AP']['n'] == 1
  assert '| `l2` | cls l2, reg l2 | 1/2 (1 diverged) |' in (
      tmp_path / 'ablation.md').read_text()
  second = StandInRun()
  ablate.run_grid(base, str(tmp_path), grid, seeds, steps=2, run_fn=second,
                  log=lambda _: None, plot=False)
  assert second.calls == []


def test_cli_report_only(tmp_path):
  base = configs.demo.get_config()
  ablate.run_grid(base, str(tmp_path), ['cls'], [3], steps=2,
                  run_fn=StandInRun(), log=lambda _: None, plot=False)
  os.remove(tmp_path / 'ablation.md')
  report = ablate.main(['--base', 'configs/demo.py', '--grid', 'cls',
                        '--seeds', '3', '--workdir', str(tmp_path),
                        '--report_only'])
  assert report['runs'][0]['variant'] == 'cls'
  assert (tmp_path / 'ablation.md').exists()


# ------------------------------------------- checks before the first run


def test_bad_variant_fails_before_any_training(tmp_path):
  base = configs.demo.get_config()
  for bad, match in (('mimic.reg_distance=kl', r"--grid mimic.reg_distance=kl: "
                      r"mimic.reg_distance='kl'; expected one of"),
                     ('cls+s_head.sampling=random', r"s_head.sampling='random'"),
                     ('mimic.distance=kl', 'replaced by mimic.cls_distance'),
                     ('no_such_variant', 'unknown variant')):
    run = StandInRun()
    with pytest.raises(errors.ConfigError, match=match):
      ablate.run_grid(base, str(tmp_path), ['mimic_off', bad], [0], steps=2,
                      run_fn=run, log=lambda _: None, plot=False)
    assert run.calls == [], bad  # the good first variant did not train
  assert not os.path.exists(tmp_path / 'mimic_off')


def _logged_run(tmp_path, base, grid, **kw):
  lines = []
  run = StandInRun()

  def log(line):
    lines.append((len(run.calls), line))

  ablate.run_grid(base, str(tmp_path), grid, [0], run_fn=run, log=log,
                  plot=False, **kw)
  return [line for calls, line in lines if calls == 0 and
          line.startswith('warning')], lines


def test_missing_reference_and_cut_warmup_warn_once_before_training(tmp_path):
  base = configs.demo.get_config()  # warm-up 367 of 2200 steps
  warned, _ = _logged_run(tmp_path / 'a', base, ['cls', 'both'], steps=2200)
  assert len(warned) == 1 and '--reference mimic_off is not in --grid' in (
      warned[0])
  warned, _ = _logged_run(tmp_path / 'b', base, ['mimic_off', 'both'],
                          steps=1100)
  assert len(warned) == 1
  assert "--steps 1100 cuts the warm-up from the recipe's 367 steps to 184" in (
      warned[0])
  # A kept warm-up, or no cut, or the reference in the grid: no warning.
  warned, lines = _logged_run(
      tmp_path / 'c', base, ['mimic_off', 'both'], steps=1100,
      global_overrides={'optim.warmup_steps': 367})
  assert not warned and not any('warning' in l for _, l in lines)
  warned, _ = _logged_run(tmp_path / 'd', base, ['mimic_off'], steps=None)
  assert not warned


def test_grid_sets_its_compile_cache_in_every_run(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.training import launch  # pylint: disable=g-import-not-at-top
  base = configs.demo.get_config()
  assert base.train.compile_cache  # the recipe has a cache of its own
  seen = []

  def run(config, workdir):
    seen.append(config.train.compile_cache)
    # What train_and_evaluate does with the run's config.
    before = jax.config.jax_compilation_cache_dir
    try:
      assert launch.enable_compile_cache(config.train.compile_cache,
                                         workdir) == cache
      assert jax.config.jax_compilation_cache_dir == cache
    finally:
      jax.config.update('jax_compilation_cache_dir', before)
    return StandInRun()(config, workdir)

  cache = ablate.grid_cache(str(tmp_path))
  assert cache == os.path.join(str(tmp_path), 'jax_cache')
  assert ablate.grid_cache(str(tmp_path), 'none') == ''
  ablate.run_grid(base, str(tmp_path), ['mimic_off', 'both'], [0], steps=2,
                  run_fn=run, log=lambda _: None, plot=False,
                  compile_cache=cache)
  assert seen == [cache, cache]
  # Not a setting of the run: a resume with another cache is the same grid.
  record = ablate.read_json(str(tmp_path / 'both' / 'seed0' / 'run.json'))
  assert 'train.compile_cache' not in record['overrides']


def test_missing_data_set_is_one_line(tmp_path, capsys):
  missing = str(tmp_path / 'nowhere' / 'val.json')
  for flags, key in (
      (['--config.data.train_annotations=' + missing], 'data.train_annotations'),
      (['--report_only', '--val_images', '2',
        '--config.data.val_annotations=' + missing], '--val_images 2'),
  ):
    with pytest.raises(SystemExit) as e:
      errors.cli(ablate.main)(['--base', 'configs/demo.py', '--grid', 'cls',
                               '--workdir', str(tmp_path / 'grid')] + flags)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and missing in err, err
  assert not os.path.exists(tmp_path / 'grid' / 'cls')


def test_every_row_states_its_mimic_per_path(tmp_path):
  base = configs.demo.get_config()  # cls kl, reg cosine
  grid = ['mimic_off', 'both', 'cls', 'reg', 'l2', 'kl',
          'mimic.reg_distance=smooth_l1', 'mimic.cls_distance=cosine+reg']
  want = ['off', 'cls kl, reg cosine', 'cls kl', 'reg cosine',
          'cls l2, reg l2', 'cls kl, reg cosine', 'cls kl, reg smooth_l1',
          'reg cosine']
  report = ablate.run_grid(base, str(tmp_path), grid, [0], steps=2,
                           run_fn=StandInRun(), log=lambda _: None, plot=False,
                           only=['mimic_off'])
  assert report['mimic'] == dict(zip(grid, want))
  md = (tmp_path / 'ablation.md').read_text()
  for spec, mimic in zip(grid, want):  # finished and pending rows alike
    assert f'| `{spec}` | {mimic} | ' in md, spec
  record = ablate.read_json(str(tmp_path / 'mimic_off' / 'seed0' / 'run.json'))
  assert record['mimic'] == 'off'
  # Every distance variant sets each path it is valid for, by name.
  from mimicdet_jax.losses import mimic  # pylint: disable=g-import-not-at-top
  for name in mimic.DISTANCES:
    config, _ = ablate.run_config(base, name, 0, None, {})
    for path, names in mimic.PATH_DISTANCES.items():
      if name in names:
        assert config.mimic[f'{path}_distance'] == name


def test_plot_has_every_logged_number_or_the_named_ones(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr(ablate, 'plot_curves',
                      lambda curves, path, terms: drawn.append(
                          terms or report.logged_terms(curves)) or True)
  base = configs.demo.get_config()
  ablate.run_grid(base, str(tmp_path), ['mimic_off'], [0], steps=2,
                  run_fn=StandInRun(), log=lambda _: None)
  assert drawn[-1] == ['loss', 'loss_mimic', 'mimic_cos_cls', 'mimic_cos_reg',
                       'step_time', 't_reg_alive']
  ablate.run_grid(base, str(tmp_path), ['mimic_off'], [0], steps=2,
                  run_fn=StandInRun(), log=lambda _: None,
                  plot_keys=['t_reg_alive'])
  assert drawn[-1] == ['t_reg_alive']


# -------------------------------------------------------- real CLI (slow)


def _tiny_flags(data):
  return [
      f'--config.data.train_annotations={data}/annotations/train.json',
      f'--config.data.train_images={data}/train',
      f'--config.data.val_annotations={data}/annotations/val.json',
      f'--config.data.val_images={data}/val',
      '--config.data.train_min_sizes=(128,)', '--config.data.min_size=128',
      '--config.data.max_size=128', '--config.data.canvas_buckets=((128,128),)',
      '--config.model.fpn_channels=16', '--config.refine.channels=16',
      '--config.s_head.channels=16', '--config.s_head.offset_hidden=(8,8)',
      '--config.s_head.cls_dim=32', '--config.s_head.reg_dim=32',
      '--config.t_head.fc_dim=32', '--config.t_head.conv_dim=16',
      '--config.t_head.num_convs=1', '--config.t_head.num_samples=16',
      '--config.s_head.ohem_samples=16',
      '--config.proposals.pre_nms_topk=32',
      '--config.proposals.num_proposals=32', '--config.eval.pre_nms_topk=32',
      '--config.eval.max_detections=10', '--config.eval.batch_size=2',
      '--config.train.batch_size=2']


@pytest.mark.slow
def test_cli_killed_after_first_run_resumes(tmp_path):
  data, work = tmp_path / 'data', tmp_path / 'grid'
  subprocess.run([sys.executable, '-m', 'mimicdet_jax.data.synthetic',
                  str(data), '--num-train', '4', '--num-val', '2', '--seed', '0',
                  '--min-size', '128', '--max-size', '128'], check=True,
                 cwd=REPO)
  cmd = [sys.executable, '-m', 'mimicdet_jax.experiments.ablate',
         '--base', 'configs/demo.py', '--grid', 'mimic_off,both', '--seeds',
         '0', '--workdir', str(work), '--steps', '2'] + _tiny_flags(data)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=subprocess_env.xla_flags(1))
  first = work / 'mimic_off' / 'seed0'
  log = tmp_path / 'first.log'  # a file: a full pipe would block the child
  with open(log, 'w') as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out,
                            start_new_session=True)
    try:
      deadline = time.time() + 1500
      while time.time() < deadline and proc.poll() is None:
        record = ablate.read_json(str(first / 'run.json'))
        if record and record['status'] == 'done':
          break
        time.sleep(0.5)
      # Still running: killed between its first and second run.
      assert proc.poll() is None, log.read_text()[-3000:]
      os.killpg(proc.pid, signal.SIGKILL)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  done = ablate.read_json(str(first / 'run.json'))
  metrics_before = (first / 'metrics.jsonl').read_text()
  second = ablate.read_json(str(work / 'both' / 'seed0' / 'run.json'))
  assert second is None or second['status'] == 'running'
  for head in ('s', 't'):
    assert (first / f'eval_{head}' / 'metrics.json').exists()

  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'mimic_off seed 0: done, skipped' in r.stdout
  assert ablate.read_json(str(first / 'run.json')) == done
  assert (first / 'metrics.jsonl').read_text() == metrics_before
  report = json.loads((work / 'ablation.json').read_text())
  assert [(x['variant'], x['seed']) for x in report['runs']] == [
      ('mimic_off', 0), ('both', 0)]
  for run in report['runs']:
    assert run['step'] == 2
    for key in ('s_AP', 's_AP50', 't_AP'):
      assert 0.0 <= run[key] <= 1.0
    assert run['train_time_s'] > 0
  md = (work / 'ablation.md').read_text()
  assert 'pending' not in md and '`both`' in md
  assert (work / 'ablation.png').exists()
