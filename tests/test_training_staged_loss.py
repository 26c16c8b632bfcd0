"""The train step with a staged loss (losses.total.StagedLoss): the network
on a device's whole batch at once, the targets and losses per image, gives
the update of the whole loss run per image (train.loss_per_image's PRNG
policy: each image keyed by its global index)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimicdet_jax.losses import total
from mimicdet_jax.training import optim
from mimicdet_jax.training import parallel as parallel_lib
from mimicdet_jax.training import state as state_lib
from mimicdet_jax.training import step as step_lib
from tests import train_helper as th


class TwoStage(nn.Module):
  """A body (the 'network') and a dropout head (the per-image 'loss')."""

  def setup(self):
    self.body = nn.Dense(6)
    self.head = nn.Dense(2)
    self.drop = nn.Dropout(0.5)

  def __call__(self, images):
    return nn.relu(self.body(images.reshape(images.shape[0], -1)))

  def predict(self, features):
    return self.head(self.drop(features, deterministic=False))


def _losses_and_forward(seen):
  model = TwoStage()

  def forward(params, frozen, batch):
    del frozen
    seen.append(batch['image'].shape[0])  # at trace time
    return {'features': model.apply({'params': params}, batch['image'])}

  def losses(params, frozen, outputs, batch, rng):
    del frozen
    y = model.apply({'params': params}, outputs['features'],
                    rngs={'dropout': rng}, method='predict')
    err = jnp.square(y - batch['target'])
    return jnp.mean(err), {'err_x': jnp.mean(err[:, 0])}

  return model, forward, losses


def _run(loss_fn, n_dev=2, global_batch=8, steps=2):
  model = TwoStage()
  image = np.zeros((1, th.IMAGE, th.IMAGE, 3), np.float32)
  params = model.init({'params': jax.random.PRNGKey(0),
                       'dropout': jax.random.PRNGKey(1)}, image,
                      method=lambda m, x: m.predict(m(x)))['params']
  mask = jax.tree.map(lambda _: False, params)
  state, tx = state_lib.create_train_state(
      th.toy_config(), {'params': params}, mask, jax.random.PRNGKey(3))
  step = step_lib.make_train_step(loss_fn, tx, mask, loss_per_image=True,
                                  lr_schedule=optim.make_lr_schedule(
                                      th.toy_config()))
  devices = jax.local_devices()[:n_dev]
  ex = [th._example(i, nan_from=-1) for i in range(global_batch)]  # pylint: disable=protected-access
  batch = {k: np.stack([e[k] for e in ex]).reshape(
      (n_dev, global_batch // n_dev) + np.shape(ex[0][k])) for k in ex[0]}
  rstate = parallel_lib.replicate(state, devices)
  p_step = parallel_lib.pmap_train_step(step, devices=devices)
  for _ in range(steps):
    rstate, metrics = p_step(rstate, batch)
  return (parallel_lib.first_replica(rstate), parallel_lib.first_replica(metrics),
          params)


def test_network_on_the_batch_losses_per_image_equal_the_loss_per_image():
  staged_seen, whole_seen = [], []
  _, forward, losses = _losses_and_forward(staged_seen)
  staged = total.StagedLoss(forward, losses)
  _, forward2, losses2 = _losses_and_forward(whole_seen)
  whole = total.StagedLoss(forward2, losses2)
  per_image = lambda p, f, b, r: whole(p, f, b, r)  # no .forward: vmapped whole

  got, got_m, params = _run(staged)
  want, want_m, _ = _run(per_image)
  # The staged step ran the network once on each device's 4 images; the
  # other once per image (batches of 1).
  assert staged_seen and set(staged_seen) == {4}, staged_seen
  assert whole_seen and set(whole_seen) == {1}, whole_seen
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(want.params), jax.tree.leaves(params)))
  assert moved > 1e-3, moved
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  for key in ('loss', 'err_x', 'grad_norm'):
    np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-5)
