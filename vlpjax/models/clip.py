"""CLIP (Radford et al. 2021) in Flax Linen: the image and text towers and their projections.

Used offline, to pick ViCHA's visual concepts (`input_pipeline.concepts`); weights come from a
Hugging Face `CLIPModel` directory or an OpenAI / open_clip checkpoint (`vlpjax.convert.clip`).

Image tower (ViT):  x = [class; conv_p(image)] + pos;  x = ln_pre(x);  pre-LN blocks;
                    image_embed = ln_post(x[:, 0]) @ W_visual            [batch, embed_dim]
Text tower:         x = token_embedding[ids] + pos[:length];  causal pre-LN blocks;
                    x = ln_final(x);  text_embed = x[b, eos_b] @ W_text  [batch, embed_dim]
Blocks:             x = x + attn(ln_1(x));  x = x + fc2(act(fc1(ln_2(x))))
                    act = quick_gelu(u) = u * sigmoid(1.702 u) (OpenAI), or exact gelu.
Pooling position eos_b: `text_pool='argmax'` takes the position of the largest token id (OpenAI;
transformers' rule when the config's eos_token_id is the legacy 2: the end-of-text token has the
largest id of the vocabulary), `text_pool='eos'` the first position of `eos_token_id`
(transformers' rule otherwise; position 0 when a row has none, as torch's argmax of all zeros).

Params are float32 and carry logical axis names like the other towers; `dtype` is the compute
dtype. Param tree (what the converter fills):

  vision/{patch_embed/kernel [p, p, 3, W] (no bias), cls [W], pos_embedding [1 + g*g, W],
          ln_pre, block_i/{ln_1, attn/{query,key,value,out}/dense, ln_2, mlp/{fc1,fc2}/dense},
          ln_post, proj/dense/kernel [W, E]}                       (every LayerNorm as <name>/norm)
  text/{token_embedding/embedding [V, W], pos_embedding [L, W], block_i/..., ln_final,
        proj/dense/kernel [W, E]}
  logit_scale []                                             (log of the inverse temperature)
"""
import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vlpjax.models import layers

ACTIVATIONS = ("quick_gelu", "gelu")
TEXT_POOLING = ("argmax", "eos")
# transformers' CLIPTextModel keeps the pre-2023 argmax pooling when a config says eos_token_id=2.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  text_pool: str = "eos"
  eos_token_id: int = 49407
  # The tokens a tokenizer for this model adds (OpenAI BPE: <|startoftext|>, <|endoftext|>).
  bos_token_id: int = 49406


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Both towers, the shared embedding width and the initial log inverse temperature.

  Defaults are transformers' CLIPConfig defaults (text 12x512, vision ViT-B/32 at 224 px, 512-d
  embeddings), so a `config.json` that leaves a field out means the same here.
  """
  vision: ClipVisionConfig = ClipVisionConfig()
  text: ClipTextConfig = ClipTextConfig()
  embed_dim: int = 512
  logit_scale_init: float = 2.6592

  def __post_init__(self):
    for name, tower in (("vision", self.vision), ("text", self.text)):
      if tower.act not in ACTIVATIONS:
        raise ValueError(f"CLIP {name} activation {tower.act!r} is not supported; known: {ACTIVATIONS}")
      if tower.width % tower.num_heads:
        raise ValueError(f"CLIP {name} width {tower.width} is not divisible by {tower.num_heads} heads")
    if self.text.text_pool not in TEXT_POOLING:
      raise ValueError(f"CLIP text_pool {self.text.text_pool!r}; known: {TEXT_POOLING}")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(f"CLIP image_size {self.vision.image_size} is not a multiple of patch_size "
                       f"{self.vision.patch_size}")


def _hf_act(section: Mapping, where: str) -> str:
  act = section.get("hidden_act", "quick_gelu")
  # transformers' "gelu" is the exact (erf) GELU, the activation of open_clip's non-OpenAI models.
  if act not in ACTIVATIONS:
    raise ValueError(f"{where}: hidden_act {act!r} is not supported; known: {ACTIVATIONS}")
  return act


def config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> ClipConfig:
  """A ClipConfig from a transformers CLIPConfig dict (the `config.json` of a CLIPModel).

  Fields a file leaves out take transformers' defaults. Pooling: `eos_token_id == 2` selects
  the legacy argmax rule, any other id the first position of that id (as CLIPTextModel does).
  Old files keep the towers under `text_config_dict` / `vision_config_dict`.

  Raises:
    ValueError: not a CLIPModel config (no text_config / vision_config), or an unsupported
      activation, naming `where`.
  """
  text = config.get("text_config", config.get("text_config_dict"))
  vision = config.get("vision_config", config.get("vision_config_dict"))
  if text is None or vision is None:
    raise ValueError(f"{where}: not a CLIPModel config (needs 'text_config' and 'vision_config'; "
                     f"model_type={config.get('model_type')!r})")
  def square(key, default):
    value = vision.get(key, default)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ValueError(f"{where}: vision_config.{key}={value}: only square sizes are supported")
      value = value[0]
    return int(value)

  eos = text.get("eos_token_id", 49407)
  if isinstance(eos, (list, tuple)):
    raise ValueError(f"{where}: text_config.eos_token_id={eos}: a list of end tokens is not supported")
  vision_cfg = ClipVisionConfig(
      image_size=square("image_size", 224), patch_size=square("patch_size", 32),
      width=int(vision.get("hidden_size", 768)), depth=int(vision.get("num_hidden_layers", 12)),
      num_heads=int(vision.get("num_attention_heads", 12)), mlp_dim=int(vision.get("intermediate_size", 3072)),
      act=_hf_act(vision, f"{where}: vision_config"), layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)))
  text_cfg = ClipTextConfig(
      vocab_size=int(text.get("vocab_size", 49408)), context_length=int(text.get("max_position_embeddings", 77)),
      width=int(text.get("hidden_size", 512)), depth=int(text.get("num_hidden_layers", 12)),
      num_heads=int(text.get("num_attention_heads", 8)), mlp_dim=int(text.get("intermediate_size", 2048)),
      act=_hf_act(text, f"{where}: text_config"), layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
      text_pool="argmax" if eos == LEGACY_EOS_TOKEN_ID else "eos", eos_token_id=int(eos),
      bos_token_id=int(text.get("bos_token_id", 49406)))
  return ClipConfig(vision=vision_cfg, text=text_cfg, embed_dim=int(config.get("projection_dim", 512)),
                    logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)))


def build_config(fields: Mapping[str, Any]) -> ClipConfig:
  """A ClipConfig from nested dicts {vision: {...}, text: {...}, embed_dim, logit_scale_init}."""
  fields = dict(fields)
  vision = ClipVisionConfig(**fields.pop("vision", {}))
  text = ClipTextConfig(**fields.pop("text", {}))
  return ClipConfig(vision=vision, text=text, **fields)


def quick_gelu(x):
  """OpenAI's GELU approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  return quick_gelu if name == "quick_gelu" else (lambda x: nn.gelu(x, approximate=False))


class ClipAttention(nn.Module):
  """Self-attention with separate query/key/value/out projections (the vlpjax layout).

  `mask` is bool [batch, 1, q_len, kv_len] (True = attend) or None.
  """
  num_heads: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    head_dim = self.width // self.num_heads

    def project(name):
      y = layers.Dense(self.width, ("embed", "heads"), dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))  # [batch, length, heads, head_dim]

    context = jax.nn.dot_product_attention(project("query"), project("key"), project("value"), mask=mask,
                                           implementation="xla")
    context = context.reshape(context.shape[:2] + (self.width,))
    return layers.Dense(self.width, ("heads", "embed"), dtype=self.dtype, name="out")(context)


class ClipBlock(nn.Module):
  """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  num_heads: int
  width: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="ln_1")(x)
    x = x + ClipAttention(self.num_heads, self.width, self.dtype, name="attn")(y, mask)
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="ln_2")(x)
    y = layers.Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(y)
    y = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(_activation(self.act)(y))
    return x + y


def _block(cfg, dtype, name):
  return ClipBlock(cfg.num_heads, cfg.width, cfg.mlp_dim, cfg.act, cfg.layer_norm_eps, dtype, name=name)


class ClipVision(nn.Module):
  """Images [batch, H, W, 3] (CLIP-normalised, H = W = image_size) -> [batch, embed_dim]."""
  cfg: ClipVisionConfig
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ValueError(f"CLIP image tower expects {cfg.image_size}x{cfg.image_size} images, got "
                       f"{images.shape[1]}x{images.shape[2]}")
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID",
                use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.with_axes(layers.default_kernel_init, (None, None, None, "embed")),
                name="patch_embed")(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width)  # [batch, patches, width]
    cls = self.param("cls", layers.with_axes(layers.default_kernel_init, ("embed",)), (cfg.width,), jnp.float32)
    pos = self.param("pos_embedding", layers.with_axes(layers.default_kernel_init, (None, "embed")),
                     (cfg.grid * cfg.grid + 1, cfg.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.width)), x], axis=1)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_pre")(x + pos.astype(x.dtype))
    for i in range(cfg.depth):
      x = _block(cfg, self.dtype, f"block_{i}")(x)
    pooled = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_post")(x[:, 0])
    return layers.Dense(self.embed_dim, ("embed", None), use_bias=False, dtype=self.dtype, name="proj")(pooled)


def pool_positions(ids: jax.Array, text_pool: str, eos_token_id: int) -> jax.Array:
  """int32 [batch]: where the text embedding is read (see the module docstring)."""
  if text_pool == "argmax":
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(ids == eos_token_id, axis=-1).astype(jnp.int32)


class ClipText(nn.Module):
  """Token ids [batch, length] (+ optional {0,1} mask) -> [batch, embed_dim].

  Attention is causal; `mask` additionally hides padding keys (with right padding and a causal
  mask it changes no state at or before the end token, so the embedding does not depend on it).
  """
  cfg: ClipTextConfig
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask=None):
    cfg = self.cfg
    length = ids.shape[1]
    if length > cfg.context_length:
      raise ValueError(f"CLIP text length {length} exceeds the context length {cfg.context_length}")
    embed = nn.Embed(cfg.vocab_size, cfg.width, param_dtype=jnp.float32, dtype=self.dtype,
                     embedding_init=layers.with_axes(layers.default_kernel_init, ("vocab", "embed")),
                     name="token_embedding")
    pos = self.param("pos_embedding", layers.with_axes(layers.default_kernel_init, (None, "embed")),
                     (cfg.context_length, cfg.width), jnp.float32)
    x = embed(ids) + pos[None, :length].astype(self.dtype)
    attend = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, q, k]
    if mask is not None:
      attend = attend & mask.astype(bool)[:, None, None, :]
    for i in range(cfg.depth):
      x = _block(cfg, self.dtype, f"block_{i}")(x, attend)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_final")(x)
    positions = pool_positions(ids, cfg.text_pool, cfg.eos_token_id)
    pooled = jnp.take_along_axis(x, positions[:, None, None], axis=1)[:, 0]
    return layers.Dense(self.embed_dim, ("embed", None), use_bias=False, dtype=self.dtype, name="proj")(pooled)


class CLIP(nn.Module):
  """Both CLIP towers. `encode_image` / `encode_text` return unnormalised float32 embeddings;
  `__call__` returns both (used for init)."""
  cfg: ClipConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.vision = ClipVision(self.cfg.vision, self.cfg.embed_dim, self.dtype)
    self.text = ClipText(self.cfg.text, self.cfg.embed_dim, self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.cfg.logit_scale_init), (),
                                  jnp.float32)

  def encode_image(self, images):
    """images float [batch, H, W, 3] -> float32 [batch, embed_dim]."""
    return self.vision(images).astype(jnp.float32)

  def encode_text(self, ids, mask=None):
    """ids int [batch, length], mask {0,1} [batch, length] or None -> float32 [batch, embed_dim]."""
    return self.text(ids, mask).astype(jnp.float32)

  def __call__(self, images, ids, mask=None):
    return self.encode_image(images), self.encode_text(ids, mask), self.logit_scale


def normalize(x: jax.Array) -> jax.Array:
  """L2-normalised embeddings (the cosine-similarity space): x / max(||x||, 1e-12), float32."""
  return layers.l2_normalize(x)


def init_params(cfg: ClipConfig, rng: Optional[jax.Array] = None) -> dict:
  """Random float32 params (unboxed) of `CLIP(cfg)`, for tests and shape checks."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  images = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  return nn.unbox(CLIP(cfg).init(rng, images, ids)["params"])


def param_shapes(cfg: ClipConfig) -> dict:
  """'/'-joined param path -> shape, without allocating."""
  images = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(lambda: CLIP(cfg).init(jax.random.PRNGKey(0), images, ids))
  flat = traverse_util.flatten_dict(nn.unbox(abstract["params"]), sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}
