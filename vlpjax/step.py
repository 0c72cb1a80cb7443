"""The sharded train step: (state, batch) -> (state, metrics), built once per stage.

Inside one step, in ALBEF's order:
  1. fold the step into the rng; ramp the distillation weight alpha;
  2. EMA update from the *pre-step* params: ema <- m * ema + (1 - m) * params;
  3. value_and_grad of sum(weight * objective(ctx)) over the configured objectives, where the
     teacher inside ctx uses the updated EMA params;
  4. optimizer update; temperature clipped back into [temp_min, temp_max];
  5. enqueue the EMA ITC features of the global batch (and their image ids).
The function is `jax.jit`-ed with the state's shardings in and out and `donate_argnums=0`;
contrastive negatives are global because the batch is a global array sharded over
(data, fsdp): XLA inserts the gathers.
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlpjax import sharding as sharding_lib
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry
from vlpjax.state import TrainState


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  name: str
  weight: float
  cfg: ml_collections.ConfigDict


def objective_specs(objectives_cfg: ml_collections.ConfigDict) -> list[ObjectiveSpec]:
  """`config.objectives` = {name: {weight: w, ...objective settings}} -> specs; unknown names fail."""
  specs = []
  for name, cfg in objectives_cfg.items():
    registry.get(name)  # raises KeyError naming the objective
    cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    weight = float(cfg.get("weight", 1.0))
    if weight != 0.0:
      specs.append(ObjectiveSpec(name, weight, cfg))
  return specs


def ema_update(ema_params: Any, params: Any, momentum: float) -> Any:
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)


def enqueue(queues: dict, image_feat: jax.Array, text_feat: jax.Array, image_id: jax.Array) -> dict:
  """Writes the batch rows at `ptr` (queue size is a multiple of the global batch)."""
  ptr = queues["ptr"]
  size = queues["image"].shape[0]
  return dict(
      image=jax.lax.dynamic_update_slice(queues["image"], image_feat.astype(queues["image"].dtype), (ptr, 0)),
      text=jax.lax.dynamic_update_slice(queues["text"], text_feat.astype(queues["text"].dtype), (ptr, 0)),
      idx=jax.lax.dynamic_update_slice(queues["idx"], image_id.astype(jnp.int32), (ptr,)),
      ptr=(ptr + image_feat.shape[0]) % size)


def clip_temperature(params: Any, lo: float, hi: float) -> Any:
  if "temp" not in params:
    return params
  return {**params, "temp": jnp.clip(params["temp"], lo, hi)}


def make_loss_fn(model: nn.Module, specs: Sequence[ObjectiveSpec], *, num_groups: int):
  """Returns loss(params, ema_params, queues, batch, rng, step, alpha) -> (total, (metrics, ctx cache))."""

  def loss_fn(params, ema_params, queues, batch, rng, step, alpha):
    ctx = context_lib.Context(model=model, params=params, ema_params=ema_params, queues=queues, batch=batch,
                              rng=rng, step=step, alpha=alpha, num_groups=num_groups)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for spec in specs:
      loss, terms = registry.get(spec.name)(ctx.with_cfg(spec.cfg), batch)
      total = total + spec.weight * loss
      metrics.update({f"{spec.name}/{k}": v for k, v in terms.items()})
      metrics[f"{spec.name}/loss"] = loss
    metrics["loss"] = total
    return total, (metrics, ctx)

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, *,
                    mesh: Mesh, rules: tuple, state_shardings: TrainState,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    objectives_cfg: ml_collections.ConfigDict | None = None,
                    alpha_ramp_steps: int | None = None):
  """Builds the jitted step for one stage. Returns `step(state, batch) -> (state, metrics)`.

  The returned callable enters the mesh and logical-axis-rule contexts around the jitted
  function; `step.jitted` is the raw `jax.jit` object (for `.lower(...).compile()`).
  """
  specs = objective_specs(objectives_cfg if objectives_cfg is not None else config.objectives)
  if not specs:
    raise ValueError("config.objectives has no objective with a non-zero weight")
  num_groups = sharding_lib.num_batch_shards(mesh)
  momentum = float(config.get("momentum", 0.995))
  alpha_max = float(config.get("alpha", 0.4))
  ramp_steps = int(config.get("alpha_ramp_steps", 0) if alpha_ramp_steps is None else alpha_ramp_steps)
  queue_size = int(config.get("queue_size", 0))
  model_cfg = model.config
  loss_fn = make_loss_fn(model, specs, num_groups=num_groups)
  wants_queue = queue_size > 0 and any(s.name == "itc" for s in specs)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    ema_params = ema_update(state.ema_params, state.params, momentum)
    alpha = context_lib.alpha_at(state.step, alpha_max, ramp_steps)

    def scalar_loss(params):
      total, (metrics, ctx) = loss_fn(params, ema_params, state.queues, batch, rng, state.step, alpha)
      queue_rows = (ctx.ema_image_feat, ctx.ema_text_feat) if wants_queue else None
      return total, (metrics, queue_rows)

    (_, (metrics, queue_rows)), grads = jax.value_and_grad(scalar_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = clip_temperature(params, model_cfg.temp_min, model_cfg.temp_max)
    queues = state.queues
    if queue_rows is not None:
      queues = enqueue(queues, *queue_rows, batch["image_id"])
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   alpha=alpha)
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                              queues=queues)
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


def check_queue(queue_size: int, global_batch: int):
  if queue_size and queue_size % global_batch:
    raise ValueError(f"config.queue_size={queue_size} must be a multiple of the global batch "
                     f"config.batch_size={global_batch} (queue rows are written one batch at a time)")
