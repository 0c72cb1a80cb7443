"""Shared Flax building blocks: dense layers with logical axes, attention, MLPs.

Params are float32; `dtype` is the compute dtype. Every param carries logical axis names
(`embed`, `mlp`, `heads`, `vocab`, ...) that `vlpjax.sharding` maps to mesh axes.
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# BERT and timm's ViT both initialise weights with a (truncated) normal of std 0.02.
default_kernel_init = nn.initializers.truncated_normal(0.02)


def with_axes(init: Initializer, axes: tuple[Optional[str], ...]) -> Initializer:
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """A dense layer whose kernel [in, out] and bias [out] carry logical axis names."""
  features: int
  kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    return nn.Dense(
        self.features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=with_axes(self.kernel_init, self.kernel_axes),
        bias_init=with_axes(nn.initializers.zeros, (self.kernel_axes[1],)),
        name="dense",
    )(x)


class LayerNorm(nn.Module):
  """LayerNorm with scale/bias on the `embed` axis; statistics are computed in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(
        epsilon=self.epsilon,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        scale_init=with_axes(nn.initializers.ones, ("embed",)),
        bias_init=with_axes(nn.initializers.zeros, ("embed",)),
        name="norm",
    )(x.astype(jnp.float32)).astype(self.dtype)


def key_padding_mask(mask: Optional[jax.Array]) -> Optional[jax.Array]:
  """[batch, keys] {0,1} -> bool [batch, 1, 1, keys], broadcastable over heads and queries."""
  if mask is None:
    return None
  return mask.astype(bool)[:, None, None, :]


class Attention(nn.Module):
  """Multi-head attention with separate query/key/value projections (BERT / ViT layout).

  `inputs_q` [batch, q_len, width_q] attends to `inputs_kv` [batch, kv_len, width_kv]; the
  key/value projections map width_kv -> num_heads * head_dim, so cross-attention to a vision
  tower of another width needs no extra adapter. Without attention-probability dropout the
  computation goes through `jax.nn.dot_product_attention`, which picks a fused kernel on GPU.
  With `sow_weights` the attention probabilities [batch, heads, q_len, kv_len] are stored in the
  `intermediates` collection and pass through a Flax `perturb` point of the same name (collection
  `perturbations`): a no-op unless the caller supplies that collection, whose gradient is then the
  gradient w.r.t. the probabilities (Grad-CAM). This forces the explicit softmax path.
  """
  num_heads: int
  out_features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  sow_weights: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None, *, deterministic=True):
    inner = self.out_features
    if inner % self.num_heads:
      raise ValueError(f"width {inner} is not divisible by {self.num_heads} heads")
    head_dim = inner // self.num_heads

    def project(name, x):
      y = Dense(inner, ("embed", "heads"), dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

    query = project("query", inputs_q)   # [batch, q_len, heads, head_dim]
    key = project("key", inputs_kv)      # [batch, kv_len, heads, head_dim]
    value = project("value", inputs_kv)  # [batch, kv_len, heads, head_dim]
    bool_mask = key_padding_mask(mask)

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    if use_dropout or self.sow_weights:
      scale = head_dim ** -0.5
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
      if bool_mask is not None:
        logits = jnp.where(bool_mask, logits, jnp.finfo(jnp.float32).min)
      weights = jax.nn.softmax(logits, axis=-1)
      if self.sow_weights:
        self.sow("intermediates", "attention_weights", weights)
        weights = self.perturb("attention_weights", weights)
      if use_dropout:
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    else:
      context = jax.nn.dot_product_attention(query, key, value, mask=bool_mask)
    context = context.reshape(context.shape[:2] + (inner,))
    return Dense(self.out_features, ("heads", "embed"), dtype=self.dtype, name="out")(context)


class Mlp(nn.Module):
  """Two dense layers with a GELU between them: width -> hidden -> width."""
  hidden: int
  out_features: int
  dropout_rate: float = 0.0
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    x = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = Dense(self.out_features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Normalises the last axis to unit L2 norm (F.normalize semantics), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
