r"""Training-step throughput of MimicDet on synthetic in-memory batches.

  JAX_PLATFORMS=cpu python benchmarks/train_step.py --config configs/demo.py \
      --batch 8 --steps 3
  python benchmarks/train_step.py --config configs/mimicdet_r50_fpn_1x.py \
      --batch 2 --dtype bf16 --size 896x1408 --json out/r50_b2.json  # GPU

Builds exactly the step `train.py` runs (training.state.create_train_state, training.step.make_train_step, training.parallel.pmap_train_step over every local
device, losses.total.make_loss_fn) and feeds it random images with a few
random gt boxes each, already on the devices, so that the input pipeline is
not measured. Variables: `--init` (see benchmarks/common.py; NumPy-filled
on CPU, where compiling the jitted initialisers takes minutes). Reports:

  * first step: wall time of the first call (trace + XLA compile + one step)
    and the XLA backend-compile seconds inside it;
  * steady state: `--steps` calls after `--warmup` calls (the first
    included), timed as one window ending in block_until_ready; training
    images/s = global batch x steps / window;
  * recompiles: XLA compilations during the timed window (must be 0);
  * page faults: the process's minor page faults per step in the timed
    window (getrusage): XLA:CPU allocates the step's temporaries afresh
    each call, and every 4 KiB page of fresh memory faults once (see
    GLIBC_TUNABLES in docs/BENCHMARKS.md, "Memory allocation on CPU");
  * model FLOPs: convolutions and matrix products of the step's jaxpr
    (forward and backward, per device; benchmarks/common.matmul_flops), per
    image, and MFU = those FLOPs / step time / peak, against
    `--peak_tflops` (defaults: H100/H200 989 bf16 / 494 f32 (TF32), A100 312 /
    156; none on CPU, so MFU is n/a there unless given);
  * memory: the device allocator's peak (device.memory_stats()) where JAX has
    it; on CPU the process's max RSS instead (says so), plus XLA's static
    memory analysis of the step (arguments, outputs, temporaries).

`--size HxW` sets the canvas (divisible by data.size_divisor, 128), `--batch`
is the per-device batch; `--config.key=value` overrides any config key.
"""
import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common as bench
from benchmarks import step as step_lib
from mimicdet_jax import config_lib
from mimicdet_jax.training import parallel as parallel_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
_BATCH = flags.DEFINE_integer(
    'batch', 0, 'Per-device batch; 0 = train.batch_size / local devices.')
_DTYPE = flags.DEFINE_enum(
    'dtype', None, sorted(bench.DTYPES), 'Compute dtype (default: the '
    "config's model.dtype).")
_SIZE = flags.DEFINE_string(
    'size', None, "Canvas HxW, e.g. 512x512 (default: the config's first "
    'canvas bucket).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer(
    'warmup', 2, 'Untimed steps before the window, the compiling one included.')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', 0.0, 'Per-device peak TFLOP/s for MFU (0 = by device kind; '
    'none known for CPU).')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', -1, 'Foreground classes (-1: the config, its annotation '
    'file when present and small, else 80).')
_BOXES = flags.DEFINE_integer('boxes_per_image', 5, 'Random gt boxes per image.')
_INIT = flags.DEFINE_enum(
    'init', 'auto', list(bench.INITS), 'Variables: model (real initialisers), '
    'numpy (same shapes, NumPy-filled: no init compile), auto (numpy on CPU).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')
flags.mark_flags_as_required(['config'])


def benchmark(config, per_device_batch: int, *, steps: int, warmup: int,
              peak_tflops: float = 0.0, boxes_per_image: int = 5,
              init: str = 'auto') -> dict:
  """Runs the step and returns the measurements (see the module docstring)."""
  counter = bench.CompileCounter()
  ndev = jax.local_device_count()
  global_batch = ndev * per_device_batch

  t0 = time.perf_counter()
  p_step, rstate, batch, flops = step_lib.build_step(config, per_device_batch,
                                     boxes_per_image=boxes_per_image,
                                     init=init)
  build_s = time.perf_counter() - t0

  counter.start()
  t0 = time.perf_counter()
  rstate, metrics = p_step(rstate, batch)
  jax.block_until_ready((rstate, metrics))
  first_step_s = time.perf_counter() - t0
  counter.stop()
  first_compiles, first_compile_s = counter.count, counter.seconds

  # The executable the calls above use (same shapes: a compilation cache
  # hit), for XLA's memory analysis and its own FLOP count (which on GPU
  # misses the convolutions that became cuDNN calls).
  compiled = p_step.lower(rstate, batch).compile()
  compiled_cost = bench.cost_analysis(compiled)
  static_memory = bench.memory_analysis(compiled)

  for _ in range(max(warmup - 1, 0)):
    rstate, metrics = p_step(rstate, batch)
  jax.block_until_ready((rstate, metrics))

  counter.start()
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t0 = time.perf_counter()
  for _ in range(steps):
    rstate, metrics = p_step(rstate, batch)
  jax.block_until_ready((rstate, metrics))
  window_s = time.perf_counter() - t0
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
  counter.stop()

  last = parallel_lib.DataParallel(config.train.parallelism,
                                jax.local_devices()).host(metrics)
  step_s = window_s / max(steps, 1)
  dtype = config.model.dtype
  peak = peak_tflops or bench.default_peak_tflops(dtype)
  mfu = flops / step_s / (peak * 1e12) if peak else None
  return dict(
      benchmark='train_step',
      arch=config.model.backbone.arch,
      canvas=list(bench.canvas_of(config)),
      dtype=dtype,
      num_classes=int(config.model.num_classes),
      per_device_batch=per_device_batch,
      global_batch=global_batch,
      steps=steps,
      warmup=warmup,
      build_s=build_s,
      first_step_s=first_step_s,
      first_step_backend_compile_s=first_compile_s,
      first_step_compiles=first_compiles,
      step_s=step_s,
      images_per_s=global_batch / step_s,
      recompiles_in_window=counter.count,
      minor_page_faults_per_step=faults / max(steps, 1),
      step_flops_per_device=flops,
      step_flops_per_image=flops / per_device_batch,
      compiled_flops_per_image=(
          compiled_cost['flops'] / per_device_batch
          if compiled_cost['flops'] is not None else None),
      peak_tflops=peak,
      mfu=mfu,
      peak_memory=bench.peak_memory(),
      xla_memory_analysis=static_memory,
      last_loss=float(last['loss']),
      last_step_finite=bool(last['finite'] > 0),
      device=bench.device_summary())


def report(r: dict) -> str:
  flops = r['step_flops_per_image']
  cflops = r['compiled_flops_per_image']
  lines = [
      f"train_step  {r['arch']}  canvas {r['canvas'][0]}x{r['canvas'][1]}  "
      f"{r['dtype']}  batch {r['per_device_batch']}/device x "
      f"{r['device']['local_devices']} {r['device']['device_kind']}",
      f"  first step (trace+compile+run) {r['first_step_s']:.1f} s "
      f"(XLA backend compile {r['first_step_backend_compile_s']:.1f} s)",
      f"  steady state  {r['step_s'] * 1e3:.0f} ms/step  "
      f"{r['images_per_s']:.2f} images/s  ({r['steps']} steps after "
      f"{r['warmup']} warm-up)",
      f"  recompiles in the timed window: {r['recompiles_in_window']}",
      f"  minor page faults per step: {r['minor_page_faults_per_step']:.0f}",
      f'  model FLOPs/image (convs + matmuls, fwd + bwd): {flops / 1e9:.1f} '
      'GFLOP' + (f' (XLA compiled cost analysis: {cflops / 1e9:.1f})'
                 if cflops else ''),
      '  MFU: ' + (f"{100 * r['mfu']:.1f} % of {r['peak_tflops']:g} TFLOP/s"
                   if r['mfu'] is not None else
                   'n/a (no peak for this device; pass --peak_tflops)'),
      f"  peak memory: {bench.fmt_bytes(r['peak_memory']['bytes'])} "
      f"({r['peak_memory']['kind']})",
  ]
  m = r['xla_memory_analysis']
  if m:
    lines.append(
        '  XLA memory analysis/device: arguments '
        f"{bench.fmt_bytes(m.get('argument_size_in_bytes'))}, temporaries "
        f"{bench.fmt_bytes(m.get('temp_size_in_bytes'))}")
  lines.append(f"  last loss {r['last_loss']:.4f} "
               f"({'finite' if r['last_step_finite'] else 'NOT finite'})")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, per_device = step_lib.step_config(
      _CONFIG.value, batch=_BATCH.value, size=_SIZE.value, dtype=_DTYPE.value,
      num_classes=_NUM_CLASSES.value)
  result = benchmark(config, per_device, steps=_STEPS.value,
                     warmup=_WARMUP.value, peak_tflops=_PEAK_TFLOPS.value,
                     boxes_per_image=_BOXES.value, init=_INIT.value)
  result['command'] = ' '.join(sys.argv)
  print(report(result), flush=True)
  bench.write_json(_JSON.value, result)


if __name__ == '__main__':
  config_lib.check_override_keys(sys.argv)
  app.run(main)
