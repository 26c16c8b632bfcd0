r"""The exported detector (serving/) against the in-repo jitted predictor.

  JAX_PLATFORMS=cpu python benchmarks/serving.py --config configs/demo.py
  python benchmarks/serving.py --config configs/demo.py --workdir workdirs/demo

On the same config, weights and images (random uint8 canvases, whole canvas
valid), times
- in-repo: `postprocess.make_predict_fn(model, config)` (what eval.py
  runs) on host float32 canvases normalised as the eval pipeline does;
- artifact: `Detector.detect_canvas` of the exported artifact (deserialised
  from the file serving/export.py wrote) on the same pixels as uint8;
- artifact end to end: `Detector(...)` on decoded images of another size
  (resize, pad, the artifact, original pixels), for the host share;
each at batch 1 (latency) and batch 8 (throughput), from host arrays to
host results. Also: export time, artifact size, load time and the first
call (compile + run) of each. Without --workdir the weights are random
(benchmarks/common.init_variables), which makes NMS see its worst case.
"""
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common as bench
from mimicdet_jax import config_lib
from mimicdet_jax.evaluation import postprocess
from mimicdet_jax.evaluation import restore
from mimicdet_jax.models import mimicdet
from mimicdet_jax.serving import detector as detector_lib
from mimicdet_jax.serving import export
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Export this training WORKDIR\'s latest checkpoint '
    '(default: random weights at the config\'s shapes).')
_BATCH = flags.DEFINE_list('batch', ['1', '8'], 'Batch sizes to time.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per row.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls, the first included.')
_PLATFORMS = flags.DEFINE_string('platforms', 'cpu,cuda,tpu',
                                 'Platforms the artifact is lowered for.')
_OUT = flags.DEFINE_string('out', None, 'Export directory (default: a temp dir).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')
flags.mark_flags_as_required(['config'])


def _setup(raw_config, workdir):
  """(resolved config, variables, categories, step)."""
  if workdir:
    config = restore.load_config(workdir, raw_config)
    variables, step = restore.restore_variables(workdir)
    categories, _ = restore.training_categories(config, workdir)
    return config, variables, categories, step
  config = bench.resolve_config(raw_config)
  variables = bench.init_variables(config, mimicdet.MimicDet(config))
  categories = [dict(id=k + 1, name=f'class {k + 1}')
                for k in range(config.model.num_classes)]
  return config, variables, categories, None


def _row(what, batch, timing):
  return dict(what=what, batch=batch, **timing,
              images_per_s=batch / timing['median_s'])


def benchmark(raw_config, *, workdir=None, batches=(1, 8), reps=5, warmup=1,
              platforms=('cpu', 'cuda', 'tpu'), out_dir=None) -> dict:
  config, variables, categories, step = _setup(raw_config, workdir)
  out_dir = out_dir or tempfile.mkdtemp(prefix='mimicdet_export_')
  t0 = time.perf_counter()
  signature = export.export_detector(config, variables, categories, out_dir,
                                     step=step, platforms=platforms,
                                     max_batch=max(batches))
  export_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  detector = detector_lib.Detector.load(out_dir)
  load_s = time.perf_counter() - t0

  s_config = export.s_head_config(config)
  predict = postprocess.make_predict_fn(mimicdet.MimicDet(s_config), s_config)
  device_variables = jax.device_put(variables)
  mean = np.asarray(config.data.pixel_mean, np.float32)
  inv_std = np.float32(1) / np.asarray(config.data.pixel_std, np.float32)
  h, w = bench.canvas_of(config)
  rows = []
  for b in batches:
    rng = np.random.default_rng(b)
    pixels = rng.integers(0, 256, (b, h, w, 3), np.uint8)
    sizes = np.tile(np.array([[h, w]], np.int32), (b, 1))
    normalised = (pixels.astype(np.float32) - mean) * inv_std

    def in_repo(x, s):
      return jax.tree.map(np.asarray, predict(device_variables, x, s))

    timing, _ = bench.time_calls(in_repo, (normalised, sizes), reps=reps,
                                 warmup=warmup)
    rows.append(_row('in-repo jitted predictor', b, timing))
    print(_text(rows[-1]), flush=True)
    timing, _ = bench.time_calls(detector.detect_canvas, (pixels, sizes),
                                 reps=reps, warmup=warmup)
    rows.append(_row('exported artifact', b, timing))
    print(_text(rows[-1]), flush=True)
    # Decoded images of another size: the host resize and padding count.
    images = list(rng.integers(0, 256, (b, h * 3 // 4, w * 5 // 4, 3),
                               np.uint8))
    timing, _ = bench.time_calls(detector, (images,), reps=reps,
                                 warmup=warmup)
    rows.append(_row('exported, end to end (resize)', b, timing))
    print(_text(rows[-1]), flush=True)
  artifact_bytes = sum(a['bytes'] for a in signature['artifacts'])
  return dict(
      benchmark='serving', arch=config.model.backbone.arch, canvas=[h, w],
      dtype=config.model.dtype, num_classes=int(config.model.num_classes),
      platforms=list(platforms), export_s=export_s,
      artifact_bytes=artifact_bytes, load_s=load_s,
      param_bytes=int(sum(np.asarray(x).nbytes
                          for x in jax.tree.leaves(variables))),
      rows=rows, device=bench.device_summary(), out_dir=out_dir)


def _text(r: dict) -> str:
  return (f"{r['what']:32s} batch {r['batch']:2d}  first {r['first_call_s']:6.2f} s"
          f"  median {r['median_s'] * 1e3:8.1f} ms  {r['images_per_s']:7.2f} "
          f"img/s  recompiles {r['recompiles_in_timed_calls']}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  result = benchmark(
      _CONFIG.value, workdir=_WORKDIR.value,
      batches=[int(b) for b in _BATCH.value], reps=_REPS.value,
      warmup=_WARMUP.value,
      platforms=tuple(p for p in _PLATFORMS.value.split(',') if p),
      out_dir=_OUT.value)
  result['command'] = ' '.join(sys.argv)
  print(f"serving  {result['arch']}  canvas {result['canvas'][0]}x"
        f"{result['canvas'][1]}  {result['dtype']}  on "
        f"{result['device']['device_kind']}: export {result['export_s']:.1f} s, "
        f"artifact {bench.fmt_bytes(result['artifact_bytes'])} "
        f"({','.join(result['platforms'])}; weights "
        f"{bench.fmt_bytes(result['param_bytes'])}), load "
        f"{result['load_s'] * 1e3:.0f} ms", flush=True)
  bench.write_json(_JSON.value, result)


if __name__ == '__main__':
  config_lib.check_override_keys(sys.argv)
  app.run(main)
