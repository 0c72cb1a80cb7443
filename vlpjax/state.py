"""TrainState and its creation straight into its sharding.

The state is created abstractly (`jax.eval_shape`), its shardings are derived from the logical
axis names on the params, and `jax.jit(init, out_shardings=...)` materialises every leaf directly
on the devices that own it: nothing is ever built replicated first.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlpjax import sharding as sharding_lib
from vlpjax.models import layers, vlp


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer steps taken (over all stages)
  params: Any           # online (student) params
  opt_state: Any
  ema_params: Any       # momentum (teacher) params, same tree as params
  queues: dict          # image [Q,E], text [Q,E] (unit rows), idx [Q] int32 (-1 = empty), ptr int32
  rng: jax.Array        # raw uint32 [2] key; the step folds `step` into it


def init_queues(rng: jax.Array, queue_size: int, embed_dim: int) -> dict:
  """ALBEF initialises the feature queues with random unit vectors; ids start empty (-1).

  Without a queue only the pointer is kept (Orbax cannot save zero-size arrays); the Context
  then presents empty [0, E] queues to the objectives.
  """
  if queue_size == 0:
    return dict(ptr=jnp.zeros((), jnp.int32))
  image_rng, text_rng = jax.random.split(rng)
  return dict(
      image=layers.l2_normalize(jax.random.normal(image_rng, (queue_size, embed_dim))),
      text=layers.l2_normalize(jax.random.normal(text_rng, (queue_size, embed_dim))),
      idx=jnp.full((queue_size,), -1, jnp.int32),
      ptr=jnp.zeros((), jnp.int32))


def _init_boxed_params(model: vlp.VLPModel, rng: jax.Array):
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, *vlp.init_inputs(model.config))
  return variables["params"]


def make_init_fn(model: vlp.VLPModel, tx: optax.GradientTransformation, queue_size: int):
  """Returns a pure `init(rng) -> TrainState` (params, EMA = copy of params, fresh queues)."""

  def init(rng):
    rng = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    params_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    params = nn.unbox(_init_boxed_params(model, params_rng))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        queues=init_queues(queue_rng, queue_size, model.config.embed_dim),
        rng=state_rng)

  return init


def abstract_state(model: vlp.VLPModel, tx: optax.GradientTransformation, queue_size: int,
                   mesh: Mesh, rules: tuple) -> tuple[TrainState, TrainState]:
  """Returns (abstract state with shardings attached, tree of NamedShardings)."""
  rng = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda r: _init_boxed_params(model, r), rng)
  param_shardings = sharding_lib.logical_to_shardings(boxed, mesh, rules)
  shapes = jax.eval_shape(make_init_fn(model, tx, queue_size), rng)
  replicated = sharding_lib.replicated(mesh)
  shardings = TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=sharding_lib.like_params(shapes.opt_state, param_shardings, mesh),
      ema_params=param_shardings,
      queues=jax.tree.map(lambda _: replicated, shapes.queues),
      rng=replicated)
  with_shardings = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, shardings)
  return with_shardings, shardings


def create_state(model: vlp.VLPModel, tx: optax.GradientTransformation, queue_size: int,
                 shardings: TrainState, rng: jax.Array) -> TrainState:
  """Materialises a fresh state directly into `shardings`."""
  return jax.jit(make_init_fn(model, tx, queue_size), out_shardings=shardings)(rng)
