"""Launching a MimicDet training run: train.py's `train_and_evaluate`.

`build_training` wires the MimicDet model, losses and data into
`loop.run_training`; around it, the start-up a run needs: joining a
multi-process run (`initialize_distributed`), the persistent compilation
cache, quiet library logs, and WORKDIR/config.json and categories.json.
"""
import json
import logging as std_logging
import os
import platform
from typing import Any, Callable, Optional

from absl import logging
import jax
import ml_collections

from mimicdet_jax import checkpoint as checkpoint_lib
from mimicdet_jax import config_lib
from mimicdet_jax import cpu_alloc
from mimicdet_jax.training import loop
from mimicdet_jax.training import optim
from mimicdet_jax.training import state as state_lib


def initialize_distributed(coordinator_address: str = '',
                           num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-process run (no-op for a single process).

  Explicit arguments win; otherwise `jax.distributed.initialize()` is called
  with no arguments on TPU pods and under SLURM with several tasks, where JAX
  finds the coordinator itself. On CPU the collectives go through gloo.
  """
  if coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or
        len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1 or
        os.environ.get('MEGASCALE_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()
  else:
    return
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


# ------------------------------------------------------ CPU memory
HUGETLB_TUNABLE = 'glibc.malloc.hugetlb=1'


def cpu_allocation_hint(backend: str, environ=os.environ,
                        libc: Optional[str] = None, *,
                        under_mimalloc: Optional[bool] = None,
                        mimalloc_lib: Optional[str] = None) -> Optional[str]:
  """A one-line tip when a CPU run starts without the faster allocation.

  XLA:CPU allocates each step's temporaries afresh, and glibc has the
  kernel fault in and zero their pages on every step. mimalloc preloaded
  and keeping freed pages (mimicdet_jax.cpu_alloc; the Makefile does it)
  makes the demo step ~12 % faster than glibc with huge pages, ~18 % than
  glibc's defaults, with identical results (docs/BENCHMARKS.md, "Memory
  allocation on CPU"). Both are read at process start, so they cannot be
  set from here. Without the cmeel-mimalloc wheel the tip is glibc's
  huge-page tunable, which only glibc reads: no tip under another C library
  (macOS, musl); `libc` is `platform.libc_ver()`'s name by default.
  `under_mimalloc` / `mimalloc_lib` default to this process and this
  environment (cpu_alloc).
  """
  if backend != 'cpu':
    return None
  if under_mimalloc is None:
    under_mimalloc = cpu_alloc.running_under_mimalloc()
  if under_mimalloc:
    return None
  if mimalloc_lib is None:
    mimalloc_lib = cpu_alloc.mimalloc_library() or ''
  if mimalloc_lib:
    return ('CPU tip: start under mimalloc, `env $(python -m '
            'mimicdet_jax.cpu_alloc) python ...`, for a ~12 % faster step '
            '(docs/BENCHMARKS.md, "Memory allocation on CPU")')
  if libc is None:
    libc = platform.libc_ver()[0]
  if libc != 'glibc' or 'glibc.malloc.hugetlb' in (
      environ.get('GLIBC_TUNABLES', '')):
    return None
  return (f'CPU tip: start with GLIBC_TUNABLES={HUGETLB_TUNABLE} for a ~8 % '
          'faster step (docs/BENCHMARKS.md, "Memory allocation on CPU")')


# ------------------------------------------------------ compilation cache
def enable_compile_cache(cache_dir: str, workdir: str = '') -> Optional[str]:
  """Turns on JAX's persistent compilation cache (train.compile_cache).

  A restart of the same config (same shapes, devices, flags and JAX version)
  then loads the compiled executables instead of compiling them again. Call
  it before the first compilation of the process: JAX reads the setting
  once, when it compiles first.

  Args:
    cache_dir: '' = off; '~' is expanded; a relative path is under `workdir`
      (e.g. 'jax_cache'), an absolute one is shared by every run.
    workdir: the run's output directory.

  Returns:
    The absolute cache directory, or None when off.
  """
  if not cache_dir:
    return None
  path = os.path.expanduser(cache_dir)
  if not os.path.isabs(path):
    path = os.path.join(workdir, path)
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  # Cache every executable, not only those that took over a second: on
  # restart the dozens of small ones (init, eval helpers) add up too.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  logging.info('compilation cache: %s', path)
  return path


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint) from the log."""

  def filter(self, record) -> bool:
    return (record.levelno >= std_logging.WARNING or
            '/orbax/' not in record.pathname)


def quiet_library_logs() -> None:
  """Keeps orbax's per-checkpoint INFO lines out of the absl log."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def write_config(config: Any, workdir: str) -> None:
  """DIR/config.json: the resolved config, as plain JSON."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(d, f, indent=2, sort_keys=True, default=str)


def write_categories(categories: list, workdir: str) -> None:
  """DIR/categories.json: [{'id', 'name'}] of labels 1..K, in label order.

  Evaluation and predict read it to map labels back to category ids (and
  names) and to check that a validation file has the same categories.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  from mimicdet_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, restore.CATEGORIES_FILE), 'w') as f:
    json.dump([{'id': int(c['id']), 'name': str(c['name'])}
               for c in categories], f, indent=1)


def _eval_fn(config, workdir: str) -> Callable:
  """evaluation.evaluate.evaluate(config, variables, workdir, step)."""
  # Imported here: training needs evaluation only for the periodic and final
  # evaluation of a run, not for its machinery.
  from mimicdet_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  # The loop hands over the weights eval.weights picks (checkpoint.model_variables).
  weights = checkpoint_lib.weights_used(config.optim.ema_decay > 0,
                                        config.eval.weights)
  return lambda variables, step: evaluate_lib.evaluate(
      config, variables, workdir, step, weights=weights)


def build_training(config: ml_collections.ConfigDict, workdir: str, *,
                   compile_cache: bool = False) -> dict:
  """Resolves the config and builds what `loop.run_training` takes for MimicDet.

  Resolves the config against the training data (number of classes), checks
  that the validation file (when there is one) has the same categories,
  turns on the compilation cache (train.compile_cache) when `compile_cache`,
  writes WORKDIR/config.json and WORKDIR/categories.json, builds model
  variables (backbone from model.backbone_init), losses and this process's
  data shard.

  Returns:
    Keyword arguments of `loop.run_training` (config, workdir, variables,
    frozen_mask, loss_fn, train_iter, eval_fn, monitors: the loss's
    dead-ReLU monitor).
  """
  # Imported here so that the generic machinery above does not need them.
  from mimicdet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.losses import total  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from mimicdet_jax.models import mimicdet  # pylint: disable=g-import-not-at-top

  source = pipeline.build_source(config.data, 'train')
  pipeline.check_val_categories(config.data, source)
  config = config_lib.resolve(config, source.num_classes)
  if compile_cache:  # after the data checks (a bad file fails first), before
    enable_compile_cache(config.train.compile_cache, workdir)  # compiling
  write_config(config, workdir)
  write_categories(source.categories, workdir)
  logging.info('training %s: %d classes, global batch %d on %d devices '
               '(%d processes)', config.model.backbone.arch,
               config.model.num_classes, config.train.batch_size,
               jax.device_count(), jax.process_count())

  hint = cpu_allocation_hint(jax.default_backend())
  if hint:
    logging.info(hint)
  model = mimicdet.MimicDet(config)
  init_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x1a1f)
  variables = state_lib.init_variables(config, model, init_rng)
  frozen_mask = backbones.frozen_param_mask(
      variables['params'], config.model.backbone.frozen_stages)
  loader = pipeline.make_train_loader(
      config, source, num_local_devices=jax.local_device_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  return dict(config=config, workdir=workdir, variables=variables,
              frozen_mask=frozen_mask,
              loss_fn=total.make_loss_fn(model, config),
              train_iter=iter(loader),
              eval_fn=_eval_fn(config, workdir),
              monitors=[total.DeadUnitMonitor()],
              finish_module=optim.HEAD_MODULES['s_head'])


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> state_lib.TrainState:
  """Trains (and optionally evaluates) MimicDet as `config` says: train.py."""
  kwargs = build_training(config, workdir, compile_cache=True)
  return loop.run_training(kwargs.pop('config'), kwargs.pop('workdir'), **kwargs)
