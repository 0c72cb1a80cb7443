"""MVP's object-tag tokens (`vlpjax/models/mvp.py` TagTokens): both `embed` modes against NumPy
references, and which shared text-embedding params the tags' gradient reaches (the 'shared' mode
reaching the position / type rows and the text LayerNorm broke VSC on the demo)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mvp
from vlpjax import config_lib, train
from vlpjax.models import vlp


def _model(embed):
  config = mvp.get_config("tiny")
  config.model.image_tokens.embed = embed
  model = train.build_model(config)
  init = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                    *vlp.init_inputs(model.config))
  params = jax.tree.map(np.asarray, nn.unbox(init)["params"])
  # Non-trivial LayerNorm params, so the reference checks which LayerNorm is used.
  rng = np.random.default_rng(1)
  for tree in (params["text"]["embeddings"]["norm"]["norm"], params.get("image_tokens", {}).get("tag_norm", {}).get("norm", {})):
    for key in list(tree):
      tree[key] = tree[key] + rng.normal(0, 0.3, tree[key].shape).astype(np.float32)
  return model, params


def _tags(model, params, ids, mask):
  return model.apply({"params": params}, ids, mask, method=lambda m, i, k: m.image_tokens(i, k))


def _layer_norm(x, norm, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * norm["scale"] + norm["bias"]


IDS = np.array([[2, 13, 10, 3, 0, 0], [2, 17, 4, 15, 10, 3]], np.int32)
MASK = (np.arange(6)[None] < np.array([[4], [6]])).astype(np.int32)


@pytest.mark.parametrize("embed", ["shared", "words"])
def test_tag_tokens_match_reference(embed):
  model, params = _model(embed)
  tokens, mask = _tags(model, params, IDS, MASK)
  emb = params["text"]["embeddings"]
  eps = model.config.text.layer_norm_eps
  if embed == "words":
    want = _layer_norm(emb["word"]["embedding"][IDS], params["image_tokens"]["tag_norm"]["norm"], eps)
  else:
    x = emb["word"]["embedding"][IDS] + emb["position"]["embedding"][None, :IDS.shape[1]] + emb["token_type"]["embedding"][1]
    want = _layer_norm(x, emb["norm"]["norm"], eps)
  if "tag_in" in params.get("image_tokens", {}):
    dense = params["image_tokens"]["tag_in"]
    want = want @ dense["kernel"] + dense["bias"]
  np.testing.assert_allclose(np.asarray(tokens), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(mask), MASK)


@pytest.mark.parametrize("embed", ["shared", "words"])
def test_tag_gradient_reaches_only_the_word_rows_with_words(embed):
  model, params = _model(embed)
  weights = jax.random.normal(jax.random.PRNGKey(3), _tags(model, params, IDS, MASK)[0].shape)

  def loss(p):
    return jnp.sum(_tags(model, p, IDS, MASK)[0] * weights)

  grads = jax.grad(loss)(params)["text"]["embeddings"]
  norms = {name: float(sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(grads[name])))
           for name in ("position", "token_type", "norm")}
  word = np.abs(np.asarray(grads["word"]["embedding"])).sum(-1)
  assert word[np.unique(IDS)].min() > 0
  assert word[np.setdiff1d(np.arange(len(word)), IDS)].max() == 0
  if embed == "words":
    assert norms == {"position": 0.0, "token_type": 0.0, "norm": 0.0}
  else:
    assert min(norms.values()) > 0


def test_tag_embed_config():
  assert mvp.get_config("demo").model.image_tokens.embed == "words"
  assert mvp.get_config("tiny").model.image_tokens.embed == "words"
  assert mvp.get_config().model.image_tokens.embed == "shared"  # MVPTR's; converted checkpoints
  config = mvp.get_config("tiny")
  config.model.image_tokens.embed = "bag"
  with pytest.raises(ValueError, match="image_tokens.embed must be one of"):
    config_lib.validate(config)
