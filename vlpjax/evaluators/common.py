"""What every evaluator shares: placing params and batches on the mesh, the batch-size checks,
the fixed-size padded loops, and the `Evaluator` base class (data and jitted functions built once).

Placement rules (so that evaluating inside a training run costs no resharding):
  params   stay where they are when they already live on the mesh's devices, in whatever sharding
           (the training sharding: FSDP-sharded params are gathered inside the jitted computation,
           never as a replicated copy); host arrays, or arrays on other devices, are put once per
           evaluation, replicated.
  batches  are split over the mesh's batch axes (`sharding.batch_sharding`).
  constant operands every device reads (VQA's candidate answers, the retrieval states the ITM
           rerank gathers from) are put replicated, once.
  results  the host reads back are constrained replicated inside the jitted function, so every
           process can read them.
Without a mesh everything stays on the default device and batches go as host arrays.
"""
import functools
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlpjax import sharding as sharding_lib


def check_divisible(size: int, mesh: Optional[Mesh], what: str) -> None:
  """ValueError naming `what` unless `size` splits evenly over the mesh's batch shards."""
  if mesh is not None and int(size) % sharding_lib.num_batch_shards(mesh):
    raise ValueError(f"{what}={size} is not divisible by the {sharding_lib.num_batch_shards(mesh)} batch "
                     "shards of the mesh")


def put_batch(value, mesh: Optional[Mesh]):
  """One batch array [B, ...]: its leading axis over the mesh's batch axes (host array without a mesh)."""
  value = np.asarray(value)
  if mesh is None:
    return value
  return jax.device_put(value, sharding_lib.batch_sharding(mesh, value.ndim))


def chunk_rows_sharding(mesh: Mesh) -> NamedSharding:
  """[chunks, chunk]: every row split over the batch axes, as a batch [chunk] is."""
  return NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES))


def put_replicated(tree, mesh: Optional[Mesh]):
  """A tree every device reads whole: replicated over the mesh (the default device without one)."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, sharding_lib.replicated(mesh))


def replicate_output(tree, mesh: Optional[Mesh]):
  """Inside a jitted function: constrains results the host reads back to be replicated."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, sharding_lib.replicated(mesh))


def settle(value):
  """`value` (a tree of jax.Arrays), first waited for when it spans several CPU devices.

  The evaluation loops dispatch one small program per batch without waiting. On XLA:CPU every
  device's share of a program runs on one shared thread pool, and many such programs in flight
  whose collectives (e.g. the all-gathers of FSDP-sharded params) wait on each other can leave a
  rendezvous that never completes (seen with 8 simulated devices: "Expected 8 threads to join
  the rendezvous"). One program at a time costs a CPU nothing; accelerators keep the pipelining.
  """
  leaves = jax.tree.leaves(value)
  devices = leaves[0].sharding.device_set if leaves and isinstance(leaves[0], jax.Array) else set()
  if len(devices) > 1 and next(iter(devices)).platform == "cpu":
    jax.block_until_ready(value)
  return value


def with_replicated_outputs(fn: Callable, mesh: Optional[Mesh]) -> Callable:
  """`fn` whose results are constrained replicated (for jitting; keeps `fn`'s name in compile logs)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    return replicate_output(fn(*args, **kwargs), mesh)

  return wrapped


def place_params(params, mesh: Optional[Mesh]):
  """Params ready for the jitted evaluator functions, moved only where they have to be.

  A leaf that is a jax.Array on exactly the mesh's devices (without a mesh: any jax.Array) is
  kept as it is, sharding included. Every other leaf (host arrays, arrays on other devices) is
  put replicated on the mesh (without a mesh: on the default device), once per evaluation, so
  the per-batch calls do not each copy it.
  """
  mesh_devices = set(mesh.devices.flat) if mesh is not None else None

  def on_mesh(leaf) -> bool:
    if not isinstance(leaf, jax.Array):
      return False
    return mesh_devices is None or set(leaf.sharding.device_set) == mesh_devices

  leaves, treedef = jax.tree.flatten(params)
  moved = [i for i, leaf in enumerate(leaves) if not on_mesh(leaf)]
  if moved:
    placed = put_replicated([leaves[i] for i in moved], mesh)
    for i, leaf in zip(moved, placed):
      leaves[i] = leaf
  return jax.tree.unflatten(treedef, leaves)


def require_keys(batch: dict, keys: Sequence[str], what: str) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"{what}: eval batch lacks {missing}; it has {sorted(batch)}")


def device_batches(batches: Iterable[dict], keys: Optional[Sequence[str]], mesh: Optional[Mesh], what: str, *,
                   host_keys: Sequence[str] = (), exclude: Sequence[str] = (), optional: Sequence[str] = (),
                   size_name: str = "eval batch size") -> Iterator[tuple[dict, dict]]:
  """(inputs, batch) for each fixed-size padded batch: the model inputs put with the batch sharding.

  Args:
    batches: dicts of [B, ...] arrays with `valid` bool [B] (False on padding rows).
    keys: the model inputs; None = every key of the batch but `valid`, `host_keys` and `exclude`.
    mesh: optional; inputs are split over its batch axes (B must divide).
    what: names the evaluation in errors.
    host_keys: keys every batch must have that stay on the host (labels, split ids).
    exclude: keys that are not model inputs (used with keys=None).
    optional: model inputs put when the batch has them (e.g. ViCHA's concept ids).
    size_name: names the batch size in errors.

  Yields:
    (inputs, batch): inputs on device (host arrays without a mesh); the host batch comes along
    for the rows' bookkeeping (valid, index, labels).

  Raises:
    KeyError naming the missing keys; ValueError when B does not divide over the mesh.
  """
  for batch in batches:
    require_keys(batch, (*(keys or ()), *host_keys, "valid"), what)
    check_divisible(len(batch["valid"]), mesh, size_name)
    skip = {"valid", *host_keys, *exclude}
    names = keys if keys is not None else [k for k in batch if k not in skip]
    names = [*names, *(k for k in optional if k in batch and k not in names)]
    yield {k: put_batch(batch[k], mesh) for k in names}, batch


def padded_chunks(arrays: Sequence[np.ndarray], chunk: int) -> tuple[int, Iterator[list[np.ndarray]]]:
  """Splits equally long 1-D arrays into `chunk`-row pieces, the last padded with zeros.

  Returns:
    (count, chunks): the number of chunks ceil(n / chunk) and an iterator over them (each a list
    of arrays [chunk], one per input). Every chunk has the same shape, so a jitted function over
    them compiles once whatever n is. Rows past n are 0 (for index arrays: row 0, a valid index);
    their results are to be dropped.
  """
  total = len(arrays[0]) if arrays else 0
  count = -(-total // chunk)
  padded = [np.pad(np.asarray(a), (0, count * chunk - total)) for a in arrays]
  return count, ([a[s:s + chunk] for a in padded] for s in range(0, count * chunk, chunk))


class Evaluator:
  """Base of the per-kind evaluators: `Evaluator(config, model, mesh)(params) -> metrics`.

  The constructor checks the settings and builds the eval data (unless `data` is given) and the
  jitted functions; every call reuses both, so repeated evaluations in a run compile nothing new
  (the functions see the same shapes every time). Subclasses implement `make_functions` (checks
  the settings; name -> jitted function, kept as `functions` for compile counting),
  `make_data`, `evaluate(params)` and, optionally, `prepare` (after the data: checks it against
  the model, puts constant operands on device).

  Attributes:
    config: the run config (`config.eval` is this evaluator's block); model; mesh (or None).
    data: the eval data.
  """

  def __init__(self, config, model, mesh: Optional[Mesh] = None, *, data: Any = None):
    self.config = config
    self.model = model
    self.mesh = mesh
    self.batch_size = int(config.eval.batch_size)
    check_divisible(self.batch_size, mesh, "config.eval.batch_size")
    # Settings are checked (and functions wrapped) before the data is read, so a bad setting
    # fails at once, and a missing eval file at start-up rather than at the first evaluation.
    self.functions: dict[str, Callable] = self.make_functions()
    self.data = data if data is not None else self.make_data()
    self.prepare()

  def make_functions(self) -> dict[str, Callable]:
    """Checks the settings; returns the jitted functions (name -> function)."""
    raise NotImplementedError

  def make_data(self):
    raise NotImplementedError

  def prepare(self) -> None:
    """Checks the data against the model and puts constant operands on device (optional)."""

  def evaluate(self, params) -> dict[str, float]:
    """Metrics of params already placed by `place_params`."""
    raise NotImplementedError

  def __call__(self, params) -> dict[str, float]:
    """Metrics of `params` on the eval split (params placed by `place_params`)."""
    return self.evaluate(place_params(params, self.mesh))
