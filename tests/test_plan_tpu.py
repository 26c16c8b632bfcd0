"""The TPU planner (mimicdet_jax/tools/plan_tpu.py): its arithmetic here,
and, where libtpu is installed (`make tpu-plan-deps`; `.ci/run` installs it
and sets MIMICDET_REQUIRE_TPU=1, under which a skip fails), the real TPU
compiler on abstract chips: the demo step and its exported detector on a
2-chip v5e, the figures read from the compiled executable, the one-line
errors."""
import io
import os
import subprocess
import sys

import pytest

from configs import demo
from mimicdet_jax.errors import ConfigError
from mimicdet_jax.tools import aot
from mimicdet_jax.tools import plan_tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  import libtpu  # pylint: disable=unused-import
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False

def needs_libtpu(test):
  """Marked `tpu` (`make test-tpu`, not `make test`: minutes of compiling);
  skipped without libtpu unless MIMICDET_REQUIRE_TPU=1."""
  test = pytest.mark.tpu(test)
  return pytest.mark.skipif(
      not HAVE_LIBTPU and os.environ.get('MIMICDET_REQUIRE_TPU') != '1',
      reason='libtpu is not installed (make tpu-plan-deps)')(test)


def test_roofline_is_the_slower_of_compute_and_memory():
  chip = plan_tpu.Chip(tflops=100.0, hbm_gib=16.0, hbm_gbps=1000.0, source='')
  # 1 TFLOP at 100 TFLOP/s = 10 ms; 5 GB at 1000 GB/s = 5 ms.
  assert plan_tpu.roofline_seconds(1e12, 5e9, chip) == pytest.approx(0.010)
  assert plan_tpu.roofline_seconds(1e11, 5e10, chip) == pytest.approx(0.050)


def test_max_fitting_batch_is_linear_through_two_points():
  # 10 GB at 2 images, 14 GB at 4: 2 GB an image over 6 GB fixed.
  gb = 1e9
  assert plan_tpu.max_fitting_batch(2, 10 * gb, 4, 14 * gb, 16 * gb) == 5
  assert plan_tpu.max_fitting_batch(2, 10 * gb, 4, 14 * gb, 15.99 * gb) == 4
  assert plan_tpu.max_fitting_batch(2, 10 * gb, 4, 14 * gb, 5 * gb) == 0


def test_published_peaks_cover_the_four_generations():
  assert set(plan_tpu.CHIPS) == {'v4', 'v5e', 'v5p', 'v6e'}
  for gen, chip in plan_tpu.CHIPS.items():
    assert chip.source.endswith(gen)
    # per chip, as published: 275 / 197 / 459 / 918 TFLOP/s
    assert chip.tflops in (275.0, 197.0, 459.0, 918.0)
  with pytest.raises(ConfigError, match="unknown TPU generation 'v9'"):
    plan_tpu.generation('v9:2x2')


def test_canvas_choice():
  config = demo.get_config()
  config.data.canvas_buckets = ((256, 384), (384, 384))
  config.data.size_divisor = 128
  assert plan_tpu.pick_canvas(config, 'largest') == (384, 384)
  assert plan_tpu.pick_canvas(config, 'first') == (256, 384)
  assert plan_tpu.pick_canvas(config, '128x256') == (128, 256)
  with pytest.raises(ConfigError, match='not divisible'):
    plan_tpu.pick_canvas(config, '100x256')
  with pytest.raises(ConfigError, match='expected HxW'):
    plan_tpu.pick_canvas(config, 'big')
  config.data.augment = 'lsj'
  config.data.lsj_size = 512
  assert plan_tpu.pick_canvas(config, 'largest') == (512, 512)
  assert plan_tpu.pick_canvas(config, 'first') == (512, 512)


def _run_planner(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'mimicdet_jax.tools.plan_tpu', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_unknown_topology_is_one_line():
  out = _run_planner('--config', 'configs/demo.py', '--topology', 'v5e:3x7x9')
  assert out.returncode == 1, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1 and "'v5e:3x7x9'" in errors[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


@needs_libtpu
def test_batch_that_does_not_divide_over_the_chips_is_one_line():
  # demo: train.batch_size 4 over the 8 chips of v5e:2x4.
  out = _run_planner('--config', 'configs/demo.py', '--topology', 'v5e:2x4',
                     '--config.train.batch_size=4')
  assert out.returncode == 1, out.stderr[-2000:]
  assert 'does not divide over the 8 chips' in out.stderr
  assert 'Traceback' not in out.stderr


@needs_libtpu
def test_a_v4_chip_is_one_device_as_on_cloud_tpu_vms():
  # Megacore: a v4-8 host shows 4 devices, one per chip (each two
  # TensorCores); libtpu's default compile-only v4 topology has 8.
  devices = aot.topology_devices('v4:2x2x1')
  assert len(devices) == 4
  assert len({tuple(d.coords) for d in devices}) == 4
  assert len(aot.topology_devices('v5p:2x2x1')) == 4
  assert len(aot.topology_devices('v5e:2x2')) == 4


@pytest.fixture(scope='module')
def demo_plan():
  """The demo recipe planned on a 2-chip v5e: one compile of the step and
  one of the exported detector, shared by the tests below."""
  config = demo.get_config()
  text = io.StringIO()
  result = plan_tpu.plan(config, 'v5e:2x1', 2, 'largest', num_classes=3,
                         find_max=False, detector=True, out=text)
  return result, text.getvalue()


@needs_libtpu
def test_demo_step_compiles_for_v5e_and_its_figures_are_the_executables(
    demo_plan):
  result, text = demo_plan
  step = result['step']
  assert result['chips'] == 2 and result['images_per_chip'] == 2
  # The HBM is the executable's: the donated state aliases its outputs, and
  # the parameters (~1.3 M float32 of the tiny ResNet demo) plus AdamW's two
  # moments are most of the arguments.
  assert step.alias_bytes > 0.9 * step.output_bytes
  assert 3 * 4 * 1.0e6 < step.argument_bytes < 3 * 4 * 3.0e6
  assert step.temp_bytes > 0 and step.code_bytes > 0
  assert step.hbm_bytes == (step.argument_bytes + step.output_bytes -
                            step.alias_bytes + step.temp_bytes +
                            step.code_bytes)
  assert step.hbm_bytes < 16 * 2**30  # fits a v5e chip
  assert step.flops > 1e9 and step.bytes_accessed > 1e8
  assert result['per_image']['bytes'] == pytest.approx(step.bytes_accessed / 2)
  assert 'fits' in text and 'images/s' in text and 'compile:' in text
  assert "bf16[" in step.hlo_text() or 'f32[' in step.hlo_text()


@needs_libtpu
def test_the_floor_is_under_the_compilers_count(demo_plan):
  """tools/floor.py's floor is a lower bound: the TPU compiler's count of
  the same step, copies taken out, is above it."""
  result, text = demo_plan
  assert 0 < result['floor_bytes'] < result['bytes_without_copies']
  assert 'floor: ' in text


@needs_libtpu
def test_demo_detector_compiles_for_v5e(demo_plan):
  result, text = demo_plan
  det = result['detector']
  assert det.flops > 1e8 and det.hbm_bytes < 16 * 2**30
  assert 'exported detector: 8 images on one chip' in text


@needs_libtpu
def test_a_config_that_does_not_fit_says_by_how_much_and_what_to_change(
    demo_plan):
  result, _ = demo_plan
  step = result['step']
  # The same executable against a chip with a quarter of its HBM.
  small = plan_tpu.Chip(tflops=197.0, hbm_gib=step.hbm_bytes / 4 / 2**30,
                        hbm_gbps=819.0, source='test')
  text = io.StringIO()
  plan_tpu.report_fit(step, small, out=text)
  line = text.getvalue()
  assert 'DOES NOT FIT' in line
  over = float(line.split('DOES NOT FIT: ')[1].split(' GB')[0])
  assert over == pytest.approx(step.hbm_bytes * 0.75 / 1e9, abs=0.01)
  assert 'model.dtype=bfloat16' in line and 'backbone.remat' in line


def test_memory_space_copy_bytes_reads_the_copies_between_spaces():
  """Only copy-starts whose destination and source memory spaces differ,
  each once: 2 x 112 x 176 x 512 bf16 into VMEM, 2000 int32 out of it; an
  HBM-to-HBM copy-start and a plain copy are not counted."""
  from mimicdet_jax.tools import aot
  hlo = '\n'.join([
      '  %copy-start = (bf16[2,112,176,512]{3,2,1,0:T(8,128)(2,1)S(1)}, '
      'bf16[2,112,176,512]{3,2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}) '
      'copy-start(%fusion.77)',
      '  %copy-done = bf16[2,112,176,512]{3,2,1,0:T(8,128)(2,1)S(1)} '
      'copy-done(%copy-start)',
      '  %copy-start.1 = (s32[2000]{0:T(1024)}, s32[2000]{0:T(1024)S(1)}, '
      'u32[]{:S(2)}) copy-start(%x)',
      '  %copy-start.2 = (f32[8,128]{1,0:T(8,128)}, f32[8,128]{1,0:T(8,128)}, '
      'u32[]{:S(2)}) copy-start(%y)',
      '  %copy.3 = f32[8,128]{1,0:T(8,128)S(1)} copy(%z)',
  ])
  assert aot.memory_space_copy_bytes(hlo) == 2 * 112 * 176 * 512 * 2 + 2000 * 4


_MSA_PROBE = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp
from mimicdet_jax.tools import aot
dev = aot.topology_devices('v5p:1x1x1')[0]
s = jax.sharding.SingleDeviceSharding(dev)
def f(x, w):
  for _ in range(3):
    x = jnp.tanh(x @ w)
  return x.sum()
a = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16, sharding=s)
c = aot.compile_program(aot.Program(jax.jit(jax.grad(f, argnums=1)), (a, a),
                                    1, (1, 1)))
print(json.dumps(dict(bytes=c.bytes_accessed, copies=c.memory_space_copy_bytes,
                      without=c.bytes_without_copies)))
'''


@needs_libtpu
def test_bytes_without_copies_is_the_count_with_memory_space_assignment_off():
  """What `bytes_without_copies` subtracts is what the compiler counts for
  the HBM<->VMEM copies: the same program compiled with memory-space
  assignment off (no copies) reports that many bytes."""
  import json
  runs = {}
  for name, flags in (('msa', ''), ('off', '--xla_msa_enable=false')):
    env = dict(os.environ, JAX_PLATFORMS='cpu', LIBTPU_INIT_ARGS=flags)
    out = subprocess.run([sys.executable, '-c', _MSA_PROBE, ROOT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
  assert runs['msa']['copies'] > 0 and runs['off']['copies'] == 0
  assert runs['msa']['without'] == pytest.approx(runs['off']['bytes'],
                                                 rel=0.01)
