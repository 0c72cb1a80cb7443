"""VLPModel: the ALBEF-style model every method shares. It encodes, fuses and applies heads;
it never computes a loss (that is the objectives' job).

Parameter tree (top level): `vision` (ViT), `text` (BERT text layers), `fusion` (cross or
merged fusion layers), optional `image_tokens` (the extra image-side token encoder), and the
heads `config.model.heads` names, each built by its registration (`heads.register_head`):
`itc` -> `vision_proj`, `text_proj` and the scalar `temp`; `itm` -> `itm_head`; `mlm` ->
`mlm_head`; `mrm` / `mim` -> `mrm_head` / `mim_head` (MAMO).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlpjax.models import bert, heads, layers, vit


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: vit.VisionConfig = vit.VisionConfig()
  text: bert.TextConfig = bert.TextConfig()
  fusion: str = "cross"
  embed_dim: int = 256
  heads: tuple[str, ...] = ("itc", "itm", "mlm")
  dtype: str = "float32"
  # What each transformer layer keeps for the backward pass: a `layers.REMAT_POLICIES` name
  # ('none', 'full', 'dots', 'dots_all'); True / False mean 'full' / 'none' (old configs).
  remat: Any = "none"
  # The ViT blocks, text layers and fusion layers each as one `nn.scan` stack (params with a
  # leading [layers] axis, `vlpjax.models.layout`): one layer compiled per tower instead of all.
  scan_layers: bool = False
  temp_init: float = 0.07
  temp_min: float = 0.001
  temp_max: float = 0.5
  sow_attention: bool = False
  # Extra image-side tokens appended to the ViT input (ViCHA's visual concepts, MVP's object
  # tags): the settings dataclass of the registered kind (`register_image_tokens`), or None.
  image_tokens: Any = None
  # Settings of heads that have them: ((name, settings dataclass), ...) sorted by name.
  head_config: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "remat", layers.remat_policy(self.remat))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def head_cfg(self, name: str):
    """The settings dataclass of head `name` (its registered defaults when the config gives none)."""
    for head, settings in self.head_config:
      if head == name:
        return settings
    config_class = heads.get_head(name).config_class
    return config_class() if config_class is not None else None

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "ModelConfig":
    """Builds a ModelConfig (or a task subclass) from `config.model`; an unknown key fails naming it.

    `kind` selects the model class (`build_model`) and is not a field.
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    cfg.pop("kind", None)
    vision = _build_dataclass(vit.VisionConfig, cfg.pop("vision", {}), "config.model.vision")
    text = _build_dataclass(bert.TextConfig, cfg.pop("text", {}), "config.model.text")
    if "heads" in cfg:
      cfg["heads"] = tuple(cfg["heads"])
      for name in cfg["heads"]:
        heads.get_head(name)  # fails naming the known heads
    head_config = dict(cfg.pop("head_config", None) or {})
    settings = []
    for name in sorted(head_config):
      if name not in cfg.get("heads", cls.heads):
        raise ValueError(f"config.model.head_config.{name} configures a head that is not in "
                         f"config.model.heads {cfg.get('heads', cls.heads)}")
      config_class = heads.get_head(name).config_class
      if config_class is None:
        raise ValueError(f"config.model.head_config.{name}: head {name!r} has no settings")
      settings.append((name, _build_dataclass(config_class, head_config[name], f"config.model.head_config.{name}")))
    image_tokens = _build_image_tokens(cfg.pop("image_tokens", None))
    model = _build_dataclass(cls, cfg, "config.model")
    if model.fusion not in ("cross", "merged"):
      raise ValueError(f"config.model.fusion must be 'cross' or 'merged', got {model.fusion!r}")
    jnp.dtype(model.dtype)
    return dataclasses.replace(model, vision=vision, text=text, image_tokens=image_tokens,
                               head_config=tuple(settings))


def _build_dataclass(klass, values, where):
  values = dict(values or {})
  names = {f.name for f in dataclasses.fields(klass)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
  return klass(**values)


# ----------------------------------------------------------------------------- image-side tokens


@dataclasses.dataclass(frozen=True)
class ImageTokensSpec:
  """A kind of extra image-side tokens: `config_class` (frozen dataclass with a `kind` field) and
  `build(model) -> nn.Module`, called in `VLPModel.setup`; the module maps
  (concept_ids [B,K], concept_mask [B,K], deterministic) -> (tokens [B,K,Dv], mask [B,K] | None)."""
  kind: str
  config_class: type
  build: Any


_IMAGE_TOKENS: dict[str, ImageTokensSpec] = {}
# Modules that register image-token kinds; imported on first use.
IMAGE_TOKEN_MODULES: list[str] = ["vlpjax.models.concepts", "vlpjax.models.mvp"]


def register_image_tokens(kind: str, *, config_class, build) -> ImageTokensSpec:
  spec = ImageTokensSpec(kind, config_class, build)
  if kind in _IMAGE_TOKENS and _IMAGE_TOKENS[kind] != spec:
    raise ValueError(f"image-token kind {kind!r} is registered twice")
  _IMAGE_TOKENS[kind] = spec
  return spec


def image_tokens_spec(kind: str) -> ImageTokensSpec:
  import importlib
  for module in IMAGE_TOKEN_MODULES:
    importlib.import_module(module)
  if kind not in _IMAGE_TOKENS:
    raise ValueError(f"unknown config.model.image_tokens.kind {kind!r}; known: {sorted(_IMAGE_TOKENS)}")
  return _IMAGE_TOKENS[kind]


def _build_image_tokens(values):
  values = dict(values or {})
  kind = values.get("kind", "")
  if not kind:
    if set(values) - {"kind"}:
      raise ValueError(f"config.model.image_tokens sets {sorted(set(values) - {'kind'})} but no kind")
    return None
  return _build_dataclass(image_tokens_spec(kind).config_class, values, "config.model.image_tokens")


_MODELS: dict[str, type] = {}


def register_model(kind: str):
  """Class decorator: `config.model.kind = kind` builds this VLPModel subclass.

  A task model subclasses `VLPModel` (adding its heads in `setup` after `super().setup()`),
  names its config dataclass (a `ModelConfig` subclass with the task's fields) as the class
  attribute `config_class`, initialises every parameter in `__call__(images, text_ids,
  text_mask)`, and may override the static `remap_pretrained` to derive its new parameters
  from a pretraining checkpoint (e.g. a decoder initialised from the fusion layers).
  """

  def wrap(model_class):
    if kind in _MODELS and _MODELS[kind] is not model_class:
      raise ValueError(f"model kind {kind!r} is registered twice")
    _MODELS[kind] = model_class
    return model_class

  return wrap


def _import_task_models():
  # Task models register themselves on import; a missing optional module is not an error.
  import importlib
  for name in ("vqa", "classify", "mixer", "mvp"):
    try:
      importlib.import_module(f"vlpjax.models.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"vlpjax.models.{name}":
        raise


def model_class(model_cfg) -> type:
  """The module class `config.model.kind` names (default 'vlp'); unknown kinds fail naming them."""
  kind = (model_cfg.get("kind") if hasattr(model_cfg, "get") else None) or "vlp"
  if kind not in _MODELS:
    _import_task_models()
  if kind not in _MODELS:
    raise ValueError(f"unknown config.model.kind {kind!r}; known: {sorted(_MODELS)}")
  return _MODELS[kind]


def model_for_config(cfg: "ModelConfig") -> "VLPModel":
  """The model of a built config: the registered class whose `config_class` is `type(cfg)`."""
  _import_task_models()
  for model_class_ in _MODELS.values():
    if model_class_.config_class is type(cfg):
      return model_class_(cfg)
  raise ValueError(f"no registered model kind takes a {type(cfg).__name__}")


def build_config(model_cfg) -> "ModelConfig":
  """The (task) ModelConfig of `config.model`, validated."""
  return model_class(model_cfg).config_class.from_config(model_cfg)


def build_model(model_cfg) -> "VLPModel":
  """The model `config.model` describes: `VLPModel` or the task subclass its `kind` names."""
  return model_class(model_cfg)(build_config(model_cfg))


@register_model("vlp")
class VLPModel(nn.Module):
  """ViT image tower + BERT text tower + fusion encoder + the heads `config.heads` names.

  Methods (each returns arrays or a dict of features):
    encode_image(images [B,H,W,3], patch_mask=None [B,P], extra_tokens=None, extra_mask=None,
                 keep_indices=None [B,K], *, concept_ids=None [B,C], concept_mask=None [B,C])
      -> dict(states [B, 1+P(+C)|1+K, Dv], layer_cls [depth, B, Dv], layer_states, mask)
      (`concept_ids` feed the model's image-side token encoder, `config.image_tokens`)
    encode_text(ids [B,L], mask [B,L]) -> dict(states [B,L,D], layer_cls [text_layers,B,D], layer_states)
    fuse(text_states, text_mask, image_states, image_mask=None, image_cache=None)
      -> dict(text_states [B,L,D], image_states [B,N,D] | None, layer_text_states, layer_image_states)
      (`image_cache` = fusion_image_cache(image_states [G,N,Dv]), G dividing B: cross fusion only)
    fusion_image_cache(image_states [G,N,Dv]) -> per-layer cross-attention layers.KeyValue
    project_image(cls [B,Dv]) / project_text(cls [B,D]) -> [B, embed_dim], unit norm, float32
    itm_logits(cls [B,D]) -> [B,2]; mlm_logits(states [B,L,D]) -> [B,L,V] float32
    mrm_predict(states [B,T,D]) -> [B,T,D]; mim_predict(states [B,P,D]) -> [B,P,Dv]
    temperature() -> clamped scalar
    constrain_params(params) -> params kept in range after an update (each head's rule)
  Heads registered outside this class (`heads.register_head`) are called as functions of the
  module: `model.apply(variables, ..., method=fn)` / `ctx.student.apply(fn, ...)`.
  """
  config: ModelConfig
  config_class = ModelConfig

  @staticmethod
  def remap_pretrained(params: dict) -> dict:
    """Checkpoint params (nested dict) -> params for this model; identity for the base model."""
    return params

  def setup(self):
    cfg, dtype = self.config, self.config.compute_dtype
    self.vision = vit.VisionTransformer(cfg.vision, dtype, cfg.remat, scan=cfg.scan_layers)
    self.text = bert.TextEncoder(cfg.text, dtype, cfg.remat, scan=cfg.scan_layers)
    self.fusion = bert.make_fusion(cfg.fusion, cfg.text, dtype, cfg.remat, cfg.sow_attention, cfg.scan_layers)
    if cfg.image_tokens is not None:
      self.image_tokens = image_tokens_spec(cfg.image_tokens.kind).build(self)
    for name in cfg.heads:
      heads.get_head(name).build(self)

  def encode_image(self, images, patch_mask=None, extra_tokens=None, extra_mask=None, keep_indices=None, *,
                   concept_ids=None, concept_mask=None, deterministic=True):
    if concept_ids is not None and self.config.image_tokens is not None and keep_indices is None:
      if extra_tokens is not None:
        raise ValueError("encode_image: give extra_tokens or concept_ids, not both")
      extra_tokens, extra_mask = self.image_tokens(concept_ids, concept_mask, deterministic=deterministic)
    return self.vision(images, patch_mask, extra_tokens, extra_mask, keep_indices)

  def encode_text(self, ids, mask, deterministic=True):
    return self.text(ids, mask, deterministic=deterministic)

  def fuse(self, text_states, text_mask, image_states, image_mask=None, deterministic=True, image_cache=None):
    if image_cache is None:
      return self.fusion(text_states, text_mask, image_states, image_mask, deterministic=deterministic)
    self._check_image_cache()
    return self.fusion(text_states, text_mask, image_states, image_mask, deterministic=deterministic,
                       image_cache=image_cache)

  def fusion_image_cache(self, image_states):
    """Each fusion layer's cross-attention keys and values of image_states [G, N, Dv]: a list of
    `layers.KeyValue` [G, N, heads, head_dim] for `fuse(..., image_cache=...)` (cross fusion only:
    the merged fusion has no cross-attention, its image tokens go through self-attention with
    the text, so nothing about an image can be computed without its text)."""
    self._check_image_cache()
    return self.fusion.image_cache(image_states)

  def _check_image_cache(self):
    if self.config.fusion != "cross":
      raise ValueError(f"an image key/value cache needs cross-attention fusion (config.model.fusion='cross'); "
                       f"this model's fusion is {self.config.fusion!r}")

  def project_image(self, cls):
    return self.vision_proj(cls)

  def project_text(self, cls):
    return self.text_proj(cls)

  def itm_logits(self, cls):
    return self.itm_head(cls).astype(jnp.float32)

  def mlm_logits(self, states):
    return self.mlm_head(states, self.text.embeddings)

  def mrm_predict(self, states):
    return self.mrm_head(states)

  def mim_predict(self, states):
    return self.mim_head(states)

  def temperature(self):
    return jnp.clip(self.temp, self.config.temp_min, self.config.temp_max)

  def constrain_params(self, params):
    """Params after an optimizer update, kept in range by each head's rule (ALBEF's temp clamp)."""
    for name in self.config.heads:
      constrain = heads.get_head(name).constrain
      if constrain is not None:
        params = constrain(self.config, params)
    return params

  def init_concepts(self, text_ids, text_mask) -> dict:
    """Stand-in concept inputs for `init` (the text), when the model has image-side tokens."""
    if self.config.image_tokens is None:
      return {}
    return dict(concept_ids=text_ids, concept_mask=text_mask)

  def init_features(self, images, text_ids, text_mask, deterministic=True):
    """The clean encodings every head's `init` reads: dict(image, text, fused)."""
    image = self.encode_image(images, deterministic=deterministic, **self.init_concepts(text_ids, text_mask))
    text = self.encode_text(text_ids, text_mask, deterministic)
    fused = self.fuse(text["states"], text_mask, image["states"], image.get("mask"), deterministic=deterministic)
    return dict(image=image, text=text, fused=fused, images=images, text_ids=text_ids, text_mask=text_mask)

  def __call__(self, images, text_ids, text_mask, deterministic=True):
    """Runs every tower and head once (used by `init`); returns a dict of outputs."""
    feats = self.init_features(images, text_ids, text_mask, deterministic)
    out = {}
    for name in self.config.heads:
      out.update(heads.get_head(name).init(self, feats))
    return out


def init_inputs(cfg: ModelConfig, batch_size: int = 2, text_len: int = 8):
  """Dummy inputs of the right shapes for `model.init`."""
  size = cfg.vision.image_size
  return (jnp.zeros((batch_size, size, size, 3), jnp.float32),
          jnp.zeros((batch_size, text_len), jnp.int32),
          jnp.ones((batch_size, text_len), jnp.int32))


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))

