"""TrainState, its one setup path (`setup_state`), and its creation straight into its sharding.

The state is created abstractly (`jax.eval_shape`), its shardings are derived from the logical
axis names on the params, and `jax.jit(init, out_shardings=...)` materialises every leaf directly
on the devices that own it: nothing is ever built replicated first.

What the state holds follows the config: EMA (teacher) params only when `config.teacher.momentum`
> 0, and one entry of `objective_state` per configured objective that declares state (e.g. ITC's
feature queue), initialised, checkpointed and updated by that objective.
"""
import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlpjax import config_lib
from vlpjax import optim
from vlpjax import sharding as sharding_lib
from vlpjax import stages as stages_lib
from vlpjax.models import vlp
from vlpjax.objectives import registry


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 scalar: optimizer steps taken (over all stages)
  params: Any             # online (student) params
  opt_state: Any
  ema_params: Any         # momentum (teacher) params, same tree as params; None without a teacher
  objective_state: dict   # objective name -> the state it owns (e.g. itc: image/text/idx queue, ptr)
  rng: jax.Array          # raw uint32 [2] key; the step folds `step` into it


def _init_boxed_params(model: vlp.VLPModel, rng: jax.Array):
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, *vlp.init_inputs(model.config))
  return variables["params"]


def abstract_params(model: vlp.VLPModel) -> Any:
  """Shapes and dtypes of the model's params (no computation)."""
  return nn.unbox(jax.eval_shape(lambda r: _init_boxed_params(model, r), jax.random.PRNGKey(0)))


def init_objective_state(specs, model_config, rng: jax.Array) -> dict:
  """{name: state} of the objectives that declare state (entries that would be None are left out)."""
  out = {}
  for spec in specs:
    init = spec.definition.init_state
    if init is None:
      continue
    value = init(spec.cfg, model_config, jax.random.fold_in(rng, _name_seed(spec.name)))
    if value is not None:
      out[spec.name] = value
  return out


def _name_seed(name: str) -> int:
  import zlib
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_init_fn(model: vlp.VLPModel, tx: optax.GradientTransformation, objective_specs=(),
                 with_teacher: bool = True):
  """Returns a pure `init(rng) -> TrainState` (params, EMA = copy of params, objective state)."""

  def init(rng):
    rng = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    params_rng, objectives_rng, state_rng = jax.random.split(rng, 3)
    params = nn.unbox(_init_boxed_params(model, params_rng))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if with_teacher else None,
        objective_state=init_objective_state(objective_specs, model.config, objectives_rng),
        rng=state_rng)

  return init


def abstract_state(model: vlp.VLPModel, tx: optax.GradientTransformation, objective_specs, with_teacher: bool,
                   mesh: Mesh, rules: tuple) -> tuple[TrainState, TrainState]:
  """Returns (abstract state with shardings attached, tree of NamedShardings)."""
  rng = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda r: _init_boxed_params(model, r), rng)
  param_shardings = sharding_lib.logical_to_shardings(boxed, mesh, rules)
  shapes = jax.eval_shape(make_init_fn(model, tx, objective_specs, with_teacher), rng)
  replicated = sharding_lib.replicated(mesh)
  shardings = TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=sharding_lib.like_params(shapes.opt_state, param_shardings, mesh),
      ema_params=param_shardings if with_teacher else None,
      objective_state=jax.tree.map(lambda _: replicated, shapes.objective_state),
      rng=replicated)
  with_shardings = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, shardings)
  return with_shardings, shardings


def create_state(model: vlp.VLPModel, tx: optax.GradientTransformation, objective_specs, with_teacher: bool,
                 shardings: TrainState, rng: jax.Array) -> TrainState:
  """Materialises a fresh state directly into `shardings`."""
  return jax.jit(make_init_fn(model, tx, objective_specs, with_teacher), out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------- one setup path


def all_objective_specs(config: ml_collections.ConfigDict) -> list[registry.ObjectiveSpec]:
  """The objectives of every stage (first occurrence of each name): the state holds what any
  stage's objectives own, so it keeps one structure over the whole run."""
  seen, specs = set(), []
  sources = [config.objectives] + [s.get("objectives") for s in (config.get("stages") or ()) if s.get("objectives")]
  for objectives_cfg in sources:
    for spec in registry.objective_specs(objectives_cfg):
      if spec.name not in seen:
        seen.add(spec.name)
        specs.append(spec)
  return specs


@dataclasses.dataclass
class StateSetup:
  """Everything one stage's state is built from, derived from the config in one place.

  Attributes: model, stages (all), stage_index, tx and schedule (this stage's optimizer),
  objective_specs (this stage's), teacher (`config_lib.teacher_settings`, or None), abstract
  (state shapes with shardings, the restore target), shardings, mesh, rules, total_steps,
  steps_per_epoch.
  """
  model: vlp.VLPModel
  stages: list
  stage_index: int
  tx: optax.GradientTransformation
  schedule: Any
  objective_specs: list
  state_objective_specs: list
  teacher: Optional[dict]
  abstract: TrainState
  shardings: TrainState
  mesh: Mesh
  rules: tuple
  total_steps: int
  steps_per_epoch: int

  def create(self, seed: int) -> TrainState:
    """A fresh state (params initialised from `seed`) directly in its shardings."""
    return create_state(self.model, self.tx, self.state_objective_specs, self.teacher is not None,
                        self.shardings, jax.random.PRNGKey(int(seed)))

  def for_stage(self, stage_index: int) -> "StateSetup":
    """The setup of another stage of the same run (its optimizer; same model and state layout)."""
    return _setup(self.model, self.stages, stage_index, self.mesh, self.rules, self._config,
                  self.total_steps, self.steps_per_epoch)


def setup_state(config: ml_collections.ConfigDict, mesh: Mesh, stage_index: int = 0,
                model: Optional[vlp.VLPModel] = None) -> StateSetup:
  """The model, stage `stage_index`'s optimizer and the abstract state + shardings of `config`.

  Used by every start path of the trainer (fresh, resume, init_from), by `vlpjax.evaluate`, the
  tests and the benchmarks.
  """
  model = model or vlp.build_model(config.model)
  rules = sharding_lib.logical_rules(config.sharding.rules)
  steps_per_epoch = config_lib.steps_per_epoch(config)
  stages = stages_lib.stages_of(config, config_lib.total_steps(config))
  return _setup(model, stages, stage_index, mesh, rules, config, stages_lib.total_steps(stages), steps_per_epoch)


def _setup(model, stages, stage_index, mesh, rules, config, total_steps, steps_per_epoch) -> StateSetup:
  stage = stages[stage_index]
  optim_cfg = ml_collections.ConfigDict(config.optim.to_dict())
  if stage.get("freeze") is not None:
    optim_cfg.freeze = tuple(stage.freeze)
  tx, schedule = optim.make_optimizer(optim_cfg, params=abstract_params(model), total_steps=total_steps,
                                      steps_per_epoch=steps_per_epoch)
  teacher = config_lib.teacher_settings(config, steps_per_epoch)
  state_specs = all_objective_specs(config)
  abstract, shardings = abstract_state(model, tx, state_specs, teacher is not None, mesh, rules)
  setup = StateSetup(model=model, stages=stages, stage_index=stage_index, tx=tx, schedule=schedule,
                     objective_specs=registry.objective_specs(stages_lib.stage_objectives(config, stage)),
                     state_objective_specs=state_specs, teacher=teacher, abstract=abstract, shardings=shardings,
                     mesh=mesh, rules=rules, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  setup._config = config
  return setup
