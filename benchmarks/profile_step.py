r"""Where the training step's time goes: a jax.profiler trace, summed per op.

  JAX_PLATFORMS=cpu python benchmarks/profile_step.py --config configs/demo.py
  python benchmarks/profile_step.py --config configs/mimicdet_r50_fpn_1x.py \
      --batch 2 --dtype bf16 --size 896x1408 --trace_dir /tmp/r50_trace  # GPU

Builds the same step as benchmarks/train_step.py (benchmarks/step.py:
mimicdet_jax.training's pmapped step on random in-memory batches), runs `--warmup`
steps, then traces `--steps` steps with `jax.profiler` and reads the trace
back (benchmarks/profiling.py) (`jax.profiler.ProfileData`): the
XLA op events (the CPU thunk executor's worker threads, or a GPU's "XLA Ops"
line), summed per op and per op kind (the name without its numeric suffix),
per step. Each op is named with the JAX source op that made it (the HLO
`op_name` metadata of the compiled step), e.g.
`s_head_net/p3_conv/jit(_take)/gather`, so a line of the table points at a
line of the model. The trace stays in `--trace_dir` for TensorBoard /
Perfetto.

On a CPU the summed op time of the two worker threads exceeds the wall time
(ops run concurrently); `covered` is the wall time during which at least one
op ran, the rest is dispatch and waiting.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common as bench
from benchmarks import profiling
from benchmarks import step as step_lib
from mimicdet_jax import config_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file (configs/*.py).', lock_config=True)
_BATCH = flags.DEFINE_integer(
    'batch', 0, 'Per-device batch; 0 = train.batch_size / local devices.')
_DTYPE = flags.DEFINE_enum('dtype', None, sorted(bench.DTYPES),
                           "Compute dtype (default: the config's).")
_SIZE = flags.DEFINE_string('size', None, 'Canvas HxW (default: the config).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Traced steps.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untraced steps first.')
_TOP = flags.DEFINE_integer('top', 30, 'Rows of the per-op table.')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', -1, 'Classes (default: from the config, or COCO 80).')
_JSON = flags.DEFINE_string('json', None, 'Also write the summary here.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', None,
                                 'Where the trace goes (default: a temp dir).')


def top_ops(summary: dict, names: dict[str, tuple[str, str]],
            top: int) -> list[dict]:
  """The `top` costliest ops: name, ms per step, result shape, JAX source."""
  rows = []
  for name, ms in summary['by_op'].most_common(top):
    shape, source = names.get(name, ('?', ''))
    rows.append(dict(op=name, ms=ms, shape=shape, source=source))
  return rows


def report(summary: dict, names: dict[str, tuple[str, str]], step_ms: float,
           top: int) -> str:
  lines = [
      f"step {step_ms:.1f} ms (untraced); traced ops per step: summed "
      f"{summary['summed_ms']:.1f} ms, covered {summary['covered_ms']:.1f} ms "
      f"of a {summary['span_ms']:.1f} ms span, "
      f"{summary['events_per_step']:.0f} op events", '', 'by op kind (ms/step):']
  for kind, ms in summary['by_kind'].most_common(12):
    lines.append(f'  {ms:8.2f}  {kind}')
  groups = summary['by_group']
  lines += ['', 'by pass and part of the model (ms/step, share of the summed):']
  for pass_ in ('forward', 'backward', 'outside', 'other'):
    total = sum(ms for (p, _), ms in groups.items() if p == pass_)
    lines.append(f"  {total:8.2f}  {pass_:9s} {100 * total / summary['summed_ms']:5.1f} %")
    for (p, part), ms in groups.most_common():
      if p == pass_ and ms >= 0.5:
        lines.append(f'  {ms:8.2f}      {part}')
  lines += ['', f'top {top} ops (ms/step, result shape, JAX source op):']
  for r in top_ops(summary, names, top):
    lines.append(f"  {r['ms']:8.2f}  {r['op']:30s} {r['shape'][:40]:40s} "
                 f"{r['source'][-90:]}")
  return '\n'.join(lines)


def profile(config, per_device_batch: int, *, steps: int, warmup: int,
            trace_dir: Optional[str]) -> tuple[dict, dict, float, str]:
  """Traces the step; returns (summary, op names, untraced step ms, dir)."""
  p_step, rstate, batch, _ = step_lib.build_step(config, per_device_batch,
                                                 count_flops=False)
  for _ in range(max(warmup, 1)):
    rstate, metrics = p_step(rstate, batch)
  jax.block_until_ready((rstate, metrics))
  t0 = time.perf_counter()
  for _ in range(steps):
    rstate, metrics = p_step(rstate, batch)
  jax.block_until_ready((rstate, metrics))
  step_ms = (time.perf_counter() - t0) / steps * 1e3
  names = profiling.hlo_op_names(p_step.lower(rstate, batch).compile().as_text())
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='mimicdet_trace_')
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    rstate, metrics = p_step(rstate, batch)
  jax.block_until_ready((rstate, metrics))
  jax.profiler.stop_trace()
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise RuntimeError(f'jax.profiler wrote no .xplane.pb under {trace_dir}')
  data = jax.profiler.ProfileData.from_file(files[-1])
  summary = profiling.summarize(profiling.op_events(data), steps)
  summary['by_group'] = profiling.by_group(summary, names)
  return summary, names, step_ms, trace_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, per_device = step_lib.step_config(
      _CONFIG.value, batch=_BATCH.value, size=_SIZE.value, dtype=_DTYPE.value,
      num_classes=_NUM_CLASSES.value)
  summary, names, step_ms, trace_dir = profile(
      config, per_device, steps=_STEPS.value, warmup=_WARMUP.value,
      trace_dir=_TRACE_DIR.value)
  print(report(summary, names, step_ms, _TOP.value))
  print(f'\ntrace: {trace_dir} (tensorboard --logdir, or Perfetto)')
  bench.write_json(_JSON.value, dict(
      benchmark='profile_step', command=' '.join(sys.argv), step_ms=step_ms,
      trace_dir=trace_dir, device=bench.device_summary(),
      **{k: summary[k] for k in ('summed_ms', 'covered_ms', 'span_ms',
                                 'events_per_step')},
      by_kind=dict(summary['by_kind'].most_common()),
      by_group={f'{p}/{part}': ms for (p, part), ms in
                summary['by_group'].most_common()},
      top_ops=top_ops(summary, names, _TOP.value)))


if __name__ == '__main__':
  config_lib.check_override_keys(sys.argv)
  flags.mark_flags_as_required(['config'])
  app.run(main)
