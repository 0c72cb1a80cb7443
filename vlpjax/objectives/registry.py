"""Objectives registered by name, and the input checks they share.

An objective is a pure, jit-traceable function

    loss(ctx, batch) -> (loss: f32[], metrics: dict[str, f32[]])

where `ctx` carries the features computed once per step (see `vlpjax/objectives/context.py`)
and `batch` is the dict of global batch arrays. The train step looks objectives up here by the
names listed in the config and sums `weight * loss`.
"""
from typing import Callable, Iterable, Mapping

Objective = Callable[..., tuple]

_REGISTRY: dict[str, Objective] = {}


def register(name: str):
  """Decorator: registers an objective under `name`; registering a name twice is an error."""

  def wrap(objective: Objective) -> Objective:
    if name in _REGISTRY and _REGISTRY[name] is not objective:
      raise ValueError(f"objective {name!r} is registered twice")
    _REGISTRY[name] = objective
    return objective

  return wrap


def names() -> list[str]:
  """Sorted names of all registered objectives."""
  return sorted(_REGISTRY)


def get(name: str) -> Objective:
  """The objective registered under `name`; KeyError listing the known names otherwise."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown objective {name!r}; known objectives: {', '.join(names())}")
  return _REGISTRY[name]


def require_batch_keys(batch: Mapping, keys: Iterable[str], objective: str) -> None:
  """Raises KeyError naming the objective and every key in `keys` missing from `batch`.

  Called at trace time, so it costs nothing inside `jax.jit`.
  """
  missing = [key for key in keys if key not in batch]
  if missing:
    raise KeyError(
        f"objective {objective!r} needs batch keys {missing}; the batch has {sorted(batch)}")


def choice(cfg, key: str, default: str, allowed: tuple[str, ...], objective: str) -> str:
  """Reads the string setting `cfg.<key>` and checks it is one of `allowed`."""
  value = cfg.get(key, default)
  if value not in allowed:
    raise ValueError(
        f"objective {objective!r}: config field {key!r} is {value!r}; expected one of {allowed}")
  return value
