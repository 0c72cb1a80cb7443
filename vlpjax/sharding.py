"""Device mesh, logical-axis rule presets and shardings for params, state and batches.

The mesh always has the three axes (`data`, `fsdp`, `tensor`); a preset maps the logical names
that params and activations carry to those axes:

  dp       batch over data x fsdp; every param replicated.
  fsdp     batch over data x fsdp; params sharded over `fsdp` along their `embed` axis.
  fsdp_tp  as fsdp, plus `mlp` / `heads` / `vocab` axes over `tensor` (Megatron-style).

A param dimension that the mesh axes do not divide evenly stays replicated (tiny test models).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES = {
    "dp": (("batch", BATCH_AXES),),
    "fsdp": (("batch", BATCH_AXES), ("embed", "fsdp")),
    "fsdp_tp": (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                ("vocab", "tensor")),
}


def logical_rules(preset: str) -> tuple:
  if preset not in RULES:
    raise ValueError(f"config.sharding.rules must be one of {sorted(RULES)}, got {preset!r}")
  # Names without a rule (length, kv, ...) are unsharded.
  return RULES[preset]


def make_mesh(mesh_shape: dict, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry may be -1 (= all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(mesh_shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown} in config.sharding.mesh; axes are {MESH_AXES}")
  sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("config.sharding.mesh: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if -1 not in [int(mesh_shape.get(a, 1)) for a in MESH_AXES] and int(np.prod(sizes)) < len(devices):
    # A fully specified smaller mesh uses the first devices (e.g. restoring onto 4 of 8).
    devices = devices[:int(np.prod(sizes))]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  try:
    device_array = mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _fit(spec: P, shape: tuple, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules: tuple) -> Any:
  """Boxed (nn.Partitioned) abstract params -> tree of NamedShardings for the unboxed tree."""
  logical_specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def like_params(tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that embeds copies of the params tree (optimizer state, EMA).

  A leaf whose key path ends with a param's key path and has that param's shape gets the
  param's sharding; everything else (counts, scalars) is replicated.
  """
  by_path = {}
  for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    by_path[_keys(path)] = sharding
  max_len = max((len(k) for k in by_path), default=0)

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if len(suffix) > max_len:
        continue
      if suffix in by_path:
        sharding = by_path[suffix]
        if len(sharding.spec) <= len(getattr(leaf, "shape", ())):
          return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def _keys(path) -> tuple:
  out = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(getattr(entry, attr))
        break
  return tuple(out)

