"""Moves per-process numpy batches onto the mesh as global `jax.Array`s.

Each process holds its local batch (global batch / process count rows); together the local
batches form the global batch, sharded along its leading axis over the mesh axes of
`batch_spec` (data x fsdp by default) and replicated over the others (tensor).
"""
import collections
from typing import Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

BATCH_SPEC = P(("data", "fsdp"))


def _full_spec(batch_spec: P, ndim: int) -> P:
  """`batch_spec` padded with None (replicated) to `ndim` axes."""
  return P(*batch_spec, *([None] * (ndim - len(batch_spec))))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, batch_spec: P = BATCH_SPEC
              ) -> dict[str, jax.Array]:
  """Assembles the local batches of all processes into global arrays.

  Args:
    batch: this process's rows, e.g. `image` float32 [local_batch, H, W, 3].
    mesh: the device mesh.
    batch_spec: how the leading axis is sharded; remaining axes are replicated.

  Returns:
    The same keys as global arrays [local_batch * process_count, ...] with sharding
    NamedSharding(mesh, batch_spec + (None,) * (ndim - 1)).
  """
  named = set()
  for entry in batch_spec:
    named.update(entry if isinstance(entry, tuple) else (entry,) if entry else ())
  missing = named - set(mesh.axis_names)
  if missing:
    raise ValueError(f"batch_spec {batch_spec} names axes {sorted(missing)} that mesh "
                     f"{dict(mesh.shape)} lacks")

  def put(key, value):
    value = np.asarray(value)
    sharding = NamedSharding(mesh, _full_spec(batch_spec, value.ndim))
    try:
      return jax.make_array_from_process_local_data(sharding, value)
    except ValueError as e:
      raise ValueError(f"batch field {key!r} (local shape {value.shape}) does not fit "
                       f"sharding {sharding.spec} on mesh {dict(mesh.shape)}: {e}") from e

  return {key: put(key, value) for key, value in batch.items()}


class DevicePrefetcher:
  """Keeps `size` global batches in flight ahead of the consumer.

  `jax.make_array_from_process_local_data` starts the host-to-device copies asynchronously,
  so the copies of the next batches overlap the current step. `stats()` and `state()` (when
  the host iterator has them) describe the batch last returned, not the ones read ahead,
  which is what a checkpoint taken after that step must record.
  """

  def __init__(self, host_iter: Iterator[dict], size: int, mesh: Mesh,
               batch_spec: P = BATCH_SPEC):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._host = host_iter
    self._size = size
    self._mesh = mesh
    self._batch_spec = batch_spec
    self._queue = collections.deque()
    self._stats: dict = {}
    self._state: dict = {}
    self._exhausted = False

  def __iter__(self):
    return self

  def _fill(self) -> None:
    while not self._exhausted and len(self._queue) < self._size:
      try:
        batch = next(self._host)
      except StopIteration:
        self._exhausted = True
        return
      stats = self._host.stats() if hasattr(self._host, "stats") else {}
      state = self._host.state() if hasattr(self._host, "state") else {}
      self._queue.append((to_global(batch, self._mesh, self._batch_spec), stats, state))

  def __next__(self) -> dict[str, jax.Array]:
    self._fill()
    if not self._queue:
      raise StopIteration
    batch, self._stats, self._state = self._queue.popleft()
    self._fill()
    return batch

  def stats(self) -> dict:
    return dict(self._stats)

  def state(self) -> dict:
    return dict(self._state)

  def close(self) -> None:
    self._queue.clear()
    if hasattr(self._host, "close"):
      self._host.close()


def prefetch_to_device(host_iter: Iterator[dict], size: int, mesh: Mesh,
                       batch_spec: P = BATCH_SPEC) -> DevicePrefetcher:
  """Iterator of global batches with `size` batches transferred ahead (see `DevicePrefetcher`)."""
  return DevicePrefetcher(host_iter, size, mesh, batch_spec)
