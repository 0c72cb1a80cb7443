"""Heads on top of the towers: ITC projections, ITM, MLM (tied decoder), MAMO predictors, and the
head registry (`register_head`) through which methods add their own."""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from vlpjax.models import layers


class Projection(nn.Module):
  """ITC projection of a CLS state to `embed_dim`, L2-normalised (float32)."""
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls):
    return layers.l2_normalize(layers.Dense(self.embed_dim, ("embed", None), dtype=self.dtype, name="proj")(cls))


class MlmHead(nn.Module):
  """BERT `cls.predictions`: dense + GELU + LN, then a decoder tied to the word embeddings + bias."""
  width: int
  vocab_size: int
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, states, embeddings):
    x = layers.Dense(self.width, ("embed", "mlp"), dtype=self.dtype, name="transform")(states)
    x = nn.gelu(x, approximate=False)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="transform_norm")(x)
    bias = self.param("bias", layers.with_axes(nn.initializers.zeros, ("vocab",)), (self.vocab_size,), jnp.float32)
    return embeddings.attend(x).astype(jnp.float32) + bias


class MlpPredictor(nn.Module):
  """Two-layer MLP predictor (MAMO's MRM head): width -> hidden -> out_features."""
  hidden: int
  out_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return layers.Dense(self.out_features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


# ----------------------------------------------------------------------------- head registry
#
# A head is named in `config.model.heads`; its registration says how the model builds it (`build`,
# called in `VLPModel.setup`, attaches its submodules / params to the model), how `init` touches
# its params (`init`, called in `VLPModel.__call__` with the clean encodings), and, optionally,
# how its params are kept in range after each optimizer update (`constrain`), and the dataclass
# of its settings (`config_class`, read from `config.model.head_config.<name>`).
# Objectives declare the heads they need; `config_lib.validate` checks them before compute.


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  name: str
  build: Callable[[Any], None]
  init: Callable[[Any, dict], dict]
  constrain: Callable[[Any, dict], dict] | None = None
  config_class: type | None = None


_HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, *, build, init, constrain=None, config_class=None) -> HeadSpec:
  spec = HeadSpec(name, build, init, constrain, config_class)
  if name in _HEADS and _HEADS[name] != spec:
    raise ValueError(f"head {name!r} is registered twice")
  _HEADS[name] = spec
  return spec


def head_names() -> list[str]:
  _import_head_modules()
  return sorted(_HEADS)


def get_head(name: str) -> HeadSpec:
  _import_head_modules()
  if name not in _HEADS:
    raise ValueError(f"unknown head {name!r} in config.model.heads; known: {sorted(_HEADS)}")
  return _HEADS[name]


# Modules that register heads of their own (method pieces); importing them registers them.
HEAD_MODULES: list[str] = ["vlpjax.models.hitc", "vlpjax.models.mae", "vlpjax.models.mixer", "vlpjax.models.mvp"]


def _import_head_modules():
  import importlib
  for module in HEAD_MODULES:
    importlib.import_module(module)


def _build_itc(model):
  cfg, dtype = model.config, model.config.compute_dtype
  model.vision_proj = Projection(cfg.embed_dim, dtype)
  model.text_proj = Projection(cfg.embed_dim, dtype)
  model.temp = model.param("temp", layers.with_axes(nn.initializers.constant(cfg.temp_init), ()), (),
                           jnp.float32)


def _init_itc(model, feats):
  return dict(image_feat=model.project_image(feats["image"]["states"][:, 0]),
              text_feat=model.project_text(feats["text"]["states"][:, 0]), temp=model.temperature())


def _constrain_itc(model_cfg, params):
  # ALBEF clamps `temp` in place before every forward; clamping after each update keeps the
  # stored value equal to the one used (docs/method_spec.md App. E 7).
  return {**params, "temp": jnp.clip(params["temp"], model_cfg.temp_min, model_cfg.temp_max)}


def _build_itm(model):
  model.itm_head = layers.Dense(2, ("embed", None), dtype=model.config.compute_dtype)


def _init_itm(model, feats):
  return dict(itm_logits=model.itm_logits(feats["fused"]["text_states"][:, 0]))


def _build_mlm(model):
  cfg = model.config
  model.mlm_head = MlmHead(cfg.text.width, cfg.text.vocab_size, cfg.text.layer_norm_eps, cfg.compute_dtype)


def _init_mlm(model, feats):
  return dict(mlm_logits=model.mlm_logits(feats["fused"]["text_states"]))


def _build_mrm(model):
  cfg = model.config
  model.mrm_head = MlpPredictor(cfg.text.width, cfg.text.width, cfg.compute_dtype)


def _init_mrm(model, feats):
  return dict(mrm=model.mrm_predict(feats["fused"]["text_states"]))


def _build_mim(model):
  cfg = model.config
  model.mim_head = layers.Dense(cfg.vision.width, ("embed", "mlp"), dtype=cfg.compute_dtype)


def _init_mim(model, feats):
  fused = feats["fused"]
  image_out = fused["image_states"] if fused["image_states"] is not None else feats["image"]["states"]
  return dict(mim=model.mim_predict(image_out[:, 1:]))


register_head("itc", build=_build_itc, init=_init_itc, constrain=_constrain_itc)
register_head("itm", build=_build_itm, init=_init_itm)
register_head("mlm", build=_build_mlm, init=_init_mlm)
register_head("mrm", build=_build_mrm, init=_init_mrm)
register_head("mim", build=_build_mim, init=_init_mim)
