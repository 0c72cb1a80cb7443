"""Attention layer paths against a NumPy softmax-attention reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.models import layers, vit


def _reference(q, k, v, mask=None):
  """Softmax attention in float64; q [b, t, h, d], k/v [b, s, h, d], mask bool [b, 1, 1|t, s]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", weights, v)


def _qkv(seed, batch, q_len, kv_len, heads=2, dim=8):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(keys[0], (batch, q_len, heads, dim)),
          jax.random.normal(keys[1], (batch, kv_len, heads, dim)),
          jax.random.normal(keys[2], (batch, kv_len, heads, dim)))


@pytest.mark.parametrize("q_len,kv_len,multiple", [(17, 17, 8), (5, 30, 8), (16, 16, 8), (9, 13, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_padded_attention_matches_reference(q_len, kv_len, multiple, masked):
  q, k, v = _qkv(q_len * kv_len, 3, q_len, kv_len)
  mask = None
  if masked:
    lengths = np.array([kv_len, kv_len - 2, 1])
    mask = jnp.asarray(np.arange(kv_len)[None, None, None, :] < lengths[:, None, None, None])
  out = layers.padded_dot_product_attention(q, k, v, mask, multiple=multiple, implementation="xla")
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_padded_attention_gradients_equal_unpadded():
  q, k, v = _qkv(1, 2, 17, 17)
  weights = jax.random.normal(jax.random.PRNGKey(5), q.shape)
  plain = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) * weights), argnums=(0, 1, 2))
  padded = jax.grad(lambda *a: jnp.sum(layers.padded_dot_product_attention(
      *a, multiple=8, implementation="xla") * weights), argnums=(0, 1, 2))
  for got, want in zip(padded(q, k, v), plain(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_unknown_attention_implementation_is_named():
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    vit.VisionConfig(attention_impl="flash")
  module = layers.Attention(num_heads=2, out_features=16, implementation="flash")
  x = jnp.ones((1, 3, 16))
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    module.init(jax.random.PRNGKey(0), x, x)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on GPUs only")
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_padded_attention_matches_xla_on_gpu(masked):
  """Run on an H100 (2026-11-22): relative error 3.1e-3..3.7e-3 (outputs), <= 4.6e-3 (gradients)."""
  q, k, v = _qkv(11, 4, 257, 257, heads=12, dim=64)
  mask = (jnp.arange(257)[None, None, None, :] < jnp.array([257, 200, 100, 5])[:, None, None, None]
          if masked else None)
  upstream = jax.random.normal(jax.random.PRNGKey(3), q.shape)
  cudnn = lambda a, b, c: layers.padded_dot_product_attention(a, b, c, mask, multiple=8, implementation="cudnn")
  xla = lambda a, b, c: jax.nn.dot_product_attention(a, b, c, mask=mask, implementation="xla")
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  assert rel(cudnn(*half), xla(q, k, v)) < 1e-2
  got = jax.grad(lambda *a: jnp.sum(cudnn(*a).astype(jnp.float32) * upstream), argnums=(0, 1, 2))(*half)
  want = jax.grad(lambda *a: jnp.sum(xla(*a) * upstream), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert rel(g, w) < 1e-2
