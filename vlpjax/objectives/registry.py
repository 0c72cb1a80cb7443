"""Objectives registered by name, with what each one needs, and the input checks they share.

An objective is a pure, jit-traceable function

    loss(ctx, batch) -> (loss: f32[], metrics: dict[str, f32[]])

where `ctx` carries the features computed once per step (see `vlpjax/objectives/context.py`)
and `batch` is the dict of global batch arrays. The train step looks objectives up here by the
names listed in the config and sums `weight * loss`.

Registration also declares what the objective needs from the rest of the system, each as a
value or as a function of the objective's own config (`config.objectives.<name>`):

  heads          model heads it calls (checked against `config.model.heads` before compute);
  needs_teacher  whether it reads the EMA teacher (`config.teacher.momentum > 0` required);
  init_state     (cfg, model_config, rng) -> pytree | None: state the objective owns (e.g. a
                 feature queue), created with the train state, checkpointed with it and
                 handed back as `ctx.state` each step;
  update_state   (ctx, batch, state) -> new state, run inside the step after the losses, with
                 the step's cached features (no gradient flows through it);
  check          (cfg, config) -> None: config checks that need the whole config (e.g. the
                 queue length against the global batch), run by `config_lib.validate`.
"""
import dataclasses
from typing import Any, Callable, Iterable, Mapping

import ml_collections

Objective = Callable[..., tuple]


@dataclasses.dataclass(frozen=True)
class ObjectiveDef:
  """An objective and its declared needs (see the module docstring)."""
  name: str
  loss: Objective
  heads: Any = ()
  needs_teacher: Any = False
  init_state: Callable | None = None
  update_state: Callable | None = None
  check: Callable | None = None

  def required_heads(self, cfg) -> tuple[str, ...]:
    return tuple(self.heads(cfg) if callable(self.heads) else self.heads)

  def wants_teacher(self, cfg) -> bool:
    return bool(self.needs_teacher(cfg) if callable(self.needs_teacher) else self.needs_teacher)

  def __call__(self, ctx, batch):
    return self.loss(ctx, batch)


_REGISTRY: dict[str, ObjectiveDef] = {}


def register(name: str, *, heads: Any = (), needs_teacher: Any = False,
             init_state: Callable | None = None, update_state: Callable | None = None,
             check: Callable | None = None):
  """Decorator: registers a loss function under `name`; registering a name twice is an error.

  Returns the function itself, so modules and tests keep calling it directly.
  """

  def wrap(loss: Objective) -> Objective:
    definition = ObjectiveDef(name, loss, heads, needs_teacher, init_state, update_state, check)
    if name in _REGISTRY and _REGISTRY[name].loss is not loss:
      raise ValueError(f"objective {name!r} is registered twice")
    _REGISTRY[name] = definition
    return loss

  return wrap


def names() -> list[str]:
  """Sorted names of all registered objectives."""
  return sorted(_REGISTRY)


def definition(name: str) -> ObjectiveDef:
  """The `ObjectiveDef` registered under `name`; KeyError listing the known names otherwise."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown objective {name!r}; known objectives: {', '.join(names())}")
  return _REGISTRY[name]


def get(name: str) -> Objective:
  """The loss function registered under `name`; KeyError listing the known names otherwise."""
  return definition(name).loss


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


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """One configured objective: its name, weight and config (`config.objectives.<name>`)."""
  name: str
  weight: float
  cfg: ml_collections.ConfigDict

  @property
  def definition(self) -> ObjectiveDef:
    return definition(self.name)


def objective_specs(objectives_cfg) -> list[ObjectiveSpec]:
  """`config.objectives` = {name: {weight: w, ...settings}} -> specs of the non-zero weights;
  unknown names fail naming the known ones."""
  specs = []
  for name, cfg in objectives_cfg.items():
    definition(name)  # raises KeyError naming the objective
    cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    weight = float(cfg.get("weight", 1.0))
    if weight != 0.0:
      specs.append(ObjectiveSpec(name, weight, cfg))
  return specs
