"""Data-parallel training: optimiser, train state, the step, the loop.

Read top to bottom: `make_lr_schedule` and `make_optimizer` (SPEC 5),
`TrainState` and `create_train_state`, `make_train_step` (one per-device
optimiser step with gradient averaging and non-finite skipping),
`DataParallel` (pmap or jit(shard_map) around it),
`run_training` (the loop: resume, log, checkpoint, preemption) and
`train_and_evaluate` (wires the MimicDet model, losses and data into it).

Parallelism: one per-device step (axis name 'data'; gradients, loss and
metrics averaged with `lax.pmean`, so every replica holds identical
parameters), wrapped by `DataParallel` as `train.parallelism` says: `jax.pmap`
over the local devices (default) or `jax.jit(jax.shard_map)` over a mesh of
all devices with global input arrays. In a multi-host run
(`initialize_distributed`) either spans every device of every process and
each process feeds its own shard of the global batch.

PRNG policy: the replicated `state.rng` is folded with the step; with
`train.loss_per_image` (default) the loss runs once per image (vmap over the
per-device batch, each image a batch of one) with that key folded with the
image's *global* index in the global batch, so sampling and loss
normalisation do not depend on how the batch is split over devices or hosts
(8 devices x 1 image == 1 device x 8 images). Without it the loss sees the
whole per-device batch and the key folded with the device index.
"""
import functools
import importlib
import json
import logging as std_logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
import flax
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from mimicdet_jax import checkpoint as checkpoint_lib
from mimicdet_jax import config_lib
from mimicdet_jax import errors

PyTree = Any
# loss_fn(params, frozen, batch, rng) -> (loss [], aux {name: []}).
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, Mapping[str, jax.Array]]]

AXIS = 'data'
SMALL_ARCHS = ('resnet_tiny',)  # archs that may sensibly train from scratch


# ------------------------------------------------------------------ optimiser
def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optim.base_lr scaled linearly with the global batch (SPEC 5)."""
  return (config.optim.base_lr * config.train.batch_size /
          config.optim.base_batch_size)


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then x`decay_factor` at each of `optim.decay_steps`.

  lr(t) = peak * (w + (1 - w) * t / warmup_steps) for t < warmup_steps
  (w = optim.warmup_factor), then peak * decay_factor ** #{d : t >= d};
  t counts applied updates from 0. This is Detectron2's WarmupMultiStepLR
  with linear warm-up (for decay steps after the warm-up).
  """
  o = config.optim
  peak = peak_learning_rate(config)
  decay = optax.piecewise_constant_schedule(
      peak, {int(s): float(o.decay_factor) for s in o.decay_steps})
  if o.warmup_steps <= 0:
    return decay
  # Written as a factor rather than optax.linear_schedule, whose
  # end + (init - end) * (1 - t/T) form loses ~4e-5 relative at t = 0 in float32.
  def warmup(t):
    alpha = jnp.minimum(t, o.warmup_steps) / o.warmup_steps
    return peak * (o.warmup_factor * (1.0 - alpha) + alpha)

  return optax.join_schedules(
      [warmup, lambda t: decay(t + o.warmup_steps)], [o.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict,
                   frozen_mask: PyTree) -> optax.GradientTransformation:
  """SGD with momentum (or AdamW), masked weight decay, clipping, frozen leaves.

  Per trainable leaf, PyTorch's SGD order: g <- clip(g) (global norm over
  trainable leaves, when optim.grad_clip_norm > 0); g <- g + wd * p for
  leaves with ndim > 1 (no decay on norm scales and biases);
  m <- momentum * m + g; p <- p - lr(t) * m.
  Frozen leaves (frozen_mask True) get a zero update and hold no state.

  Args:
    config: reads optim.* and train.batch_size.
    frozen_mask: pytree of bools like params, True = frozen.
  """
  o = config.optim
  chain = []
  if o.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  # A callable mask: inside multi_transform the tree carries MaskedNodes
  # for the frozen leaves, which have no leaves of their own.
  decay = optax.add_decayed_weights(
      o.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  if o.optimizer == 'sgd':  # the paper's recipe (SPEC section 5)
    if o.weight_decay > 0:
      chain.append(decay)
    chain.append(optax.trace(decay=o.momentum, nesterov=False))
  elif o.optimizer == 'adamw':  # from-scratch CPU demo: converges in fewer steps
    chain.append(optax.scale_by_adam())
    if o.weight_decay > 0:
      chain.append(decay)  # decoupled, as optax.adamw
  else:
    raise ValueError(f"optim.optimizer={o.optimizer!r}; expected 'sgd' or 'adamw'")
  chain.append(optax.scale_by_learning_rate(make_lr_schedule(config)))
  labels = jax.tree.map(lambda f: 'frozen' if f else 'trainable', frozen_mask)
  return optax.multi_transform(
      {'trainable': optax.chain(*chain), 'frozen': optax.set_to_zero()},
      labels)


# ---------------------------------------------------------------- train state
@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in every checkpoint.

  Attributes:
    step: int32 [], optimiser steps taken (skipped non-finite steps count).
    params: trained variables (frozen leaves included, never updated).
    frozen: the 'frozen' collection (frozen-BN statistics), never updated.
    opt_state: optax state (none for frozen leaves).
    rng: uint32 [2], the run's base key; each step folds in the step number.
    nonfinite_streak: int32 [], consecutive skipped steps ending at `step`.
    nonfinite_total: int32 [], skipped steps since the start of training.
  """
  step: jax.Array
  params: PyTree
  frozen: PyTree
  opt_state: PyTree
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array

  @property
  def num_updates(self) -> jax.Array:
    """Applied updates: optax's schedule count."""
    return self.step - self.nonfinite_total


def create_train_state(config: ml_collections.ConfigDict,
                       variables: Mapping[str, PyTree],
                       frozen_mask: PyTree,
                       rng: jax.Array) -> tuple[TrainState,
                                                optax.GradientTransformation]:
  """Builds the step-0 state (on the host) and its optimiser.

  Args:
    config: reads optim.* and train.batch_size.
    variables: {'params': ..., 'frozen': ... (optional)}.
    frozen_mask: pytree of bools like variables['params'].
    rng: uint32 [2] PRNG key (jax.random.PRNGKey).
  """
  tx = make_optimizer(config, frozen_mask)
  params = jax.device_get(variables['params'])
  frozen = jax.device_get(variables.get('frozen', {}))
  state = TrainState(
      step=np.zeros((), np.int32),
      params=params,
      frozen=frozen,
      opt_state=jax.device_get(tx.init(params)),
      rng=np.asarray(rng, np.uint32),
      nonfinite_streak=np.zeros((), np.int32),
      nonfinite_total=np.zeros((), np.int32))
  return state, tx


# ------------------------------------------------------------------ the step
def _global_norm_of(tree: PyTree, mask: PyTree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(g.astype(jnp.float32)))
            for g, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
            if not m]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    frozen_mask: PyTree, *, loss_per_image: bool = True,
                    lr_schedule: Optional[optax.Schedule] = None
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict]]:
  """One optimiser step on one device's batch, over axis 'data' (DataParallel).

  Args:
    loss_fn: loss_fn(params, frozen, batch, rng) -> (loss, aux) on a batch
      with a leading per-device batch dimension.
    tx: from `make_optimizer`.
    frozen_mask: like params; frozen leaves are left out of the grad norm.
    loss_per_image: see the module docstring (PRNG policy).
    lr_schedule: reported as metrics['lr'] (of the update count).

  Returns:
    train_step(state, batch) -> (state, metrics). Metrics are scalars equal
    on every replica: the loss and every aux term (pmean over devices),
    grad_norm (of the averaged trainable gradients), lr, finite (1/0),
    nonfinite_streak, nonfinite_total.
    A step whose averaged loss or gradient norm is not finite leaves params
    and optimiser state unchanged (decided on device, no host sync).
  """

  def device_loss(params, frozen, batch, step_rng):
    if not loss_per_image:
      rng = jax.random.fold_in(step_rng, lax.axis_index(AXIS))
      return loss_fn(params, frozen, batch, rng)
    per_device = jax.tree.leaves(batch)[0].shape[0]
    global_index = lax.axis_index(AXIS) * per_device + jnp.arange(per_device)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(global_index)

    def one_image(example, key):
      return loss_fn(params, frozen,
                     jax.tree.map(lambda x: x[None], example), key)

    losses, aux = jax.vmap(one_image)(batch, keys)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(device_loss, has_aux=True)(
        state.params, state.frozen, batch, step_rng)
    grads = lax.pmean(grads, AXIS)
    loss = lax.pmean(loss, AXIS)
    aux = lax.pmean(dict(aux), AXIS)
    grad_norm = _global_norm_of(grads, frozen_mask)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    total = state.nonfinite_total + jnp.where(finite, 0, 1)
    lr = (lr_schedule(state.num_updates) if lr_schedule is not None
          else jnp.zeros(()))
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_streak=streak.astype(jnp.int32),
        nonfinite_total=total.astype(jnp.int32))
    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   lr=jnp.asarray(lr, jnp.float32),
                   finite=finite.astype(jnp.float32),
                   nonfinite_streak=streak, nonfinite_total=total)
    return new_state, metrics

  return train_step


def pmap_train_step(train_step: Callable, devices=None) -> Callable:
  """pmap over `devices` (default: all local devices); the state is donated."""
  return jax.pmap(train_step, axis_name=AXIS, devices=devices,
                  donate_argnums=(0,))


def first_replica(tree: PyTree) -> PyTree:
  """Host NumPy copy of replica 0 of a pmapped pytree."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)


def replicate(tree: PyTree, devices=None) -> PyTree:
  """Copies a host pytree to every local device, leading axis = device.

  Laid out exactly as pmap lays out its outputs (a 1-D 'data' mesh), so the
  first step does not compile the step a second time for another layout.
  """
  devices = list(devices) if devices is not None else jax.local_devices()
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), (AXIS,)),
      jax.sharding.PartitionSpec(AXIS))
  return jax.tree.map(
      lambda x: jax.device_put(
          np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)),
          sharding), tree)


PARALLELISMS = ('pmap', 'shard_map')


class DataParallel:
  """Runs the one per-device step over the devices: pmap or jit(shard_map).

  Both wrap the same `make_train_step` function (axis 'data', `lax.pmean`
  of the gradients inside), so they compute the same thing:

  * 'pmap': `jax.pmap` over the local devices (every process's local
    devices in a multi-process run). The state carries a leading device
    axis; batches go in as the loader yields them, host arrays
    [local_devices, per_device, ...] that pmap splits.
  * 'shard_map': `jax.jit(jax.shard_map(...))` over a `Mesh` of all global
    devices with one axis 'data'. The state is one global array per leaf,
    replicated (`NamedSharding(mesh, P())`); a batch becomes one global
    array per leaf, [global_batch, ...] split over 'data', built with
    `jax.make_array_from_process_local_data` from this process's rows, so
    no host-local -> global conversion happens inside the dispatch. The
    shard_map runs with check_vma=False: with it on, JAX would already sum
    the gradients of the replicated parameters over 'data' (the transpose
    of the implicit broadcast), and the step's own pmean would then leave
    the device *sum*, not the mean. Off, the body means what it means
    under pmap.

  Device order is the same for both (process by process, local devices in
  order), so `lax.axis_index('data')`, and with it each image's global
  index and PRNG key, agrees between the two.
  """

  def __init__(self, kind: str = 'pmap', devices=None):
    """Args:
      kind: 'pmap' | 'shard_map' (config key train.parallelism).
      devices: pmap: local devices to use (default all local devices);
        shard_map: the mesh's devices (default `jax.devices()`, every
        process's).
    """
    if kind not in PARALLELISMS:
      raise ValueError(f'train.parallelism={kind!r}; expected one of '
                       f'{PARALLELISMS}')
    self.kind = kind
    self.devices = list(devices) if devices is not None else None
    if kind == 'shard_map':
      mesh_devices = self.devices or jax.devices()
      self.mesh = jax.sharding.Mesh(np.array(mesh_devices), (AXIS,))
      self._replicated = jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec())
      self._split = jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec(AXIS))

  def wrap(self, train_step: Callable) -> Callable:
    """step(device_state, device_batch) -> (device_state, device_metrics)."""
    if self.kind == 'pmap':
      return pmap_train_step(train_step, self.devices)
    spec = jax.sharding.PartitionSpec
    sharded = jax.shard_map(train_step, mesh=self.mesh,
                            in_specs=(spec(), spec(AXIS)),
                            out_specs=(spec(), spec()), check_vma=False)
    return jax.jit(sharded, donate_argnums=(0,))

  def put_state(self, tree: PyTree) -> PyTree:
    """Host pytree (the same on every process) -> replicated on the devices."""
    if self.kind == 'pmap':
      return replicate(tree, self.devices)
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self._replicated,
                                          lambda index: x[index])
    return jax.tree.map(put, tree)

  def put_batch(self, batch: PyTree) -> PyTree:
    """This process's batch, leaves [local_devices, per_device, ...]."""
    if self.kind == 'pmap':
      return batch
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self._split, np.reshape(x, (-1,) + np.shape(x)[2:])), batch)

  def host(self, tree: PyTree) -> PyTree:
    """Host NumPy copy of one replica of a device state or metrics tree."""
    if self.kind == 'pmap':
      return first_replica(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# ------------------------------------------------------------- multi-host
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


# --------------------------------------------------------------- metrics
class MetricWriter:
  """Writes scalars to WORKDIR/metrics.jsonl and TensorBoard (process 0).

  One JSON object per log step: {"step": int, name: float, ...}. On resume
  from step s, rows after s (written by a run that died before its next
  checkpoint) are dropped so the file reads like one uninterrupted run;
  TensorBoard events after s are purged the same way.
  """

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f
                if line.strip() and json.loads(line)['step'] <= start_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(rows)
      os.replace(self.path + '.tmp', self.path)
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=start_step + 1 if start_step > 0 else None)
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard events')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in sorted(scalars.items())})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step':
          self._tb.add_scalar(f'train/{k}', v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def summarize_window(window: list[dict], elapsed: float,
                     global_batch: int) -> dict:
  """Averages fetched per-step metrics over the finite steps of a window.

  Counters and lr are taken from the last step; images_per_sec and
  step_time from the wall time of the window (the first window includes
  compilation).
  """
  last = window[-1]
  finite = [m for m in window if m['finite'] > 0]
  out = {}
  for k in last:
    if k in ('finite', 'nonfinite_streak', 'nonfinite_total', 'lr'):
      continue
    out[k] = (float(np.mean([m[k] for m in finite])) if finite
              else float(last[k]))
  out['lr'] = float(last['lr'])
  out['nonfinite_steps'] = float(len(window) - len(finite))
  out['nonfinite_total'] = float(last['nonfinite_total'])
  out['step_time'] = elapsed / len(window)
  out['images_per_sec'] = global_batch * len(window) / max(elapsed, 1e-9)
  return out


class NonFiniteLossError(errors.UserError, RuntimeError):
  """Raised after train.max_consecutive_nonfinite skipped steps in a row.

  A UserError (the fix is in the config or data: lower the lr, clip the
  gradients): train.py reports it as one line and exits with status 1.
  """


# ------------------------------------------------------------- preemption
class _StopSignal:
  """Turns SIGTERM / SIGINT into a request to stop at the next step boundary.

  Only for single-process runs: in a multi-process run every process must
  stop at the same step, which JAX's preemption service provides
  (`multihost_utils.reached_preemption_sync_point`), and its SIGTERM
  notifier must not be replaced.
  """

  def __init__(self):
    self.requested = None  # the signal's name once received
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint at the next step '
                    'boundary, then stopping', self.requested)
    # A second signal acts immediately (default behaviour).
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class _PreemptionSync:
  """All processes agree to stop at the same step after a preemption notice.

  Wraps `multihost_utils.reached_preemption_sync_point`; where JAX runs no
  preemption service (it raises), it is disabled after the first call.
  """

  def __init__(self):
    self.available = True

  def __call__(self, step: int) -> bool:
    if not self.available:
      return False
    try:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('no preemption service (%s): SIGTERM is not handled '
                      'gracefully in this multi-process run', e)
      self.available = False
      return False


# ---------------------------------------------------------------- the loop
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
  from mimicdet_jax import restore  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, restore.CATEGORIES_FILE), 'w') as f:
    json.dump([{'id': int(c['id']), 'name': str(c['name'])}
               for c in categories], f, indent=1)


def run_training(config: ml_collections.ConfigDict, workdir: str, *,
                 variables: Mapping[str, PyTree],
                 frozen_mask: PyTree,
                 loss_fn: LossFn,
                 train_iter: Iterator[Mapping[str, np.ndarray]],
                 eval_fn: Optional[Callable[[PyTree, int], Any]] = None,
                 on_step_end: Optional[Callable[[int], None]] = None
                 ) -> TrainState:
  """Trains until train.total_steps, resuming from WORKDIR/checkpoints.

  Args:
    config: the resolved config (train.*, optim.*, seed).
    workdir: output directory (checkpoints/, metrics.jsonl, tensorboard/).
    variables: initial {'params', 'frozen'} (overwritten by a checkpoint).
    frozen_mask: like variables['params'], True = not trained.
    loss_fn: see `LossFn`; called on one device's batch.
    train_iter: yields this process's batches, every leaf shaped
      [local_device_count, per_device_batch, ...]; must have
      get_state()/set_state() (a grain iterator) for exact resume.
    eval_fn: eval_fn(variables, step), run every train.eval_every steps and
      at the end when eval.at_end (process-collective).
    on_step_end: called with the step number after each step's bookkeeping.

  Returns:
    The final TrainState as host arrays (replica 0).

  Raises:
    NonFiniteLossError: train.max_consecutive_nonfinite skipped steps in a row.
  """
  t = config.train
  is_main = jax.process_index() == 0
  num_devices = jax.device_count()
  if t.batch_size % num_devices:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'the {num_devices} devices')

  state, tx = create_train_state(config, variables, frozen_mask,
                                 jax.random.PRNGKey(config.seed))
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), save_every=t.checkpoint_every,
      keep=t.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, state, train_iter)
    logging.info('resumed from step %d', latest)
  start_step = int(state.step)

  lr_schedule = make_lr_schedule(config)
  parallel = DataParallel(t.parallelism)
  logging.info('train.parallelism=%s', t.parallelism)
  p_step = parallel.wrap(make_train_step(
      loss_fn, tx, frozen_mask, loss_per_image=t.loss_per_image,
      lr_schedule=lr_schedule))
  rstate = parallel.put_state(state)
  del state

  writer = MetricWriter(workdir, start_step, enabled=is_main)
  stop = _StopSignal()
  multi_process = jax.process_count() > 1
  preemption_sync = _PreemptionSync()
  if not multi_process:
    stop.install()
  check_every = max(1, min(t.log_every, t.max_consecutive_nonfinite))
  bar = tqdm.tqdm(total=t.total_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, disable=not is_main)
  window, last_metrics = [], None
  window_start = time.time()
  step = start_step
  try:
    while step < t.total_steps:
      batch = next(train_iter)
      rstate, last_metrics = p_step(rstate, parallel.put_batch(batch))
      window.append(last_metrics)
      step += 1
      bar.update(1)
      is_last = step == t.total_steps

      if step % t.log_every == 0 or is_last:
        fetched = [parallel.host(m) for m in window]
        now = time.time()
        scalars = summarize_window(fetched, now - window_start, t.batch_size)
        writer.write(step, scalars)
        bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                        img_s=f"{scalars['images_per_sec']:.1f}")
        window, window_start = [], now

      if step % check_every == 0 or is_last:
        terms = parallel.host(last_metrics)
        streak = int(terms['nonfinite_streak'])
        if streak >= t.max_consecutive_nonfinite:
          msg = (f'training stopped at step {step}: {streak} consecutive '
                 f'non-finite losses (steps {step - streak + 1}..{step}); '
                 'loss terms at step {}: {}'.format(step, ', '.join(
                     f'{k}={float(v):.6g}' for k, v in sorted(terms.items()))))
          logging.error(msg)
          raise NonFiniteLossError(msg)

      stop_now = (stop.requested is not None if not multi_process
                  else preemption_sync(step))
      if step % t.checkpoint_every == 0 or is_last or stop_now:
        ckpt.save(step, parallel.host(rstate), train_iter,
                  force=is_last or stop_now)

      if eval_fn is not None and t.eval_every > 0 and (
          step % t.eval_every == 0) and not is_last:
        eval_fn(_variables_of(parallel.host(rstate)), step)

      if on_step_end is not None:
        on_step_end(step)
      if stop_now:
        logging.warning('stopped at step %d after a checkpoint', step)
        break

    final = parallel.host(rstate)
    if (eval_fn is not None and step == t.total_steps and
        step > start_step and (config.eval.at_end or t.eval_every > 0)):
      ckpt.wait()
      eval_fn(_variables_of(final), step)
    return final
  finally:
    bar.close()
    stop.uninstall()
    writer.close()
    ckpt.close()


def _variables_of(state: TrainState) -> dict:
  return {'params': state.params, 'frozen': state.frozen}


# ------------------------------------------------------------ MimicDet wiring
def _warn_from_scratch(config) -> None:
  arch = config.model.backbone.arch
  if config.model.backbone_init or arch in SMALL_ARCHS:
    return
  bar = '!' * 78
  logging.warning(
      '\n%s\n  Training %s FROM SCRATCH: model.backbone_init is empty.\n'
      '  The recipes assume an ImageNet-pretrained backbone (stem + stage 1\n'
      '  frozen, frozen BatchNorm); from random weights this will not reach\n'
      '  the paper numbers. Import weights with\n'
      '    python -m mimicdet_jax.tools.import_weights --arch %s --src ... '
      '--out weights/%s\n  and pass --config.model.backbone_init=weights/%s\n%s',
      bar, arch, arch, arch, arch, bar)


def init_variables(config, model, rng: jax.Array) -> dict:
  """MimicDet variables on the host; the backbone from model.backbone_init."""
  h, w = config.data.canvas_buckets[0]
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, images)
  variables = jax.device_get(flax.core.unfreeze(variables))
  if config.model.backbone_init:
    from mimicdet_jax.models import backbones  # pylint: disable=g-import-not-at-top
    from mimicdet_jax.tools import import_weights  # pylint: disable=g-import-not-at-top
    logging.info('backbone from %s', config.model.backbone_init)
    variables = backbones.graft_backbone(
        variables, import_weights.load_backbone_init(config.model.backbone_init))
  else:
    _warn_from_scratch(config)
  return variables


def _find_eval_fn(config, workdir: str) -> Optional[Callable]:
  """eval_lib.evaluate(config, variables, workdir, step) when it exists."""
  try:
    eval_lib = importlib.import_module('mimicdet_jax.eval_lib')
  except ImportError:
    return None
  evaluate = getattr(eval_lib, 'evaluate', None)
  if evaluate is None:
    return None
  return lambda variables, step: evaluate(config, variables, workdir, step)


def build_training(config: ml_collections.ConfigDict, workdir: str, *,
                   compile_cache: bool = False) -> dict:
  """Resolves the config and builds what `run_training` takes for MimicDet.

  Resolves the config against the training data (number of classes), checks
  that the validation file (when there is one) has the same categories,
  turns on the compilation cache (train.compile_cache) when `compile_cache`,
  writes WORKDIR/config.json and WORKDIR/categories.json, builds model
  variables (backbone from model.backbone_init), losses and this process's
  data shard.

  Returns:
    Keyword arguments of `run_training` (config, workdir, variables,
    frozen_mask, loss_fn, train_iter, eval_fn).
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

  model = mimicdet.MimicDet(config)
  init_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x1a1f)
  variables = init_variables(config, model, init_rng)
  frozen_mask = backbones.frozen_param_mask(
      variables['params'], config.model.backbone.frozen_stages)
  loader = pipeline.make_train_loader(
      config, source, num_local_devices=jax.local_device_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  return dict(config=config, workdir=workdir, variables=variables,
              frozen_mask=frozen_mask,
              loss_fn=total.make_loss_fn(model, config),
              train_iter=iter(loader),
              eval_fn=_find_eval_fn(config, workdir))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains (and optionally evaluates) MimicDet as `config` says: train.py."""
  kwargs = build_training(config, workdir, compile_cache=True)
  return run_training(kwargs.pop('config'), kwargs.pop('workdir'), **kwargs)
