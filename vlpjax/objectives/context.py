"""The per-step context every objective reads: bound model calls and features computed once.

Features are computed lazily and cached for the step, so an objective pays only for what it
reads and two objectives that read the same feature (ITC and ITM both read `itc_sims`) share
one computation. Teacher (EMA) features are under `stop_gradient`. The attribute list is the
contract with `vlpjax/objectives/*.py` (see each objective's docstring).
"""
import copy
import zlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


class ModelFns:
  """A VLPModel bound to one set of params, with dropout on (student) or off (teacher)."""

  def __init__(self, model: nn.Module, params: Any, dropout_rng: Optional[jax.Array], stop_gradient: bool):
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    self._bound = model.bind({"params": params}, rngs=rngs)
    self._deterministic = dropout_rng is None
    self._sg = jax.lax.stop_gradient if stop_gradient else (lambda x: x)

  def _out(self, x):
    return jax.tree.map(self._sg, x)

  def encode_image(self, images, patch_mask=None, extra_tokens=None, extra_mask=None):
    return self._out(self._bound.encode_image(images, patch_mask, extra_tokens, extra_mask))

  def encode_text(self, ids, mask):
    return self._out(self._bound.encode_text(ids, mask, deterministic=self._deterministic))

  def fuse(self, text_states, text_mask, image_states, image_mask=None):
    return self._out(self._bound.fuse(text_states, text_mask, image_states, image_mask,
                                      deterministic=self._deterministic))

  def project_image(self, cls):
    return self._out(self._bound.project_image(cls))

  def project_text(self, cls):
    return self._out(self._bound.project_text(cls))

  def itm_logits(self, cls):
    return self._out(self._bound.itm_logits(cls))

  def mlm_logits(self, states):
    return self._out(self._bound.mlm_logits(states))

  def mrm_predict(self, states):
    return self._out(self._bound.mrm_predict(states))

  def mim_predict(self, states):
    return self._out(self._bound.mim_predict(states))

  def temperature(self):
    return self._out(self._bound.temperature())

  @property
  def deterministic(self) -> bool:
    """True for the teacher (no dropout)."""
    return self._deterministic

  def apply(self, method: str, *args, **kwargs):
    """Calls any method of the bound model (task models add their own), with this side's
    stop-gradient; pass `deterministic=self.deterministic` where the method takes it."""
    return self._out(getattr(self._bound, method)(*args, **kwargs))


def _cached(fn):
  name = fn.__name__

  def get(self):
    if name not in self._cache:
      self._cache[name] = fn(self)
    return self._cache[name]

  get.__doc__ = fn.__doc__
  return property(get)


class Context:
  """What an objective sees. B = global batch, Q = queue size, E = ITC width."""

  def __init__(self, *, model, params, ema_params, queues, batch, rng, step, alpha, num_groups,
               cfg: Optional[ml_collections.ConfigDict] = None):
    self.batch = batch
    if "image" not in queues:
      dim = model.config.embed_dim
      queues = dict(queues, image=jnp.zeros((0, dim), jnp.float32), text=jnp.zeros((0, dim), jnp.float32),
                    idx=jnp.zeros((0,), jnp.int32))
    self.queues = queues
    self.step = step
    self.alpha = alpha
    self.num_groups = num_groups
    self.cfg = cfg if cfg is not None else ml_collections.ConfigDict()
    self._rng = rng
    self.student = ModelFns(model, params, jax.random.fold_in(rng, 0), stop_gradient=False)
    self.teacher = ModelFns(model, ema_params, None, stop_gradient=True)
    self._cache: dict[str, Any] = {}

  def with_cfg(self, cfg: ml_collections.ConfigDict) -> "Context":
    """A view with an objective's own config; the feature cache is shared."""
    view = copy.copy(self)
    view.cfg = cfg
    return view

  def rng(self, name: str) -> jax.Array:
    return jax.random.fold_in(self._rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)

  def cached(self, name: str) -> bool:
    return name in self._cache

  # Student, clean inputs.
  @_cached
  def image(self):
    """dict(states [B,N,Dv], layer_cls [depth,B,Dv])."""
    return self.student.encode_image(self.batch["image"])

  @_cached
  def text(self):
    """dict(states [B,L,D], layer_cls [text_layers,B,D]) of `text_ids`."""
    return self.student.encode_text(self.batch["text_ids"], self.batch["text_mask"])

  @_cached
  def image_feat(self):
    return self.student.project_image(self.image["states"][:, 0])

  @_cached
  def text_feat(self):
    return self.student.project_text(self.text["states"][:, 0])

  @_cached
  def temp(self):
    return self.student.temperature()

  # Teacher (EMA), clean inputs.
  @_cached
  def ema_image(self):
    return self.teacher.encode_image(self.batch["image"])

  @_cached
  def ema_text(self):
    return self.teacher.encode_text(self.batch["text_ids"], self.batch["text_mask"])

  @_cached
  def ema_image_feat(self):
    return self.teacher.project_image(self.ema_image["states"][:, 0])

  @_cached
  def ema_text_feat(self):
    return self.teacher.project_text(self.ema_text["states"][:, 0])

  @_cached
  def itc_sims(self):
    """Student features against [EMA batch features ; queue], divided by the temperature.

    i2t = image_feat @ [ema_text_feat ; queue.text].T / temp  -> [B, B+Q]; t2i likewise.
    """
    text_keys = jnp.concatenate([self.ema_text_feat, self.queues["text"]], axis=0)
    image_keys = jnp.concatenate([self.ema_image_feat, self.queues["image"]], axis=0)
    temp = self.temp
    return dict(i2t=self.image_feat @ text_keys.T / temp, t2i=self.text_feat @ image_keys.T / temp)

  # Masked inputs (MLM, MAMO).
  @_cached
  def masked_image(self):
    """The student's image encoding with `patch_mask` applied, or the clean one without it."""
    if "patch_mask" not in self.batch:
      return self.image
    return self.student.encode_image(self.batch["image"], self.batch["patch_mask"])

  @_cached
  def masked(self):
    """Student fusion of (`mlm_ids`, masked image): dict(text_states, image_states|None, ...)."""
    text = self.student.encode_text(self.batch["mlm_ids"], self.batch["text_mask"])
    return self.student.fuse(text["states"], self.batch["text_mask"], self.masked_image["states"])

  @_cached
  def ema_masked(self):
    """Teacher fusion of (`mlm_ids`, clean image): ALBEF's MLM distillation targets."""
    text = self.teacher.encode_text(self.batch["mlm_ids"], self.batch["text_mask"])
    return self.teacher.fuse(text["states"], self.batch["text_mask"], self.ema_image["states"])

  @_cached
  def ema_clean(self):
    """Teacher fusion of the clean pair with per-layer states (MAMO's implicit target)."""
    return self.teacher.fuse(self.ema_text["states"], self.batch["text_mask"], self.ema_image["states"])


def alpha_at(step: jax.Array, alpha: float, ramp_steps: int) -> jax.Array:
  """ALBEF's distillation weight: alpha * min(1, step / ramp_steps) (ramp over epoch 0)."""
  if ramp_steps <= 0:
    return jnp.asarray(alpha, jnp.float32)
  return alpha * jnp.minimum(1.0, step.astype(jnp.float32) / ramp_steps)
