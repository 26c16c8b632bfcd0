"""The shard_map training step of configs/mimicdet_r50_fpn_1x.py lowers for
TPU and GPU (cuda) on this CPU-only machine.

Abstract shapes only (jax.eval_shape of model.init and of the optimiser
state): no weight is materialised and nothing is compiled, so the test
catches an op without a TPU or GPU lowering, a sharding the partitioner
rejects, or a collective outside the mesh, at the recipe's real canvas
(896 x 1408, ResNet-50, bfloat16, batch 16 over the 8 test devices), in
about 15 s of tracing and lowering.
"""
import jax

from configs import mimicdet_r50_fpn_1x
from mimicdet_jax.tools import aot


def test_r50_shard_map_step_lowers_for_tpu_and_cuda():
  config = aot.resolve_for(mimicdet_r50_fpn_1x.get_config(), 80, 16)
  canvas = tuple(config.data.canvas_buckets[0])
  # The step train.py runs, with abstract state and batch (tools/aot.py).
  program = aot.train_step_program(config, jax.devices(), canvas)

  assert config.model.dtype == 'bfloat16' and canvas == (896, 1408)
  assert len(jax.devices()) == 8 and config.train.batch_size == 16
  lowered = program.fn.trace(*program.args).lower(
      lowering_platforms=('tpu', 'cuda'))
  text = lowered.as_text()
  assert 'mhlo.num_partitions = 8' in text
  assert '_platform_index' in text  # one module, a branch per platform
  assert 'all_reduce' in text  # the gradient pmean over 'data'
  assert 'bf16' in text
