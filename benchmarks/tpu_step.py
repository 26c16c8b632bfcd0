r"""Compiles the real train step for a TPU topology and saves what the
compiler says: the figures (JSON) and the optimized HLO (for
`benchmarks/hlo_bytes.py`). Compiler figures, not measured times.

  python benchmarks/tpu_step.py configs.mimicdet_r50_fpn_1x v5p:2x2x1 2 OUT \
      [train.loss_per_image=false s_head.deformable=false ...]

Writes OUT.json (lower/compile seconds, per-chip memory_analysis and
cost_analysis), OUT.pre.txt (lowered StableHLO) and OUT.opt.txt (optimized
TPU HLO). The before/after and ablation rows of docs/BENCHMARKS.md, "TPU,
compiled on CPU", were made with it (needs libtpu: make tpu-plan-deps).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from mimicdet_jax.tools import aot  # pylint: disable=g-import-not-at-top
from mimicdet_jax.tools import plan_tpu  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_parts  # pylint: disable=g-import-not-at-top


def main(argv):
  config_module, topology, per_chip, out = argv[1], argv[2], int(argv[3]), argv[4]
  devices = aot.topology_devices(topology)
  raw, num_classes = tpu_parts.load_config(config_module, argv[5:])
  config = aot.resolve_for(raw, num_classes, per_chip * len(devices))
  canvas = plan_tpu.pick_canvas(config, 'first')  # lsj: its one canvas
  program = aot.train_step_program(config, devices, canvas)
  start = time.time()
  lowered = program.fn.lower(*program.args)
  lower_s = time.time() - start
  with open(out + '.pre.txt', 'w') as f:
    f.write(lowered.as_text())
  start = time.time()
  compiled = lowered.compile()
  compile_s = time.time() - start
  with open(out + '.opt.txt', 'w') as f:
    f.write(compiled.as_text())
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  result = dict(
      lower_s=lower_s, compile_s=compile_s, canvas=canvas, per_chip=per_chip,
      topology=topology, overrides=argv[5:],
      arg=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
      alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
      code=memory.generated_code_size_in_bytes, flops=cost.get('flops'),
      bytes=cost.get('bytes accessed'), optimal=cost.get('optimal_seconds'))
  with open(out + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == '__main__':
  main(sys.argv)
