"""The sharded train step: (state, batch) -> (state, metrics), built once per stage.

Inside one step, in ALBEF's order:
  1. fold the step into the rng;
  2. with a teacher (`config.teacher.momentum` > 0): ramp the distillation weight alpha, and
     update the EMA from the *pre-step* params: ema <- m * ema + (1 - m) * params;
  3. value_and_grad of sum(weight * objective(ctx)) over the stage's objectives, where the
     teacher inside ctx uses the updated EMA params; then each objective that owns state
     (e.g. ITC's queue) updates it from the step's cached features (no gradient);
  4. optimizer update; the model keeps its params in range (`constrain_params`: ALBEF's
     temperature clamp).
The function is `jax.jit`-ed with the state's shardings in and out and `donate_argnums=0`;
contrastive negatives are global because the batch is a global array sharded over
(data, fsdp): XLA inserts the gathers. A batch may be a nested dict (several input streams):
every leaf has the global batch as its leading axis.
"""
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlpjax import sharding as sharding_lib
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry
from vlpjax.state import TrainState


def ema_update(ema_params, params, momentum: float):
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)


def make_loss_fn(model: nn.Module, specs: Sequence[registry.ObjectiveSpec], *, num_groups: int):
  """Returns loss(params, ema_params, objective_state, batch, rng, step, alpha)
  -> (total, (metrics, new objective state))."""

  def loss_fn(params, ema_params, objective_state, batch, rng, step, alpha):
    ctx = context_lib.Context(model=model, params=params, ema_params=ema_params, objective_state=objective_state,
                              batch=batch, rng=rng, step=step, alpha=alpha, num_groups=num_groups)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for spec in specs:
      loss, terms = spec.definition.loss(ctx.with_cfg(spec.cfg, spec.name), batch)
      total = total + spec.weight * loss
      metrics.update({f"{spec.name}/{k}": v for k, v in terms.items()})
      metrics[f"{spec.name}/loss"] = loss
    metrics["loss"] = total
    new_state = {}
    for spec in specs:
      update = spec.definition.update_state
      if update is not None and objective_state.get(spec.name) is not None:
        view = ctx.with_cfg(spec.cfg, spec.name)
        new_state[spec.name] = jax.lax.stop_gradient(update(view, batch, objective_state[spec.name]))
    return total, (metrics, new_state)

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, mesh: Mesh, rules: tuple,
                    state_shardings: TrainState, objective_specs: Sequence[registry.ObjectiveSpec],
                    teacher: dict | None, schedule: Callable[[jax.Array], jax.Array] | None = None):
  """Builds the jitted step for one stage. Returns `step(state, batch) -> (state, metrics)`.

  `teacher`: dict(momentum, alpha, alpha_ramp_steps) (`config_lib.teacher_settings`) or None.
  The returned callable enters the mesh and logical-axis-rule contexts around the jitted
  function; `step.jitted` is the raw `jax.jit` object (for `.lower(...).compile()`).
  """
  specs = list(objective_specs)
  if not specs:
    raise ValueError("config.objectives has no objective with a non-zero weight")
  loss_fn = make_loss_fn(model, specs, num_groups=sharding_lib.num_batch_shards(mesh))

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    ema_params, alpha = None, jnp.zeros((), jnp.float32)
    if teacher is not None:
      ema_params = ema_update(state.ema_params, state.params, teacher["momentum"])
      alpha = context_lib.alpha_at(state.step, teacher["alpha"], teacher["alpha_ramp_steps"])

    def scalar_loss(params):
      return loss_fn(params, ema_params, state.objective_state, batch, rng, state.step, alpha)

    (_, (metrics, new_objective_state)), grads = jax.value_and_grad(scalar_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = model.constrain_params(optax.apply_updates(state.params, updates))
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    if teacher is not None:
      metrics["alpha"] = alpha
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                              objective_state={**state.objective_state, **new_objective_state})
    return new_state, metrics

  replicated = sharding_lib.replicated(mesh)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)

  def step(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch)

  def lower(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, batch)

  step.jitted = jitted
  step.lower = lower
  return step


def train_step_for(setup) -> Callable:
  """The jitted step of a `state.StateSetup` (its stage's objectives, optimizer and teacher)."""
  return make_train_step(setup.model, setup.tx, mesh=setup.mesh, rules=setup.rules,
                         state_shardings=setup.shardings, objective_specs=setup.objective_specs,
                         teacher=setup.teacher, schedule=setup.schedule)
