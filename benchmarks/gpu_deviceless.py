r"""The real training step compiled for an NVIDIA H100 on this CPU-only
machine: no GPU, no CUDA driver, the XLA GPU compiler of the jax CUDA plugin
run against a GPU target config (deviceless compilation).

  python benchmarks/gpu_deviceless.py [--config configs/mimicdet_r50_fpn_1x.py]
      [--gpus 1] [--batch 2] [--canvas 896x1408|first|largest]
      [--target_config FILE.txtpb] [--hlo_out STEP.opt.txt]

Needs a Python environment with `jax-cuda12-plugin` of the same version as
jax (`pip install "jax-cuda12-plugin[with-cuda]==<jax version>"` into a venv
of its own; the plugin alone compiles too when a `ptxas` is on PATH) and the
project's requirements. docs/BENCHMARKS.md, "GPU, compiled on CPU", says how
it was run and what it gave.

How: `jax.experimental.topologies.get_topology_desc(platform='cuda',
topology='1x1x<gpus>', target_config=<GpuTargetConfigProto text>)` returns
compile-only GPU devices (openxla/xla#16913); the shard_map training step is
built over them exactly as mimicdet_jax/tools/aot.py builds it for TPU chips,
and `jit(...).lower(<ShapeDtypeStructs>).compile()` runs the GPU compiler
("Performing a deviceless compilation": no autotuning, cuDNN convolutions and
cuBLAS/Triton gemms chosen by heuristics).

What comes back, per GPU:
- `memory_analysis()`: the executable's arguments, outputs, aliased
  (donated) bytes and temporaries, exactly as XLA:GPU plans its buffers.
- `cost_analysis()`: none. The compile-only executable of the plugin answers
  "UNIMPLEMENTED: GetCostAnalysis is not supported." (jax turns it into None).
  In its place this script prints XLA's HloCostAnalysis run on this machine
  (through the CPU client) over (a) the lowered, unoptimized module: the
  flops of the program as written, and (b) the optimized GPU module: its bytes
  accessed (each fusion's and library call's operands and result) and its
  flops outside library calls; the flops of the cuDNN convolutions and cuBLAS
  gemms (custom calls, zero to HloCostAnalysis) are added from their shapes.
  A while loop's body is counted once, not once per trip, as in the TPU
  figures.
"""
import argparse
import json
import os
import re
import runpy
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # no GPU here: never init CUDA

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# XLA's xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb (an H100 SXM 80GB as the
# GPU compiler sees it), with the cuDNN and CUDA runtime versions that the
# compiler may key its choices on: those of jax-cuda12-plugin 0.10.2's
# dependencies (cuDNN 9, CUDA 12.9).
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# NVIDIA's H100 SXM data sheet: 989 dense bf16 TFLOP/s, 3.35 TB/s HBM3
# (benchmarks/common.py has the same peak).
H100_TFLOPS = 989.0
H100_HBM_GBPS = 3350.0

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_ARRAY = re.compile(r'\b(?:pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64)'
                    r'\[([0-9,]*)\]')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _dims(text):
  m = _ARRAY.search(text)
  return [int(d) for d in m.group(1).split(',') if d] if m else None


def _prod(xs):
  n = 1
  for x in xs:
    n *= x
  return n


def library_call_flops(hlo_text: str) -> dict:
  """Flops of the cuDNN convolutions and cuBLAS gemms of an optimized GPU
  module (each call counted once, like a while body), from their shapes.

  A convolution of any direction costs what its forward convolution costs:
  2 * |y| * |w| / out_features, with y the forward output and w the filter
  (forward: w = operand 1, y = result; backward input: y = operand 0, w =
  operand 1; backward filter: y = operand 1, w = result). A gemm costs
  2 * |out| * prod(lhs contracting dims)."""
  shapes = {}
  calls = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    shapes[name] = _dims(rest)
    t = _TARGET.search(rest)
    if t and ' custom-call(' in rest:
      args = rest.split(' custom-call(', 1)[1].split(')', 1)[0]
      calls.append((t.group(1), rest, re.findall(r'%([\w.\-]+)', args)))
  out = dict(conv_flops=0.0, gemm_flops=0.0, convs=0, gemms=0, other={})
  for target, rest, ops in calls:
    result = _dims(rest)
    if target.startswith('__cudnn$conv'):
      labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', rest)
      if 'BackwardInput' in target:
        y, w = shapes.get(ops[0]), shapes.get(ops[1])
      elif 'BackwardFilter' in target:
        y, w = shapes.get(ops[1]), result
      else:
        y, w = result, shapes.get(ops[1])
      if not (labels and y and w):
        raise ValueError(f'cannot read the shapes of {rest[:200]}')
      out_features = w[labels.group(2).index('o')]
      out['conv_flops'] += 2.0 * _prod(y) * _prod(w) / out_features
      out['convs'] += 1
    elif target.startswith('__cublas$'):
      dnums = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
      lhs = shapes.get(ops[0])
      k = _prod(lhs[int(d.strip('"'))] for d in dnums.group(1).split(',') if d)
      out['gemm_flops'] += 2.0 * _prod(result) * k
      out['gemms'] += 1
    else:
      out['other'][target] = out['other'].get(target, 0) + 1
  return out


def _cpu_cost(module) -> dict:
  """XLA's HloCostAnalysis of `module`, run through this machine's CPU client."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  return _jax.hlo_module_cost_analysis(jax.devices('cpu')[0].client, module)


def gpu_devices(n: int, target_config: str) -> list:
  """`n` compile-only CUDA devices of the target config's GPU."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('jax_plugins.xla_cuda12') is None:
    raise ConfigError(
        'compiling for an NVIDIA GPU needs the jax CUDA plugin: in a venv of '
        'its own, pip install "jax-cuda12-plugin[with-cuda]==<jax version>" '
        'and the requirements (docs/BENCHMARKS.md, "GPU, compiled on CPU")')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(
      platform='cuda', topology=f'1x1x{n}', target_config=target_config)
  return list(topo.devices)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/mimicdet_r50_fpn_1x.py')
  p.add_argument('--gpus', type=int, default=1)
  p.add_argument('--batch', type=int, default=2, help='images per GPU')
  p.add_argument('--canvas', default='896x1408',
                 help="HxW, 'first' or 'largest' of data.canvas_buckets")
  p.add_argument('--target_config', default='',
                 help='a GpuTargetConfigProto text file (default: H100 SXM)')
  p.add_argument('--hlo_out', default='', help='write the optimized HLO here')
  p.add_argument('--json', default='', help='write the figures here')
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.tools import plan_tpu  # pylint: disable=g-import-not-at-top

  spec = (open(args.target_config).read() if args.target_config
          else H100_SXM)
  devices = gpu_devices(args.gpus, spec)
  raw = runpy.run_path(args.config)['get_config']()
  config = aot.resolve_for(raw, 80, args.batch * args.gpus)
  canvas = plan_tpu.pick_canvas(config, args.canvas)
  kind = devices[0].device_kind
  print(f'jax {jax.__version__}; {args.gpus} x {kind} (compile-only, '
        f'{devices[0].platform}); {os.path.basename(args.config)}, '
        f'{args.batch} images per GPU, canvas {canvas[0]}x{canvas[1]}, '
        f'{config.model.dtype}', flush=True)

  program = aot.train_step_program(config, devices, canvas)
  figures = dict(jax=jax.__version__, device_kind=kind, gpus=args.gpus,
                 images_per_gpu=args.batch, canvas=canvas, config=args.config)

  def save(**kw):
    figures.update(kw)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(figures, f, indent=1, default=str)

  n = args.gpus  # the lowered module is global; the optimized one per GPU
  t0 = time.perf_counter()
  lowered = program.fn.lower(*program.args)
  t1 = time.perf_counter()
  flops_written = _cpu_cost(
      lowered.compiler_ir('hlo').as_hlo_module()).get('flops', 0.0) / n
  print(f'lowered in {t1 - t0:.0f} s; HloCostAnalysis of the unoptimized '
        f'module: {flops_written / 1e12:.3f} TFLOP per GPU and step',
        flush=True)
  save(lower_s=t1 - t0, flops_unoptimized=flops_written)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  print(f'compiled in {t2 - t1:.0f} s', flush=True)

  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes -
           mem.alias_size_in_bytes + mem.temp_size_in_bytes +
           mem.generated_code_size_in_bytes)
  gib = 2.0**30
  capacity = 84978434048  # device_memory_size of the target config
  print('memory_analysis (per GPU): '
        f'arguments {mem.argument_size_in_bytes / gib:.3f} GiB, outputs '
        f'{mem.output_size_in_bytes / gib:.3f} GiB, aliased (donated) '
        f'{mem.alias_size_in_bytes / gib:.3f} GiB, temporaries '
        f'{mem.temp_size_in_bytes / gib:.3f} GiB, generated code '
        f'{mem.generated_code_size_in_bytes / gib:.3f} GiB; total '
        f'{total / gib:.2f} GiB of {capacity / gib:.1f} GiB '
        f'({total / (0.75 * capacity):.0%} of the 75 % jax preallocates)',
        flush=True)
  save(compile_s=t2 - t1, argument_bytes=mem.argument_size_in_bytes,
       output_bytes=mem.output_size_in_bytes,
       alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
       code_bytes=mem.generated_code_size_in_bytes, total_bytes=total)
  cost = compiled.cost_analysis()
  reason = ''
  exe = compiled._executable.xla_extension_executable()  # pylint: disable=protected-access
  if cost is None:
    try:
      exe.cost_analysis()
    except Exception as e:  # pylint: disable=broad-except
      reason = str(e).splitlines()[0]
  print(f'cost_analysis: {cost!r} {reason}', flush=True)
  save(cost_analysis=cost, cost_analysis_error=reason)

  module = exe.hlo_modules()[0]
  text = module.to_string()
  if args.hlo_out:
    with open(args.hlo_out, 'w') as f:
      f.write(text)
  opt = _cpu_cost(module)
  lib = library_call_flops(text)
  flops_opt = opt.get('flops', 0.0) + lib['conv_flops'] + lib['gemm_flops']
  bytes_opt = opt.get('bytes accessed', 0.0)
  print(f'HloCostAnalysis, optimized GPU module: {bytes_opt / 1e9:.1f} GB '
        f'accessed; {opt.get("flops", 0.0) / 1e12:.3f} TFLOP outside library '
        f'calls + {lib["conv_flops"] / 1e12:.3f} in {lib["convs"]} cuDNN convs '
        f'+ {lib["gemm_flops"] / 1e12:.3f} in {lib["gemms"]} cuBLAS gemms = '
        f'{flops_opt / 1e12:.3f} TFLOP; other custom calls {lib["other"]}')
  t_flops = flops_opt / (H100_TFLOPS * 1e12)
  t_bytes = bytes_opt / (H100_HBM_GBPS * 1e9)
  step = max(t_flops, t_bytes)
  print(f'per image: {flops_opt / args.batch / 1e12:.3f} TFLOP, '
        f'{bytes_opt / args.batch / 1e9:.1f} GB; roofline at H100 SXM peaks '
        f'({H100_TFLOPS:g} TFLOP/s, {H100_HBM_GBPS:g} GB/s): compute '
        f'{t_flops * 1e3:.1f} ms, memory {t_bytes * 1e3:.1f} ms -> '
        f'<= {args.batch / step:.0f} images/s per GPU (an upper bound)')
  save(flops_optimized=flops_opt, flops_outside_library=opt.get('flops', 0.0),
       bytes_accessed=bytes_opt, library=lib)

if __name__ == '__main__':
  main()
