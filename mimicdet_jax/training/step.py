"""One optimiser step on one device's batch (axis 'data').

`make_train_step`: the loss (once per image by default, see the PRNG policy
below), gradients averaged with `lax.pmean`, the update, and the skipping of
non-finite steps, decided on device. `parallel.DataParallel` runs it over the
devices.

PRNG policy: the replicated `state.rng` is folded with the step; with
`train.loss_per_image` (default) the loss runs once per image (vmap over the
per-device batch, each image a batch of one; for a staged loss,
`losses.total.StagedLoss`, the network runs on the whole batch and only the
targets and loss terms per image) with that key folded with the image's
*global* index in the global batch, so sampling and loss
normalisation do not depend on how the batch is split over devices or hosts
(8 devices x 1 image == 1 device x 8 images). Without it the loss sees the
whole per-device batch and the key folded with the device index.

Gradient accumulation (`train.grad_accum_steps` = k > 1): the per-device batch
is cut into k contiguous micro-batches, and a `lax.scan` runs the loss and its
gradient on one at a time (one micro-batch's activations live at once); the
step applies the mean of their gradients, once. Per image, each image keeps
its global index, so the keys and the loss equal one batch's; without
`loss_per_image` micro-batch j gets the device key folded with j
(docs/TRAINING.md, "Gradient accumulation").

A finishing step (`only_module`, `train.s_head_finish_steps`): the gradient
of the same loss with respect to one top-level module's parameters alone
(the S-head's), every other module a constant, so no backward pass runs
through them; the other modules' updates are zero and the module's own are
scaled by `only_lr_mult`. The optimiser and its state are the joint step's
(the other modules' AdamW moments decay with zero gradients, unused), so a
run can switch to it from any checkpoint (docs/TRAINING.md, "S-head
finishing phase").
"""
from typing import Any, Callable, Mapping, Optional

import jax
from jax import lax
import jax.numpy as jnp
import optax

from mimicdet_jax.errors import ConfigError
from mimicdet_jax.training import ema as ema_lib
from mimicdet_jax.training import optim
from mimicdet_jax.training.state import TrainState

PyTree = Any
# loss_fn(params, frozen, batch, rng) -> (loss [], aux {name: []}).
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, Mapping[str, jax.Array]]]

AXIS = 'data'


def _global_norm_of(tree: PyTree, mask: PyTree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(g.astype(jnp.float32)))
            for g, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
            if not m]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


def check_grad_accum(per_device_batch: int, grad_accum_steps: int) -> None:
  """ConfigError unless train.grad_accum_steps divides the per-device batch."""
  if grad_accum_steps < 1 or per_device_batch % grad_accum_steps:
    raise ConfigError(
        f'train.grad_accum_steps={grad_accum_steps} must be >= 1 and divide '
        f'the per-device batch of {per_device_batch} images '
        '(train.batch_size / devices)')


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    frozen_mask: PyTree, *, loss_per_image: bool = True,
                    lr_schedule: Optional[optax.Schedule] = None,
                    grad_accum_steps: int = 1,
                    ema_decay: float = 0.0, ema_warmup: float = 0.0,
                    only_module: Optional[str] = None,
                    only_lr_mult: float = 1.0
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
    grad_accum_steps: micro-batches per device batch (module docstring); the
      loss, the aux terms and the gradients are their means.
    ema_decay, ema_warmup: optim.ema_*; the EMA weights (state.ema_params,
      when not None) follow each applied update (training/ema.py).
    only_module: a top-level key of params: the finishing step (module
      docstring), which trains that module alone; None: every trainable leaf.
    only_lr_mult: its learning rate's factor in the finishing step.

  Returns:
    train_step(state, batch) -> (state, metrics). Metrics are scalars equal
    on every replica: the loss and every aux term (pmean over devices),
    grad_norm (of the averaged trainable gradients), lr, finite (1/0),
    nonfinite_streak, nonfinite_total.
    A step whose averaged loss or gradient norm is not finite leaves params
    and optimiser state unchanged (decided on device, no host sync).
  """

  k = grad_accum_steps

  def device_loss(params, frozen, batch, step_rng, micro):
    # batch: micro-batch `micro` (int32 []) of this device's k.
    if not loss_per_image:
      rng = jax.random.fold_in(step_rng, lax.axis_index(AXIS))
      if k > 1:
        rng = jax.random.fold_in(rng, micro)
      return loss_fn(params, frozen, batch, rng)
    per_micro = jax.tree.leaves(batch)[0].shape[0]
    first = (lax.axis_index(AXIS) * k + micro) * per_micro
    global_index = first + jnp.arange(per_micro)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(global_index)

    one = lambda tree: jax.tree.map(lambda x: x[None], tree)
    if getattr(loss_fn, 'forward', None) is None:
      losses, aux = jax.vmap(
          lambda example, key: loss_fn(params, frozen, one(example), key))(
              batch, keys)
    else:
      # The network on the whole batch, the targets and losses per image
      # (losses.total.StagedLoss): the same values as the whole loss per
      # image, without vmapping the network (on TPU that vmap cost 22 % of
      # the step's HBM traffic, docs/BENCHMARKS.md "TPU, compiled on CPU").
      outputs = loss_fn.forward(params, frozen, batch)
      losses, aux = jax.vmap(
          lambda output, example, key: loss_fn.losses(
              params, frozen, one(output), one(example), key))(
                  outputs, batch, keys)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  if only_module is None:
    grad_fn = jax.value_and_grad(device_loss, has_aux=True)
  else:
    def module_loss(module_params, params, *args):
      return device_loss({**params, only_module: module_params}, *args)

    module_grad_fn = jax.value_and_grad(module_loss, has_aux=True)

    def grad_fn(params, *args):
      loss_aux, module_grads = module_grad_fn(params[only_module], params,
                                              *args)
      grads = {key: (module_grads if key == only_module
                     else jax.tree.map(jnp.zeros_like, value))
               for key, value in params.items()}
      return loss_aux, type(params)(grads)

  def accumulated_grad(params, frozen, batch, step_rng):
    """((loss, aux), grads) of the device batch: the mean over k micro-batches."""
    if k == 1:
      return grad_fn(params, frozen, batch, step_rng, 0)
    per_device = jax.tree.leaves(batch)[0].shape[0]
    check_grad_accum(per_device, k)
    micro = jax.tree.map(
        lambda x: x.reshape((k, per_device // k) + x.shape[1:]), batch)

    def body(grad_sum, xs):
      index, micro_batch = xs
      loss_aux, grads = grad_fn(params, frozen, micro_batch, step_rng, index)
      return jax.tree.map(jnp.add, grad_sum, grads), loss_aux

    grad_sum, loss_aux = lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                                  (jnp.arange(k), micro))
    return (jax.tree.map(lambda x: jnp.mean(x, axis=0), loss_aux),
            jax.tree.map(lambda g: g / k, grad_sum))

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = accumulated_grad(state.params, state.frozen, batch,
                                          step_rng)
    grads = lax.pmean(grads, AXIS)
    loss = lax.pmean(loss, AXIS)
    aux = lax.pmean(dict(aux), AXIS)
    grad_norm = _global_norm_of(grads, frozen_mask)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    if only_module is not None:
      updates = type(updates)({key: jax.tree.map(
          (lambda u: u * only_lr_mult) if key == only_module
          else jnp.zeros_like, value) for key, value in updates.items()})
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
        ema_params=keep(ema_lib.update_ema(
            state.ema_params, new_params, state.num_updates, ema_decay,
            ema_warmup), state.ema_params),
        nonfinite_streak=streak.astype(jnp.int32),
        nonfinite_total=total.astype(jnp.int32))
    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   lr=jnp.asarray(lr, jnp.float32),
                   finite=finite.astype(jnp.float32),
                   nonfinite_streak=streak, nonfinite_total=total)
    return new_state, metrics

  return train_step


def make_train_step_for(config, loss_fn: LossFn,
                        tx: optax.GradientTransformation, frozen_mask: PyTree,
                        *, only_module: Optional[str] = None
                        ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                      tuple[TrainState, dict]]:
  """`make_train_step` with the options a config sets (train.loss_per_image,
  train.grad_accum_steps, optim.ema_*, the lr schedule, and for a finishing
  step `only_module`, train.s_head_finish_lr_mult): the one mapping from
  config keys to the step, used by the train loop and by the TPU planner
  (tools/aot.py), so the planner compiles the step train.py runs."""
  return make_train_step(
      loss_fn, tx, frozen_mask, loss_per_image=config.train.loss_per_image,
      lr_schedule=optim.make_lr_schedule(config),
      grad_accum_steps=config.train.grad_accum_steps,
      ema_decay=config.optim.ema_decay, ema_warmup=config.optim.ema_warmup,
      only_module=only_module,
      only_lr_mult=config.train.s_head_finish_lr_mult)
