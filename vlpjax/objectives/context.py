"""The per-step context every objective reads: bound model calls and features computed once.

Features are registered by name (`@feature("name")`, here for the shared ones and beside the
objectives for theirs) and resolved on first access as `ctx.<name>`, then cached for the step:
an objective pays only for what it reads, and two objectives that read the same feature (ITC
and ITM both read `itc_sims`) share one computation. Teacher (EMA) features are under
`stop_gradient`.

Shared features (B = global batch):
  image, text                 student encodings of the clean pair (`encode_image` honours the
                              model's extra image-side tokens, e.g. visual concepts)
  image_feat, text_feat       student ITC features [B, E]
  temp                        the model's (clamped) ITC temperature
  ema_image, ema_text, ema_image_feat, ema_text_feat   the teacher's (needs a teacher)
  masked_image                student image encoding with `patch_mask` applied
  masked_fusion               student fusion of (`mlm_ids`, masked image)
  ema_masked_fusion           teacher fusion of (`mlm_ids`, clean image): MLM distillation targets
  ema_clean_fusion            teacher fusion of the clean pair, per layer (MAMO's target)
"""
import copy
import functools
import inspect
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

_FEATURES: dict[str, Callable] = {}


def feature(name: str):
  """Decorator: registers `fn(ctx) -> value` as the context feature `ctx.<name>`."""

  def wrap(fn):
    if name in _FEATURES and _FEATURES[name] is not fn:
      raise ValueError(f"context feature {name!r} is registered twice")
    _FEATURES[name] = fn
    return fn

  return wrap


def feature_names() -> list[str]:
  return sorted(_FEATURES)


class ModelFns:
  """A model bound to one set of params, with dropout on (student) or off (teacher).

  Any method of the model is available as an attribute (`fns.fuse(...)`, `fns.mlm_logits(...)`,
  task methods such as `fns.answer_logits(...)`); its outputs pass through this side's
  stop-gradient, and methods that take `deterministic` get this side's value unless the call
  gives one. `fns.apply(fn, ...)` also takes a function `fn(module, ...)` (heads registered
  outside the model class).
  """

  def __init__(self, model: nn.Module, params: Any, dropout_rng: Optional[jax.Array], stop_gradient: bool):
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    self._bound = model.bind({"params": params}, rngs=rngs)
    self._deterministic = dropout_rng is None
    self._sg = jax.lax.stop_gradient if stop_gradient else (lambda x: x)

  @property
  def deterministic(self) -> bool:
    """True for the teacher (no dropout)."""
    return self._deterministic

  @property
  def config(self):
    return self._bound.config

  def _call(self, fn, args, kwargs):
    if "deterministic" not in kwargs and _takes_deterministic(fn):
      kwargs = dict(kwargs, deterministic=self._deterministic)
    return jax.tree.map(self._sg, fn(*args, **kwargs))

  def apply(self, method, *args, **kwargs):
    """Calls a model method (by name) or `method(module, ...)`, with this side's stop-gradient."""
    if isinstance(method, str):
      return self._call(getattr(self._bound, method), args, kwargs)
    return self._call(functools.partial(method, self._bound), args, kwargs)

  def __getattr__(self, name: str):
    if name.startswith("_"):
      raise AttributeError(name)
    method = getattr(self._bound, name)
    if not callable(method):
      raise AttributeError(f"model attribute {name!r} is not a method")
    return lambda *args, **kwargs: self._call(method, args, kwargs)


@functools.lru_cache(maxsize=None)
def _signature_takes_deterministic(fn) -> bool:
  try:
    return "deterministic" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _takes_deterministic(fn) -> bool:
  target = getattr(fn, "__func__", None) or getattr(fn, "func", None) or fn
  if isinstance(fn, functools.partial):
    target = fn.func
  return _signature_takes_deterministic(target)


class Context:
  """What an objective sees. B = global batch.

  Attributes: `batch`, `step`, `alpha` (distillation weight), `num_groups` (data shards, for
  ITM's `local` scope), `cfg` (the current objective's config), `state` (the current
  objective's own state, or None), `student` / `teacher` (`ModelFns`), and every registered
  feature as `ctx.<name>`.
  """

  def __init__(self, *, model, params, ema_params, objective_state, batch, rng, step, alpha, num_groups,
               cfg: Optional[ml_collections.ConfigDict] = None, name: str = ""):
    self.batch = batch
    self.objective_state = dict(objective_state or {})
    self.step = step
    self.alpha = alpha
    self.num_groups = num_groups
    self.cfg = cfg if cfg is not None else ml_collections.ConfigDict()
    self.name = name
    self._rng = rng
    self.model_config = model.config
    self.student = ModelFns(model, params, jax.random.fold_in(rng, 0), stop_gradient=False)
    self._teacher = None if ema_params is None else ModelFns(model, ema_params, None, stop_gradient=True)
    self._cache: dict[str, Any] = {}

  @property
  def teacher(self) -> ModelFns:
    if self._teacher is None:
      raise ValueError(f"objective {self.name or '?'!r} reads the EMA teacher, but this run has none; "
                       "set config.teacher.momentum > 0 (e.g. 0.995)")
    return self._teacher

  @property
  def has_teacher(self) -> bool:
    return self._teacher is not None

  @property
  def state(self):
    """The current objective's own state (`init_state` of its registration), or None."""
    return self.objective_state.get(self.name)

  def with_cfg(self, cfg: ml_collections.ConfigDict, name: str = "") -> "Context":
    """A view for one objective (its config and name); the feature cache is shared."""
    view = copy.copy(self)
    view.cfg = cfg
    view.name = name
    return view

  def rng(self, name: str) -> jax.Array:
    return jax.random.fold_in(self._rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)

  def cached(self, name: str) -> bool:
    return name in self._cache

  def __getattr__(self, name: str):
    if name.startswith("_") or name not in _FEATURES:
      raise AttributeError(f"the objective context has no attribute or registered feature {name!r}; "
                           f"features: {feature_names()}")
    cache = self.__dict__["_cache"]
    if name not in cache:
      cache[name] = _FEATURES[name](self)
    return cache[name]

  def image_inputs(self) -> dict:
    """Keyword inputs of `encode_image` beyond the pixels: the extra image-side token ids
    (`concept_ids`, `concept_mask`) when the batch has them."""
    return {k: self.batch[k] for k in ("concept_ids", "concept_mask") if k in self.batch}


# ----------------------------------------------------------------------------- shared features


@feature("image")
def _image(ctx):
  """dict(states [B,N,Dv], layer_cls [depth,B,Dv], mask [B,N] | None) of the clean image."""
  return ctx.student.encode_image(ctx.batch["image"], **ctx.image_inputs())


@feature("text")
def _text(ctx):
  """dict(states [B,L,D], layer_cls [text_layers,B,D]) of `text_ids`."""
  return ctx.student.encode_text(ctx.batch["text_ids"], ctx.batch["text_mask"])


@feature("image_feat")
def _image_feat(ctx):
  return ctx.student.project_image(ctx.image["states"][:, 0])


@feature("text_feat")
def _text_feat(ctx):
  return ctx.student.project_text(ctx.text["states"][:, 0])


@feature("temp")
def _temp(ctx):
  return ctx.student.temperature()


@feature("ema_image")
def _ema_image(ctx):
  return ctx.teacher.encode_image(ctx.batch["image"], **ctx.image_inputs())


@feature("ema_text")
def _ema_text(ctx):
  return ctx.teacher.encode_text(ctx.batch["text_ids"], ctx.batch["text_mask"])


@feature("ema_image_feat")
def _ema_image_feat(ctx):
  return ctx.teacher.project_image(ctx.ema_image["states"][:, 0])


@feature("ema_text_feat")
def _ema_text_feat(ctx):
  return ctx.teacher.project_text(ctx.ema_text["states"][:, 0])


@feature("masked_image")
def _masked_image(ctx):
  """The student's image encoding with `patch_mask` applied, or the clean one without it."""
  if "patch_mask" not in ctx.batch:
    return ctx.image
  return ctx.student.encode_image(ctx.batch["image"], ctx.batch["patch_mask"], **ctx.image_inputs())


@feature("masked_fusion")
def _masked_fusion(ctx):
  """Student fusion of (`mlm_ids`, masked image): dict(text_states, image_states|None, ...)."""
  text = ctx.student.encode_text(ctx.batch["mlm_ids"], ctx.batch["text_mask"])
  image = ctx.masked_image
  return ctx.student.fuse(text["states"], ctx.batch["text_mask"], image["states"], image.get("mask"))


@feature("ema_masked_fusion")
def _ema_masked_fusion(ctx):
  """Teacher fusion of (`mlm_ids`, clean image): ALBEF's MLM distillation targets."""
  text = ctx.teacher.encode_text(ctx.batch["mlm_ids"], ctx.batch["text_mask"])
  image = ctx.ema_image
  return ctx.teacher.fuse(text["states"], ctx.batch["text_mask"], image["states"], image.get("mask"))


@feature("ema_clean_fusion")
def _ema_clean_fusion(ctx):
  """Teacher fusion of the clean pair with per-layer states (MAMO's implicit target)."""
  image = ctx.ema_image
  return ctx.teacher.fuse(ctx.ema_text["states"], ctx.batch["text_mask"], image["states"], image.get("mask"))


def alpha_at(step: jax.Array, alpha: float, ramp_steps: int) -> jax.Array:
  """ALBEF's distillation weight: alpha * min(1, step / ramp_steps) (ramp over epoch 0)."""
  if ramp_steps <= 0:
    return jnp.asarray(alpha, jnp.float32)
  return alpha * jnp.minimum(1.0, step.astype(jnp.float32) / ramp_steps)
