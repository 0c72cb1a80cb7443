"""BERT embeddings against a NumPy gather reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlpjax.models import bert

CFG = bert.TextConfig(vocab_size=50, width=16, num_heads=2, mlp_dim=32, text_layers=1, fusion_layers=1,
                      max_positions=12, type_vocab_size=2, dropout=0.0, attention_dropout=0.0)


def _inputs(seed, batch=3, length=7):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, CFG.vocab_size, (batch, length)), rng.integers(0, CFG.type_vocab_size, (batch, length)),
          rng.normal(size=(batch, length, CFG.width)))


def _reference(params, ids, types):
  """Row gathers and a LayerNorm in float64."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  x = (p["word"]["embedding"][ids] + p["position"]["embedding"][np.arange(ids.shape[1])][None]
       + p["token_type"]["embedding"][types])
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + CFG.layer_norm_eps) * p["norm"]["norm"]["scale"] + p["norm"]["norm"]["bias"]


@pytest.mark.parametrize("seed", [0, 1])
def test_embeddings_match_gather_reference(seed):
  ids, types, _ = _inputs(seed)
  model = bert.Embeddings(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), ids, types)["params"])
  params = jax.tree.map(lambda x: x + jax.random.normal(jax.random.PRNGKey(seed + 7), x.shape), params)
  out = model.apply({"params": params}, ids, types)
  np.testing.assert_allclose(np.asarray(out), _reference(params, ids, types), rtol=1e-4, atol=1e-4)


def test_embedding_gradients_are_row_sums():
  """The module's table gradients against NumPy loops: LayerNorm's backward in float64, then
  each table row sums the input gradient over the tokens that use it."""
  ids, types, upstream = _inputs(2)
  model = bert.Embeddings(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids, types)["params"])
  params = jax.tree.map(lambda x: x + jax.random.normal(jax.random.PRNGKey(4), x.shape), params)
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, types) * upstream))(params)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  x = (p["word"]["embedding"][ids] + p["position"]["embedding"][np.arange(ids.shape[1])][None]
       + p["token_type"]["embedding"][types])
  sigma = np.sqrt(x.var(-1, keepdims=True) + CFG.layer_norm_eps)
  normed = (x - x.mean(-1, keepdims=True)) / sigma
  d_normed = upstream * p["norm"]["norm"]["scale"]
  d_x = (d_normed - d_normed.mean(-1, keepdims=True)
         - normed * (d_normed * normed).mean(-1, keepdims=True)) / sigma
  want_types = np.zeros((2, CFG.width))
  want_pos = np.zeros((CFG.max_positions, CFG.width))
  want_word = np.zeros((CFG.vocab_size, CFG.width))
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1]):
      want_types[types[b, t]] += d_x[b, t]
      want_pos[t] += d_x[b, t]
      want_word[ids[b, t]] += d_x[b, t]
  np.testing.assert_allclose(np.asarray(grads["token_type"]["embedding"]), want_types, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads["position"]["embedding"]), want_pos, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads["word"]["embedding"]), want_word, rtol=1e-4, atol=1e-5)


def test_full_gradient_matches_gather_reference():
  """The module's own gradient equals the gradient of the gather formulation."""
  ids, types, upstream = _inputs(3)
  model = bert.Embeddings(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), ids, types)["params"])

  def gathered(p):
    x = (p["word"]["embedding"][ids] + p["position"]["embedding"][jnp.arange(ids.shape[1])][None]
         + p["token_type"]["embedding"][types])
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + CFG.layer_norm_eps) * p["norm"]["norm"]["scale"] + p["norm"]["norm"]["bias"]
    return jnp.sum(y * upstream)

  got = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, types) * upstream))(params)
  want = jax.grad(gathered)(params)
  for (path, value), expected in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(value), np.asarray(expected), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_bfloat16_matches_gather_reference():
  ids, types, _ = _inputs(4)
  model = bert.Embeddings(CFG, dtype=jnp.bfloat16)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(2), ids, types)["params"])
  params = jax.tree.map(lambda x: x + jax.random.normal(jax.random.PRNGKey(9), x.shape), params)
  out = model.apply({"params": params}, ids, types)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference(params, ids, types), rtol=2e-2, atol=3e-2)


def test_text_longer_than_positions_is_refused():
  ids = np.zeros((1, CFG.max_positions + 1), np.int32)
  with pytest.raises(ValueError, match="max_positions 12"):
    bert.Embeddings(CFG).init(jax.random.PRNGKey(0), ids)
