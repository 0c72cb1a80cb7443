"""Heads on top of the towers: ITC projections, ITM, MLM (tied decoder), MAMO predictors."""
from typing import Any

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
