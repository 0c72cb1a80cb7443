"""BERT-style text encoder and the two fusion encoders (ALBEF `cross`, single-stream `merged`).

All layers are post-LN as in BERT: h = LN(x + drop(attn(x))); out = LN(h + drop(ffn(h))).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpjax.models import layers


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 30522
  width: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  text_layers: int = 6
  fusion_layers: int = 6
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.1


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  cfg: TextConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    init = layers.with_axes(layers.default_kernel_init, ("vocab", "embed"))
    self.word = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=init, param_dtype=jnp.float32,
                         dtype=self.dtype)
    self.position = nn.Embed(cfg.max_positions, cfg.width, param_dtype=jnp.float32, dtype=self.dtype,
                             embedding_init=layers.with_axes(layers.default_kernel_init, (None, "embed")))
    self.token_type = nn.Embed(cfg.type_vocab_size, cfg.width, param_dtype=jnp.float32, dtype=self.dtype,
                               embedding_init=layers.with_axes(layers.default_kernel_init, (None, "embed")))
    self.norm = layers.LayerNorm(cfg.layer_norm_eps, self.dtype)
    self.dropout = nn.Dropout(cfg.dropout)

  def __call__(self, ids, token_type=None, *, deterministic=True):
    length = ids.shape[1]
    if length > self.cfg.max_positions:
      raise ValueError(f"text length {length} exceeds max_positions {self.cfg.max_positions}")
    # Positions are the table's first rows: a slice, whose gradient is a pad, not a scatter.
    positions = self.position.embedding[None, :length].astype(self.dtype)
    token_type = jnp.zeros_like(ids) if token_type is None else token_type
    # Token types index a 2-row table. As a gather its gradient is a scatter-add sending every
    # token's row to the same two rows, serialised by atomics: 77 ms of a 256 ms ALBEF step
    # (B=128) on an H100. As a one-hot product the gradient is one small matmul; same values.
    types = jax.nn.one_hot(token_type, self.cfg.type_vocab_size, dtype=self.dtype) @ (
        self.token_type.embedding.astype(self.dtype))
    x = self.word(ids) + positions + types
    return self.dropout(self.norm(x), deterministic=deterministic)

  def attend(self, states):
    """Scores states [batch, length, width] against the word embeddings -> [..., vocab]."""
    return self.word.attend(states.astype(self.dtype))


def add_and_norm(cfg: TextConfig, dtype, name: str, y, inputs, deterministic: bool):
  """Post-LN residual: LayerNorm(inputs + dropout(y)), the LayerNorm named `name`.

  Call inside a compact module (it creates that module's submodules); shared by `BertLayer` and
  the task layers built from it (VQA's causal decoder layer, NLVR2's pair layers).
  """
  y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
  return layers.LayerNorm(cfg.layer_norm_eps, dtype, name=name)(inputs + y)


def feed_forward_block(cfg: TextConfig, dtype, x, deterministic: bool):
  """BERT's FFN with its residual: LN(x + drop(W2 gelu(W1 x))); params intermediate / output / output_norm."""
  y = layers.Dense(cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, name="intermediate")(x)
  y = nn.gelu(y, approximate=False)
  y = layers.Dense(cfg.width, ("mlp", "embed"), dtype=dtype, name="output")(y)
  x = add_and_norm(cfg, dtype, "output_norm", y, x, deterministic)
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BertLayer(nn.Module):
  """Self-attention, optional cross-attention to `memory`, then the feed-forward block.

  `memory` may be the `layers.KeyValue` cache of this layer's cross-attention, which
  `x=None` returns (the projected keys and values of `memory`; nothing else runs).
  """
  cfg: TextConfig
  cross_attention: bool = False
  dtype: Any = jnp.float32
  sow_weights: bool = False

  @nn.compact
  def __call__(self, x, mask, memory=None, memory_mask=None, deterministic=True):
    return self.layer(x, mask, memory, memory_mask, deterministic)

  def layer(self, x, mask, memory, memory_mask, deterministic):
    cfg = self.cfg
    if x is None:   # the cross-attention key/value cache of `memory`
      return layers.Attention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype,
                              name="crossattention")(None, memory, key_value_only=True)
    attn = layers.Attention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype, name="attention")
    x = add_and_norm(cfg, self.dtype, "attention_norm", attn(x, x, mask, deterministic=deterministic), x,
                     deterministic)
    if self.cross_attention:
      cross = layers.Attention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype,
                               sow_weights=self.sow_weights, name="crossattention")
      x = add_and_norm(cfg, self.dtype, "crossattention_norm",
                       cross(x, memory, memory_mask, deterministic=deterministic), x, deterministic)
    return feed_forward_block(cfg, self.dtype, x, deterministic)


class ScanBertLayer(BertLayer):
  """A `BertLayer` as one iteration of a scanned stack (`layers.scan_stack`).

  (x, mask, memory, memory_mask, cache) -> (x', x'): mask, memory and memory_mask are the same for
  every layer; `cache` is None or this layer's slice of a stacked `layers.KeyValue`, used in place
  of `memory`. With x None the iteration returns (None, this layer's cross-attention key/value
  cache of `memory`). `deterministic` is an attribute: scan arguments must be arrays.
  """
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, memory, memory_mask, cache):
    if x is None:
      return None, self.layer(None, None, memory, None, True)
    if cache is not None:
      memory = layers.KeyValue(*cache)
    x = self.layer(x, mask, memory, memory_mask, self.deterministic)
    return x, x


def _layer_cls(remat):
  """BertLayer under the remat policy `remat` (a `layers.remat_policy` value, or bool)."""
  # `deterministic` (argument 5, counting self) must be static under remat.
  return layers.remat(BertLayer, remat, static_argnums=(5,))


def _scanned_layers(cfg: "TextConfig", num_layers: int, remat, *, deterministic: bool, **attrs) -> nn.Module:
  """`num_layers` BERT layers as one scanned stack (params [num_layers, ...]); see `ScanBertLayer`."""
  broadcast = nn.broadcast
  stack = layers.scan_stack(ScanBertLayer, num_layers, remat, (broadcast, broadcast, broadcast, 0))
  return stack(cfg, deterministic=deterministic, **attrs)


def _stack_cache(cache) -> layers.KeyValue:
  """Per-layer `layers.KeyValue` list -> one KeyValue of [layers, ...] arrays (a scanned stack's)."""
  return layers.KeyValue(jnp.stack([kv[0] for kv in cache]), jnp.stack([kv[1] for kv in cache]))


class TextEncoder(nn.Module):
  """The text tower: embeddings + `text_layers` self-attention layers.

  Returns `states` [batch, length, width], `layer_cls` [layers, batch, width] and
  `layer_states` (each layer's [batch, length, width]: a list, or with `scan` one
  [layers, batch, length, width] array). With `scan` the layers are one `nn.scan` stack named
  `layers` (params [text_layers, ...]) instead of `layer_0 .. layer_{n-1}`.
  """
  cfg: TextConfig
  dtype: Any = jnp.float32
  remat: Any = False   # a `layers.remat_policy` value (or bool)
  scan: bool = False

  def setup(self):
    self.embeddings = Embeddings(self.cfg, self.dtype)
    if not self.scan:   # the scanned stack is made per call (`_layer_stack`): `deterministic` is static
      layer = _layer_cls(self.remat)
      self.layers = [layer(self.cfg, dtype=self.dtype, name=f"layer_{i}") for i in range(self.cfg.text_layers)]

  def __call__(self, ids, mask, *, deterministic=True):
    x = self.embeddings(ids, deterministic=deterministic)
    return self.encode_embedded(x, mask, deterministic=deterministic)

  @nn.compact
  def _layer_stack(self, x, mask, deterministic):
    return _scanned_layers(self.cfg, self.cfg.text_layers, self.remat, deterministic=deterministic,
                           dtype=self.dtype, name="layers")(x, mask, None, None, None)

  def encode_embedded(self, x, mask, *, deterministic=True):
    """The layers alone, over embedded inputs x [batch, length, width]; returns as `__call__`."""
    if self.scan:
      x, layer_states = self._layer_stack(x, mask, deterministic)
      return dict(states=x, layer_cls=layer_states[:, :, 0], layer_states=layer_states)
    layer_states = []
    for layer in self.layers:
      x = layer(x, mask, None, None, deterministic)
      layer_states.append(x)
    return dict(states=x, layer_cls=jnp.stack([state[:, 0] for state in layer_states]), layer_states=layer_states)


class CrossFusion(nn.Module):
  """ALBEF fusion: text states attend to themselves, then to the image tokens, per layer.

  Output positions are the text positions only: `image_states` is None.
  `image_cache(image_states)` gives each layer's cross-attention keys and values of the image
  tokens (a list of `layers.KeyValue` [G, N, heads, head_dim]); `__call__(..., image_cache=...)`
  uses them instead of projecting `image_states` (which may then be None). G may divide the
  text batch B: each run of B / G consecutive texts then attends to one cached image (the ITM
  rerank scores many texts per image that way; `layers.Attention`).
  With `scan` the layers are one `nn.scan` stack named `layers` (params [fusion_layers, ...]);
  `layer_text_states` is then one [layers, batch, length, width] array, and the cache is still
  a per-layer list.
  """
  cfg: TextConfig
  dtype: Any = jnp.float32
  remat: Any = False   # a `layers.remat_policy` value (or bool)
  sow_weights: bool = False
  scan: bool = False

  def setup(self):
    if not self.scan:   # the scanned stack is made per call (`_layer_stack`): `deterministic` is static
      layer = _layer_cls(self.remat)
      self.layers = [layer(self.cfg, cross_attention=True, dtype=self.dtype, sow_weights=self.sow_weights,
                           name=f"layer_{i}") for i in range(self.cfg.fusion_layers)]

  @nn.compact
  def _layer_stack(self, x, mask, memory, memory_mask, cache, deterministic):
    return _scanned_layers(self.cfg, self.cfg.fusion_layers, self.remat, deterministic=deterministic,
                           cross_attention=True, dtype=self.dtype, sow_weights=self.sow_weights,
                           name="layers")(x, mask, memory, memory_mask, cache)

  def image_cache(self, image_states):
    """Per-layer cross-attention `layers.KeyValue` of image_states [G, N, Dv] ([G, N, heads, head_dim])."""
    if self.scan:
      _, cache = self._layer_stack(None, None, image_states, None, None, True)
      return [layers.KeyValue(cache[0][i], cache[1][i]) for i in range(self.cfg.fusion_layers)]
    return [layer(None, None, image_states, None, True) for layer in self.layers]

  def __call__(self, text_states, text_mask, image_states, image_mask=None, *, deterministic=True,
               image_cache=None):
    if image_cache is not None and len(image_cache) != self.cfg.fusion_layers:
      raise ValueError(f"image_cache has {len(image_cache)} layers; the fusion has {self.cfg.fusion_layers}")
    if self.scan:
      cache = None if image_cache is None else _stack_cache(image_cache)
      x, layer_text_states = self._layer_stack(text_states, text_mask, image_states, image_mask, cache,
                                               deterministic)
      return dict(text_states=x, image_states=None, layer_text_states=layer_text_states,
                  layer_image_states=None)
    x = text_states
    layer_text_states = []
    for i, layer in enumerate(self.layers):
      memory = image_states if image_cache is None else layers.KeyValue(*image_cache[i])
      x = layer(x, text_mask, memory, image_mask, deterministic)
      layer_text_states.append(x)
    return dict(text_states=x, image_states=None, layer_text_states=layer_text_states,
                layer_image_states=None)


class MergedFusion(nn.Module):
  """Single-stream fusion over [text ; image] with a modality embedding; outputs at every position.

  Image states of another width are first projected to the text width. Layers are BERT layers
  without cross-attention, so they initialise from BERT layers 6-11 (self-attention + FFN).
  """
  cfg: TextConfig
  dtype: Any = jnp.float32
  remat: Any = False   # a `layers.remat_policy` value (or bool)
  scan: bool = False   # the layers as one `nn.scan` stack named `layers` (as `CrossFusion`)

  @nn.compact
  def __call__(self, text_states, text_mask, image_states, image_mask=None, *, deterministic=True):
    cfg = self.cfg
    if image_states.shape[-1] != cfg.width:
      image_states = layers.Dense(cfg.width, ("mlp", "embed"), dtype=self.dtype, name="image_in")(image_states)
    modality = self.param("modality_embedding", layers.with_axes(layers.default_kernel_init, (None, "embed")),
                          (2, cfg.width), jnp.float32).astype(self.dtype)
    num_text = text_states.shape[1]
    x = jnp.concatenate([text_states + modality[0], image_states.astype(self.dtype) + modality[1]], axis=1)
    if image_mask is None:
      image_mask = jnp.ones(image_states.shape[:2], jnp.int32)
    mask = jnp.concatenate([text_mask.astype(jnp.int32), image_mask.astype(jnp.int32)], axis=1)
    if self.scan:
      x, states = _scanned_layers(cfg, cfg.fusion_layers, self.remat, deterministic=deterministic,
                                  dtype=self.dtype, name="layers")(x, mask, None, None, None)
      return dict(text_states=x[:, :num_text], image_states=x[:, num_text:],
                  layer_text_states=states[:, :, :num_text], layer_image_states=states[:, :, num_text:])
    layer = _layer_cls(self.remat)
    layer_text_states, layer_image_states = [], []
    for i in range(cfg.fusion_layers):
      x = layer(cfg, dtype=self.dtype, name=f"layer_{i}")(x, mask, None, None, deterministic)
      layer_text_states.append(x[:, :num_text])
      layer_image_states.append(x[:, num_text:])
    return dict(text_states=x[:, :num_text], image_states=x[:, num_text:],
                layer_text_states=layer_text_states, layer_image_states=layer_image_states)


def make_fusion(kind: str, cfg: TextConfig, dtype, remat, sow_weights: bool = False, scan: bool = False
                ) -> nn.Module:
  if kind == "cross":
    return CrossFusion(cfg, dtype, remat, sow_weights, scan, name="fusion")
  if kind == "merged":
    return MergedFusion(cfg, dtype, remat, scan, name="fusion")
  raise ValueError(f"config.model.fusion must be 'cross' or 'merged', got {kind!r}")

