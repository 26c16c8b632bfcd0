r"""Plans a TPU run before booking the slice: compiles the real training step
and the exported detector for a TPU topology on this (CPU) machine.

  python -m mimicdet_jax.tools.plan_tpu --config configs/mimicdet_r50_fpn_1x.py \
      --topology v5e:4x4 [--batch 2] [--canvas 896x1408] [--config.key=value ...]

Needs libtpu (`make tpu-plan-deps`). Prints, per chip: the HBM of the
executable by part and whether it fits (with the headroom), the largest
per-chip batch that fits, flops and bytes per image, the roofline bound at
the generation's published peaks and the compiler's own estimate where it
gives one, images/s per chip and for the slice, the wall-clock of the
recipe's schedule on that slice, and the compile times. These are compiler
figures, not measured step times (docs/BENCHMARKS.md, "TPU, compiled on
CPU").
"""
import dataclasses
import math
import os
import sys
from typing import Optional

from absl import app
from absl import flags
from ml_collections import config_flags

from mimicdet_jax import config_lib
from mimicdet_jax.errors import ConfigError
from mimicdet_jax.tools import aot
from mimicdet_jax.tools import floor as floor_lib


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published peaks of one chip (one JAX device) of a generation: bf16
  dense TFLOP/s, HBM GiB and HBM GB/s."""
  tflops: float
  hbm_gib: float
  hbm_gbps: float
  source: str


# Google Cloud's TPU system-architecture pages (retrieved 2026-12), per
# chip: v4 275 TFLOP/s, 32 GiB, 1228 GB/s; v5e 197, 16, 819; v5p 459, 95,
# 2765; v6e 918, 32, 1640. A v4 chip's two TensorCores are one device
# (megacore, as on Cloud TPU VMs: aot.topology_devices).
CHIPS = {
    'v4': Chip(275.0, 32.0, 1228.0, 'https://cloud.google.com/tpu/docs/v4'),
    'v5e': Chip(197.0, 16.0, 819.0, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip(459.0, 95.0, 2765.0, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip(918.0, 32.0, 1640.0, 'https://cloud.google.com/tpu/docs/v6e'),
}

def generation(topology: str) -> str:
  """'v5e:4x4' -> 'v5e'; a ConfigError for one without published peaks."""
  gen = topology.split(':', 1)[0].lower()
  if gen not in CHIPS:
    raise ConfigError(f'--topology {topology!r}: unknown TPU generation '
                      f'{gen!r}; expected one of {tuple(CHIPS)}')
  return gen


def pick_canvas(config, spec: str) -> tuple[int, int]:
  """The canvas to compile: 'largest', 'first' or 'HxW'. Under
  data.augment=lsj training has one canvas, lsj_size x lsj_size."""
  if config.data.augment == 'lsj' and spec in ('largest', 'first'):
    return int(config.data.lsj_size), int(config.data.lsj_size)
  buckets = [tuple(int(v) for v in b) for b in config.data.canvas_buckets]
  if spec == 'largest':
    return max(buckets, key=lambda b: b[0] * b[1])
  if spec == 'first':
    return buckets[0]
  try:
    h, w = (int(v) for v in spec.lower().split('x'))
  except ValueError:
    raise ConfigError(f"--canvas {spec!r}: expected HxW, 'largest' or "
                      "'first'") from None
  if h % config.data.size_divisor or w % config.data.size_divisor:
    raise ConfigError(f'--canvas {spec}: not divisible by '
                      f'data.size_divisor={config.data.size_divisor}')
  return h, w


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
  """The lower bound on a step: compute or HBM traffic, whichever is longer."""
  return max(flops / (chip.tflops * 1e12), bytes_accessed / (chip.hbm_gbps * 1e9))


def max_fitting_batch(b1: int, hbm1: int, b2: int, hbm2: int,
                      capacity: float) -> int:
  """The largest batch b with hbm(b) <= capacity, hbm linear through the two
  compiled points (0 if even the intercept does not fit)."""
  slope = (hbm2 - hbm1) / (b2 - b1)
  if slope <= 0:
    return b2 if hbm2 <= capacity else 0
  return max(0, int(math.floor(b1 + (capacity - hbm1) / slope)))


def _gb(n: float) -> str:
  return f'{n / 1e9:.2f} GB'


def plan(raw, topology: str, per_chip: int, canvas_spec: str,
         num_classes: int = 80, find_max: bool = True,
         detector: bool = True, out=sys.stdout) -> dict:
  """Compiles and prints the plan; returns its figures (tests read them)."""
  chip = CHIPS[generation(topology)]
  devices = aot.topology_devices(topology)
  n = len(devices)
  if per_chip <= 0:
    if raw.train.batch_size % n:
      raise ConfigError(f'train.batch_size={raw.train.batch_size} does not '
                        f'divide over the {n} chips of {topology}; pass '
                        '--batch (images per chip)')
    per_chip = raw.train.batch_size // n
  config = aot.resolve_for(raw, num_classes, per_chip * n)
  canvas = pick_canvas(config, canvas_spec)
  capacity = chip.hbm_gib * 2**30
  p = lambda *a: print(*a, file=out, flush=True)
  p(f'{topology}: {n} chips, each {chip.hbm_gib:g} GiB HBM, {chip.tflops:g} '
    f'bf16 TFLOP/s, {chip.hbm_gbps:g} GB/s ({chip.source}); figures below '
    'are per chip')
  p(f'train step: {per_chip} images per chip ({per_chip * n} per step), '
    f'canvas {canvas[0]}x{canvas[1]}, {config.model.backbone.arch}, '
    f'{config.model.dtype}; compiling (compiler figures, not measured)...')
  program = aot.train_step_program(config, devices, canvas)
  step = aot.compile_program(program)
  result = dict(topology=topology, chips=n, images_per_chip=per_chip,
                canvas=canvas, step=step, capacity=capacity)
  _print_memory(p, step, capacity)
  seconds = roofline_seconds(step.flops, step.bytes_accessed, chip)
  per_image = dict(flops=step.flops / per_chip,
                   bytes=step.bytes_accessed / per_chip)
  images_per_s = per_chip / seconds
  result.update(roofline_seconds=seconds, images_per_second=images_per_s,
                per_image=per_image)
  bound = ('memory' if step.bytes_accessed / (chip.hbm_gbps * 1e9) >
           step.flops / (chip.tflops * 1e12) else 'compute')
  p(f'  per image: {per_image["flops"] / 1e12:.3f} TFLOP, '
    f'{_gb(per_image["bytes"])} accessed (arithmetic intensity '
    f'{step.flops / max(step.bytes_accessed, 1):.0f} flop/byte)')
  # The cost analysis also counts the HBM <-> VMEM copies of memory-space
  # assignment (aot.Compiled.bytes_without_copies).
  hbm_seconds = roofline_seconds(step.flops, step.bytes_without_copies, chip)
  result.update(bytes_without_copies=step.bytes_without_copies / per_chip,
                images_per_second_without_copies=per_chip / hbm_seconds)
  p(f'  of which HBM<->VMEM copies: '
    f'{_gb(aot.COPY_COUNT * step.memory_space_copy_bytes / per_chip)} per '
    f'image; without them {_gb(step.bytes_without_copies / per_chip)} (an '
    f'upper bound on HBM traffic): roofline '
    f'{per_chip / hbm_seconds:.0f} images/s per chip')
  # What any compiler must move, one kernel per conv or matmul (tools/floor.py).
  floor_bytes = floor_lib.program_floor(program.fn, program.args)['total']
  result['floor_bytes'] = floor_bytes / per_chip
  p(f'  floor: {_gb(floor_bytes / per_chip)} per image (each conv and matmul '
    f'reading its operands and writing its result once, all else fused); '
    f'the count is {step.bytes_accessed / floor_bytes:.1f}x it, '
    f'{step.bytes_without_copies / floor_bytes:.1f}x without the copies')
  estimate = (f'{step.optimal_seconds * 1e3:.1f} ms' if step.optimal_seconds > 0
              else 'none given')
  p(f'  step: roofline {seconds * 1e3:.1f} ms ({bound}-bound); compiler '
    f'estimate {estimate}')
  p(f'  images/s: {images_per_s:.0f} per chip, '
    f'{images_per_s * n:.0f} for the slice (roofline: an upper bound)')
  steps = config.train.total_steps * raw.train.batch_size / (per_chip * n)
  hours = steps * seconds / 3600
  p(f'  schedule: {config.train.total_steps} steps at batch '
    f'{raw.train.batch_size} = {steps:.0f} steps at {per_chip * n}: '
    f'>= {hours:.1f} h on this slice at the roofline')
  p(f'  compile: {step.compile_seconds:.0f} s')
  if find_max:
    b2 = per_chip * 2 if per_chip > 1 else 2
    if b2 == per_chip:
      b2 += 1
    config2 = aot.resolve_for(raw, num_classes, b2 * n)
    step2 = aot.compile_program(
        aot.train_step_program(config2, devices, canvas))
    best = max_fitting_batch(per_chip, step.hbm_bytes, b2, step2.hbm_bytes,
                             capacity)
    result['max_batch'] = best
    p(f'  largest batch that fits: ~{best} images per chip (linear through '
      f'the compiles at {per_chip} and {b2}: {_gb(step.hbm_bytes)}, '
      f'{_gb(step2.hbm_bytes)}; compile {step2.compile_seconds:.0f} s)')
  report_fit(step, chip, out)
  if detector:
    det = aot.compile_program(aot.detector_program(
        config, devices[0], canvas, config.eval.batch_size))
    result['detector'] = det
    det_s = roofline_seconds(det.flops, det.bytes_accessed, chip)
    p(f'exported detector: {config.eval.batch_size} images on one chip, '
      f'canvas {canvas[0]}x{canvas[1]}')
    _print_memory(p, det, capacity)
    p(f'  per image: {det.flops / config.eval.batch_size / 1e12:.3f} TFLOP, '
      f'{_gb(det.bytes_accessed / config.eval.batch_size)}; roofline '
      f'{config.eval.batch_size / det_s:.0f} images/s per chip; compile '
      f'{det.compile_seconds:.0f} s')
  return result


def report_fit(step: aot.Compiled, chip: Chip, out=sys.stdout) -> bool:
  """Prints by how much a step does not fit a chip, and what to change."""
  capacity = chip.hbm_gib * 2**30
  if step.hbm_bytes <= capacity:
    return True
  print(f'DOES NOT FIT: {_gb(step.hbm_bytes - capacity)} over the '
        f'{chip.hbm_gib:g} GiB of a chip; lower --batch, or set '
        '--config.model.dtype=bfloat16 or --config.model.backbone.remat=true',
        file=out, flush=True)
  return False


def _print_memory(p, c: aot.Compiled, capacity: float) -> None:
  fits = c.hbm_bytes <= capacity
  p(f'  HBM per chip: {_gb(c.hbm_bytes)} = arguments '
    f'{_gb(c.argument_bytes)} + outputs {_gb(c.output_bytes)} - aliased '
    f'{_gb(c.alias_bytes)} + temporaries {_gb(c.temp_bytes)} + code '
    f'{_gb(c.code_bytes)}: {"fits" if fits else "DOES NOT FIT"}, headroom '
    f'{_gb(capacity - c.hbm_bytes)} of {_gb(capacity)}')


def main(argv) -> Optional[int]:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  f = flags.FLAGS
  result = plan(f.config, f.topology, f.batch, f.canvas, f.num_classes,
                f.max_batch, f.detector)
  return 0 if result['step'].hbm_bytes <= result['capacity'] else 1


def define_flags() -> None:
  """The command line's flags; defined when run as a program only, so that
  importing this module (tests, other entry points) defines no absl flag."""
  config_flags.DEFINE_config_file(
      'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string(
      'topology', 'v5p:2x2x1', "TPU topology, e.g. 'v4:2x2x1', 'v5e:4x4', "
      "'v5p:2x2x1', 'v6e:2x2'.")
  flags.DEFINE_integer(
      'batch', 0, 'Images per chip (0: train.batch_size over the chips).')
  flags.DEFINE_string(
      'canvas', 'largest', "HxW, or 'largest' (the bucket that sets the "
      "memory), or 'first' (the landscape COCO bucket); under "
      "data.augment=lsj both mean the one LSJ canvas.")
  flags.DEFINE_integer(
      'num_classes', 80, 'Foreground classes when data.num_classes is -1.')
  flags.DEFINE_bool(
      'max_batch', True, 'Also compile at a second batch to find the largest '
      'per-chip batch that fits (linear in the batch).')
  flags.DEFINE_bool(
      'detector', True, 'Also compile the exported detector at eval.batch_size.')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  config_lib.run_absl(main)
