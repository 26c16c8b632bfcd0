r"""Inference latency and throughput of MimicDet, post-processing included.

  JAX_PLATFORMS=cpu python benchmarks/inference.py --config configs/demo.py
  python benchmarks/inference.py --config configs/mimicdet_r50_fpn_1x.py \
      --size 896x1408 --dtype bf16 --batch 1,8 --head s,t --reps 20  # GPU

Times `postprocess.make_predict_fn(model, config)`, the function eval.py and
predict.py run: backbone, pyramid, refinement, S-head (and for `--head t`
the T-head on RoIAlign of the same boxes), then top-k, box decoding, score
threshold, per-class NMS and top-100, on random images already on the
device. Per (head, batch): the first call (trace + compile + run), then
`--reps` calls after `--warmup`, each ended by block_until_ready; latency =
median call, throughput = batch / median. `--forward_only` adds rows for the
dense forward pass alone (model.apply), so the post-processing share shows.

Random weights give near-uniform class scores, so every (box, class) pair
passes the default score threshold (0.005) and NMS sees its worst case
(1000 boxes x K classes); a trained model passes far fewer. Use
`--config.eval.score_threshold=0.05` to see the other end.
"""
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common as bench
from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.models import mimicdet
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
_BATCH = flags.DEFINE_list('batch', ['1', '8'], 'Batch sizes to time.')
_HEAD = flags.DEFINE_list('head', ['s', 't'], 'eval.head values: s, t, both.')
_DTYPE = flags.DEFINE_enum(
    'dtype', None, sorted(bench.DTYPES), "Compute dtype (default: the config's).")
_SIZE = flags.DEFINE_string(
    'size', None, "Canvas HxW (default: the config's first canvas bucket).")
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per row.')
_WARMUP = flags.DEFINE_integer(
    'warmup', 1, 'Untimed calls per row, the compiling one included.')
_FORWARD_ONLY = flags.DEFINE_bool(
    'forward_only', False, 'Also time model.apply alone (no post-processing).')
_INIT = flags.DEFINE_enum('init', 'auto', list(bench.INITS),
                          'Variables (see benchmarks/common.py).')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', -1, 'Foreground classes (-1: as benchmarks/train_step.py).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')
flags.mark_flags_as_required(['config'])


def benchmark(raw_config, *, batches, heads, size=None, dtype=None, reps=5,
              warmup=1, forward_only=False, init='auto',
              num_classes=-1) -> dict:
  """Times predict (and optionally the forward alone) per head and batch."""
  rows = []
  variables = None
  for head in heads:
    c = raw_config.copy_and_resolve_references()
    c.eval.head = head
    config = bench.resolve_config(c, size=size, dtype=dtype,
                                  num_classes=num_classes)
    model = mimicdet.MimicDet(config)
    if variables is None:  # the same tree for every head
      variables = jax.device_put(bench.init_variables(config, model, init))
    predict = postprocess.make_predict_fn(model, config)
    h, w = bench.canvas_of(config)
    for b in batches:
      images = jax.device_put(np.random.default_rng(b).standard_normal(
          (b, h, w, 3), np.float32))
      image_size = jnp.asarray(np.tile([[h, w]], (b, 1)), jnp.int32)
      timing, dets = bench.time_calls(predict, (variables, images, image_size),
                                reps=reps, warmup=warmup)
      rows.append(dict(
          what=f'predict head={head}', head=head, batch=b, **timing,
          images_per_s=b / timing['median_s'],
          detections_per_image=float(np.mean(np.sum(
              np.asarray(dets['valid']), axis=-1)))))
      print(_row_text(rows[-1]), flush=True)
  if forward_only:
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    for b in batches:
      images = jax.device_put(np.random.default_rng(b).standard_normal(
          (b, h, w, 3), np.float32))
      timing, _ = bench.time_calls(forward, (variables, images), reps=reps,
                             warmup=warmup)
      rows.append(dict(what='forward only (model.apply)', head='-', batch=b,
                       **timing, images_per_s=b / timing['median_s'],
                       detections_per_image=None))
      print(_row_text(rows[-1]), flush=True)
  return dict(
      benchmark='inference',
      arch=config.model.backbone.arch,
      canvas=[h, w],
      dtype=config.model.dtype,
      num_classes=int(config.model.num_classes),
      pre_nms_topk=int(config.eval.pre_nms_topk),
      score_threshold=float(config.eval.score_threshold),
      rows=rows,
      peak_memory=bench.peak_memory(),
      device=bench.device_summary())


def _row_text(r: dict) -> str:
  dets = ('' if r['detections_per_image'] is None else
          f"  {r['detections_per_image']:.0f} dets/img")
  return (f"{r['what']:28s} batch {r['batch']:2d}  first {r['first_call_s']:6.1f} s"
          f"  median {r['median_s'] * 1e3:8.1f} ms  "
          f"{r['images_per_s']:7.2f} img/s  recompiles "
          f"{r['recompiles_in_timed_calls']}{dets}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  result = benchmark(
      _CONFIG.value, batches=[int(b) for b in _BATCH.value], heads=_HEAD.value,
      size=_SIZE.value, dtype=_DTYPE.value, reps=_REPS.value,
      warmup=_WARMUP.value, forward_only=_FORWARD_ONLY.value, init=_INIT.value,
      num_classes=_NUM_CLASSES.value)
  result['command'] = ' '.join(sys.argv)
  print(f"inference  {result['arch']}  canvas {result['canvas'][0]}x"
        f"{result['canvas'][1]}  {result['dtype']}  on "
        f"{result['device']['device_kind']}  peak memory "
        f"{bench.fmt_bytes(result['peak_memory']['bytes'])} "
        f"({result['peak_memory']['kind']})", flush=True)
  bench.write_json(_JSON.value, result)


if __name__ == '__main__':
  config_lib.check_override_keys(sys.argv)
  app.run(main)
