"""benchmarks/: helpers (fast) and the scripts end to end at a tiny size (slow).

The slow tests run benchmarks/train_step.py and benchmarks/inference.py as
users do (subprocesses, config overrides, --json) on a shrunken demo config,
so the scripts keep working as the model changes; each XLA compile of the
MimicDet step takes a minute or more on a loaded 2-core CPU.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common as bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import peer_torchvision  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import subprocess_env

# Shrinks the demo config further (widths, box counts): the scripts' logic is
# the same at any size.
TINY = ['--config.model.fpn_channels=16', '--config.refine.channels=16',
        '--config.s_head.channels=16', '--config.s_head.cls_dim=32',
        '--config.s_head.reg_dim=32', '--config.t_head.fc_dim=32',
        '--config.t_head.conv_dim=16', '--config.t_head.num_convs=1',
        '--config.proposals.pre_nms_topk=40',
        '--config.proposals.num_proposals=40',
        '--config.t_head.num_samples=16', '--config.s_head.ohem_samples=16',
        '--config.eval.pre_nms_topk=40', '--config.data.max_boxes=4']


# ------------------------------------------------------------------ helpers
def test_parse_size():
  assert bench.parse_size('512x768') == (512, 768)
  assert bench.parse_size('896X1408') == (896, 1408)
  with pytest.raises(ValueError, match='HxW'):
    bench.parse_size('512')


def test_resolve_config_sets_canvas_dtype_and_checks_divisibility():
  c = bench.resolve_config(demo.get_config(), size='128x384', dtype='bf16',
                           num_classes=3, batch_size=4)
  assert tuple(c.data.canvas_buckets) == ((128, 384),)
  assert (c.data.min_size, c.data.max_size) == (128, 384)
  assert c.model.dtype == 'bfloat16'
  assert c.model.num_classes == 3 and c.s_head.num_logits == 4
  assert c.train.batch_size == 4
  with pytest.raises(ValueError, match='divisible'):
    bench.resolve_config(demo.get_config(), size='100x128', num_classes=3)


def test_num_classes_falls_back_to_coco_without_annotations():
  c = demo.get_config()
  c.data.train_annotations = '/nonexistent/train.json'
  assert bench.num_classes_of(c) == 80
  assert bench.num_classes_of(c, override=6) == 6
  c.data.num_classes = 12
  assert bench.num_classes_of(c) == 12


def test_synthetic_examples_match_the_model_example_contract():
  c = bench.resolve_config(demo.get_config(), size='128x256', num_classes=5)
  ex = bench.synthetic_examples(c, (2, 3), boxes_per_image=4, seed=1)
  g = c.data.max_boxes
  assert ex['image'].shape == (2, 3, 128, 256, 3)
  assert ex['image'].dtype == np.float32
  assert ex['boxes'].shape == (2, 3, g, 4)
  assert ex['classes'].dtype == np.int32 and ex['box_mask'].dtype == bool
  np.testing.assert_array_equal(ex['image_size'][1, 2], [128, 256])
  # Exactly 4 real boxes per image, inside the canvas, at least 16 px a side.
  np.testing.assert_array_equal(ex['box_mask'].sum(-1), np.full((2, 3), 4))
  real = ex['boxes'][ex['box_mask']]
  assert np.all(real[:, 0] >= 0) and np.all(real[:, 1] >= 0)
  assert np.all(real[:, 2] <= 256) and np.all(real[:, 3] <= 128)
  assert np.all(real[:, 2:] - real[:, :2] >= 16 - 1e-3)
  assert np.all((ex['classes'][ex['box_mask']] >= 1) &
                (ex['classes'][ex['box_mask']] <= 5))
  np.testing.assert_array_equal(ex['classes'][~ex['box_mask']], 0)
  np.testing.assert_array_equal(ex['boxes'][~ex['box_mask']], 0)
  assert not ex['is_crowd'].any()
  assert len(set(ex['image_id'].ravel().tolist())) == 6


def test_numpy_init_has_the_model_tree_and_sane_scales():
  from configs import mimicdet_r50_fpn_1x  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top
  # R50: frozen BatchNorm (the demo's tiny backbone has none).
  c = bench.resolve_config(mimicdet_r50_fpn_1x.get_config(), size='128x128',
                           num_classes=3)
  model = mimicdet.MimicDet(c)
  variables = bench.init_variables(c, model, init='numpy')
  shapes = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, 128, 128, 3)), train=False),
      jax.random.PRNGKey(0))
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(jax.tree.map(lambda x: 0, dict(shapes))))
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(shapes)):
    assert got.shape == want.shape and got.dtype == want.dtype
  # Frozen BatchNorm is the identity: scale = var = 1, bias = mean = 0.
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables['frozen'])[0]:
    name = path[-1].key
    np.testing.assert_array_equal(leaf, 1.0 if name in ('scale', 'var')
                                  else 0.0)
  # The real initialisers' scales, checked on the large kernels: He
  # fan-out in the backbone, 1/fan_in in the pyramid, 0.01 in the heads.
  checked = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables['params'])[0]:
    if leaf.ndim < 2 or leaf.size < 4096:
      continue
    top = path[0].key
    if top == 'backbone':
      want = math.sqrt(2.0 / (np.prod(leaf.shape[:-2]) * leaf.shape[-1]))
    elif top == 'fpn':
      want = math.sqrt(1.0 / np.prod(leaf.shape[:-1]))
    else:
      want = 0.01
    assert abs(np.std(leaf) / want - 1) < 0.1, (path, np.std(leaf), want)
    checked.add(top)
  assert {'backbone', 'fpn', 's_head_net', 't_head_net'} <= checked


def test_compile_counter_sees_new_compiles_only():
  counter = bench.CompileCounter()
  f = jax.jit(lambda x: x * 3 + 1)
  x = jnp.arange(7.0)
  counter.start()
  f(x).block_until_ready()
  assert counter.stop().count >= 1
  counter.start()
  for _ in range(3):  # cached executable
    f(x).block_until_ready()
  assert counter.stop().count == 0
  counter.start()
  f(jnp.arange(9.0)).block_until_ready()  # new shape: compiles again
  assert counter.stop().count >= 1


def test_cost_analysis_flops_of_a_matmul():
  a = jnp.ones((64, 32))
  b = jnp.ones((32, 16))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  flops = bench.cost_analysis(compiled)['flops']
  assert flops == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def test_matmul_flops_counts_grouped_convs_dots_and_their_gradients():
  # Closed forms: a grouped 3x3 conv [2,8,8,4] -> [2,8,8,6] with 2 groups
  # does 2*8*8*6 outputs x (3*3*2) MACs; y @ m does 2*8*8 x 6 x 5 MACs; a
  # scan repeats its body; the backward pass doubles each (input and weight
  # gradient), the remat'd matmul is linear so it is not recomputed.
  conv = 2 * (2 * 8 * 8 * 6) * (3 * 3 * 2)
  dot = 2 * (2 * 8 * 8) * 6 * 5

  def f(x, w, m):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=2)
    y = jax.checkpoint(lambda y: y @ m)(y)
    return jnp.sum(y ** 2)

  args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 2, 6)), jnp.ones((6, 5)))
  assert bench.matmul_flops(jax.make_jaxpr(f)(*args)) == conv + dot
  grads = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(*args)
  assert bench.matmul_flops(grads) == 3 * (conv + dot)

  def scanned(x, m):
    return jax.lax.scan(lambda c, _: (c @ m, None), x, None, length=4)[0]

  assert bench.matmul_flops(jax.make_jaxpr(scanned)(
      jnp.ones((3, 5)), jnp.ones((5, 5)))) == 4 * 2 * 3 * 5 * 5


def test_peer_ratios_are_ours_over_theirs():
  result = dict(
      args=dict(batch=2),
      peers=dict(retinanet=dict(
          train=dict(images_per_s=4.0),
          infer={'1': dict(median_s=0.5), '8': dict(median_s=2.0)})),
      ours=dict(train=dict(images_per_s=6.0),
                infer=dict(rows=[dict(batch=1, median_s=0.25)])))
  rows = peer_torchvision.ratios(result)
  assert [r['ratio'] for r in rows] == [1.5, 0.5]  # no ours row for batch 8
  assert rows[0]['what'] == 'train images/s, batch 2'
  assert peer_torchvision.ratios(dict(peers={}, args={})) == []


# ------------------------------------------------------------------ scripts
def _run(script, args, tmp_path, devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=subprocess_env.xla_flags(devices))
  out = tmp_path / 'result.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', script),
       '--config', os.path.join(REPO, 'configs', 'demo.py'), '--num_classes',
       '3', '--json', str(out), *TINY, *args],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize('parallelism', ['pmap', 'shard_map'])
def test_train_step_script_on_two_devices(tmp_path, parallelism):
  r, stdout = _run('train_step.py', ['--batch', '1', '--size', '128x128',
                                     '--steps', '2', '--warmup', '1',
                                     f'--config.train.parallelism={parallelism}'],
                   tmp_path, devices=2)
  assert r['global_batch'] == 2 and r['per_device_batch'] == 1
  assert r['canvas'] == [128, 128] and r['arch'] == 'resnet_tiny'
  assert r['recompiles_in_window'] == 0  # the step compiles once
  assert r['first_step_compiles'] >= 1
  assert r['last_step_finite']
  assert r['images_per_s'] == pytest.approx(2 / r['step_s'])
  assert r['step_flops_per_image'] > 1e7  # convs + matmuls, fwd + bwd
  assert r['mfu'] is None  # no peak known for a CPU
  assert r['peak_memory']['bytes'] > 0
  assert 'images/s' in stdout and 'recompiles in the timed window: 0' in stdout
  assert r['minor_page_faults_per_step'] >= 0
  assert 'minor page faults per step' in stdout


@pytest.mark.slow
def test_inference_script_s_and_t_heads(tmp_path):
  r, _ = _run('inference.py', ['--batch', '1,2', '--head', 's,t',
                               '--size', '128x128', '--reps', '1'], tmp_path)
  rows = {(row['head'], row['batch']): row for row in r['rows']}
  assert set(rows) == {('s', 1), ('s', 2), ('t', 1), ('t', 2)}
  for row in rows.values():
    assert row['recompiles_in_timed_calls'] == 0
    assert 0 <= row['detections_per_image'] <= 100
    assert row['images_per_s'] == pytest.approx(row['batch'] / row['median_s'])
  assert r['pre_nms_topk'] == 40 and r['canvas'] == [128, 128]


# ------------------------------------------------------------ profile_step
def test_profile_summary_union_of_intervals():
  """covered = union of the op intervals, summed = their total (per step)."""
  from benchmarks import profiling  # pylint: disable=g-import-not-at-top
  ms = 1_000_000
  events = [('dot.1', 0, 4 * ms), ('gather.2', 2 * ms, 4 * ms),  # overlap
            ('dot.3', 10 * ms, 2 * ms)]  # after a 4 ms gap
  s = profiling.summarize(events, steps=2)
  assert s['summed_ms'] == pytest.approx(5.0)  # (4 + 4 + 2) / 2 steps
  assert s['covered_ms'] == pytest.approx(4.0)  # ([0, 6] + [10, 12]) / 2
  assert s['span_ms'] == pytest.approx(6.0)  # [0, 12] / 2
  assert s['by_kind']['dot'] == pytest.approx(3.0)
  assert s['by_op']['gather.2'] == pytest.approx(2.0)


def test_profile_trace_names_ops_by_their_jax_source(tmp_path):
  """A real jax.profiler trace of a jitted function: its XLA ops are found
  and the compiled HLO maps them back to the JAX ops that made them."""
  from benchmarks import profiling  # pylint: disable=g-import-not-at-top

  def f(x, w):
    return jnp.tanh(jnp.dot(x, w)).sum()

  step = jax.jit(jax.grad(f, argnums=1))
  x = jnp.ones((256, 128))
  w = jnp.ones((128, 64)) * 0.01
  jax.block_until_ready(step(x, w))
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(2):
    jax.block_until_ready(step(x, w))
  jax.profiler.stop_trace()
  files = list(tmp_path.rglob('*.xplane.pb'))
  assert files
  events = profiling.op_events(
      jax.profiler.ProfileData.from_file(str(files[0])))
  assert events, 'no XLA op events in the trace'
  names = profiling.hlo_op_names(step.lower(x, w).compile().as_text())
  sources = {names[n][1] for n, _, _ in events if n in names}
  assert any('dot_general' in src for src in sources), sources
  s = profiling.summarize(events, steps=2)
  assert 0 < s['covered_ms'] <= s['span_ms'] + 1e-9


def test_profile_groups_ops_by_pass_and_model_part():
  """op_group on source op names as XLA:CPU's compiled demo step spells them,
  and by_group sums the per-op times of a group."""
  from benchmarks import profiling  # pylint: disable=g-import-not-at-top
  g = profiling.op_group
  assert g('jit(_fun)/jvp(vmap(MimicDet))/s_head_net/coarse_conv/jit(_take)/'
           'gather') == ('forward', 's_head_net')
  assert g('jit(_fun)/transpose(jvp(vmap(MimicDet)))/backbone/layer1/block0/'
           'bn3/add_any') == ('backward', 'backbone')
  assert g('jit(_fun)/transpose(jvp(vmap(MimicDet.t_head)))/t_head_net/'
           'vmap(jit(_take))/scatter-add') == ('backward', 't_head_net')
  assert g('jit(_fun)/jvp(vmap(MimicDet))/concatenate') == (
      'forward', '(model top level)')
  assert g('jit(_fun)/jvp(vmap(MimicDet))/fpn/jit(floor_divide)') == (
      'forward', 'fpn')
  assert g('jit(_fun)/transpose(jvp(vmap(jit(take_along_axis))))/'
           'scatter-add') == ('backward', 'loss and targets')
  assert g('jit(_fun)/jvp(vmap(vmap(jit(nms))))/while') == (
      'forward', 'loss and targets')
  assert g('sort') == ('outside', 'targets, optimizer, rest')
  assert g('') == ('other', '(no op_name)')
  summary = dict(by_op={'a.1': 2.0, 'b.2': 3.0, 'c.3': 4.0})
  names = {'a.1': ('f32[1]', 'jit(f)/jvp(vmap(MimicDet))/fpn/add'),
           'b.2': ('f32[1]', 'jit(f)/jvp(vmap(MimicDet))/fpn/lateral/dot'),
           'c.3': ('f32[1]', 'jit(f)/transpose(jvp(vmap(MimicDet)))/fpn/x')}
  assert profiling.by_group(summary, names) == {
      ('forward', 'fpn'): 5.0, ('backward', 'fpn'): 4.0}


@pytest.mark.slow
def test_profile_step_script(tmp_path):
  r, stdout = _run('profile_step.py', ['--batch', '1', '--size', '128x128',
                                       '--steps', '1', '--warmup', '1',
                                       '--trace_dir', str(tmp_path / 't')],
                   tmp_path)
  assert r['summed_ms'] > 0 and r['top_ops']
  assert any('conv' in row['source'] or 'dot' in row['source']
             for row in r['top_ops'])
  assert 'by op kind' in stdout and 'by pass and part' in stdout
  assert r['by_group']
  assert abs(sum(r['by_group'].values()) - r['summed_ms']) < 1e-6 * max(
      1, r['summed_ms'])


def test_input_pipeline_dataset_and_both_image_paths(tmp_path):
  """benchmarks/input_pipeline.py at the demo's sizes: a valid COCO set with
  7 boxes per image, and both image paths through the real loader."""
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.data import coco  # pylint: disable=g-import-not-at-top
  ann = input_pipeline.write_dataset(str(tmp_path), 4)
  source = coco.CocoSource(ann, str(tmp_path / 'images'))
  assert len(source) == 4
  assert all(len(source.annotations(i)['boxes']) == 7 for i in range(4))
  assert source[1]['image'].shape == (640, 480, 3)
  rows = {}
  for on_device in (False, True):
    config = input_pipeline._config(os.path.join(REPO, 'configs/demo.py'),
                                    {'data.device_normalize': on_device})
    rows[on_device] = input_pipeline.measure(config, source, batch=2,
                                             batches=1, workers=[0])
  assert rows[True]['batch_image_dtype'] == 'uint8'
  assert rows[False]['batch_image_dtype'] == 'float32'
  assert rows[False]['batch_image_mb'] == 4 * rows[True]['batch_image_mb']
  assert rows[True]['loader_0_workers_images_per_s'] > 0
  assert rows[True]['collate_ms'] > 0 and rows[True]['transform_ms'] > 0


def test_side_by_side_runs_the_baseline_first_and_last(tmp_path, capsys,
                                                      monkeypatch):
  """benchmarks/side_by_side.py (cpu_xla_flags.py, cpu_malloc.py,
  demo_cost.py): the order base, others, base; an unknown variant is named
  and nothing runs; a failing train_step.py comes back as its error line,
  not an exception; a child's environment adds XLA flags, sets and removes
  variables."""
  from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top
  ran = []
  rows = side_by_side.run_all(['a', 'base', 'b'], ['base', 'a', 'b'],
                              lambda n: ran.append(n) or dict(step_s=1.0))
  assert ran == ['base', 'a', 'b', 'base']
  assert [r['name'] for r in rows] == ran and rows[0]['step_s'] == 1.0
  ran.clear()
  with pytest.raises(SystemExit, match=r"unknown variants: \['c'\]"):
    side_by_side.run_all(['a', 'c'], ['base', 'a'], ran.append)
  assert not ran
  r = side_by_side.train_step(str(tmp_path / 'missing.py'), batch=1, steps=1,
                              warmup=0)
  assert set(r) == {'error'} and 'missing.py' in r['error']
  monkeypatch.setenv('XLA_FLAGS', '--a=1')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  env = side_by_side.child_env('--b=2', {'GLIBC_TUNABLES': None, 'X': 'y'})
  assert env['XLA_FLAGS'] == '--a=1 --b=2' and env['JAX_PLATFORMS'] == 'cpu'
  assert 'GLIBC_TUNABLES' not in env and env['X'] == 'y'
  assert side_by_side.child_env()['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  args = side_by_side.arg_parser('doc', ['base', 'a']).parse_args(
      ['--variants', 'a,,base', '--json', str(tmp_path / 'rows.json')])
  assert side_by_side.variant_names(args) == ['a', 'base']
  side_by_side.save(args.json, rows)
  with open(args.json) as f:
    assert json.load(f) == rows
  rows.append(dict(name='a', error='boom'))
  side_by_side.print_table(('variant', 'step', '/ base'), rows,
                           lambda r, base: [f"{r['step_s']:.1f}",
                                            f"{r['step_s'] / base:.2f}"])
  table = capsys.readouterr().out.strip().splitlines()[-7:]
  assert table == ['| variant | step | / base |', '|---|---|---|',
                   '| base | 1.0 | 1.00 |', '| a | 1.0 | 1.00 |',
                   '| b | 1.0 | 1.00 |', '| base | 1.0 | 1.00 |',
                   '| a | failed: boom |  |']
