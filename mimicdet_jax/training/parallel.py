"""Data parallelism: the one per-device step over the devices.

`DataParallel` wraps `step.make_train_step` in `jax.pmap` over the local
devices (default) or `jax.jit(jax.shard_map)` over a mesh of all devices
with global input arrays; `replicate` and `first_replica` move pmapped
pytrees between host and devices. In a multi-host run
(`launch.initialize_distributed`) either spans every device of every
process and each process feeds its own shard of the global batch.
"""
from typing import Any, Callable

import jax
import numpy as np

from mimicdet_jax.training.step import AXIS

PyTree = Any


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


# train.parallelism (`Parallel`).
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
