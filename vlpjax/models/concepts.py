"""ViCHA's visual concepts as image-side tokens (docs/method_spec.md §2.1, §2.3).

The concept string of an image (CLIP's top words, e.g. "dog frisbee grass park") is tokenized
like a caption into `concept_ids`, `concept_mask` [B, K]. The concept encoder runs it through its
own BERT embeddings and `layers` self-attention BERT layers (ViCHA's `kw_encoder`: a 2-layer
BertModel in text mode, initialised from bert-base layers 0-1), then a linear map from the text
width to the vision width (`kw_proj`). `VLPModel.encode_image` appends the resulting tokens to
the ViT input after the position embeddings (they get none), so every ViT block attends over
[CLS, patches, concepts], and the ViT output including the concept positions is the image memory
of ITC (CLS) and of the fusion cross-attention.

Padding: ViCHA masks nothing: padded concept positions are keys of the ViT self-attention and of
the fusion cross-attention like any other token (docs/method_spec.md App. H #8). That is the default here
(`mask_padding=False`), for checkpoint fidelity. Note that ViCHA pads each batch only to its
longest concept string, so how many padded tokens an image sees depends on its batch; here the
length is fixed by the tokenizer op (`config.input.concept_max_len`). With `mask_padding=True`
the module returns `concept_mask`, which the ViT blocks and the fusion cross-attention honour.

Config: `config.model.image_tokens = dict(kind='concepts', layers=2, mask_padding=False)`; the
encoder's width, heads, vocabulary and dropout are those of `config.model.text`.

Parameters (under `image_tokens/`): `embeddings/*` (as `text/embeddings`), `layer_N/*` (as
`text/layer_N`), `proj/dense` [text width, vision width].
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlpjax.models import bert, layers, vlp

KIND = "concepts"
# Batch keys of the concept strings: one image, and NLVR2's two (image0, image1).
CONCEPT_KEYS = ("concept_ids", "concept_mask")
PAIR_CONCEPT_KEYS = ("concept0_ids", "concept0_mask", "concept1_ids", "concept1_mask")


def batch_concepts(batch, pair: bool = False) -> dict:
  """The concept inputs `batch` holds, by name, for a model method's keyword arguments (empty
  when it holds none): `concept_ids`, `concept_mask`, or with `pair` NLVR2's per-image keys."""
  return {key: batch[key] for key in (PAIR_CONCEPT_KEYS if pair else CONCEPT_KEYS) if key in batch}


@dataclasses.dataclass(frozen=True)
class ConceptTokensConfig:
  """`config.model.image_tokens` of kind 'concepts'."""
  kind: str = KIND
  layers: int = 2            # BERT layers of the concept encoder (ViCHA num_hidden_layers_kw)
  mask_padding: bool = False  # ViCHA attends to padded concept tokens; True masks them

  def __post_init__(self):
    if self.layers < 0:
      raise ValueError(f"config.model.image_tokens.layers must be >= 0, got {self.layers}")


class ConceptEncoder(nn.Module):
  """(concept_ids [B, K], concept_mask [B, K]) -> (tokens [B, K, vision_width], mask [B, K] | None).

  tokens = proj(BertLayer_{n-1}(... BertLayer_0(Embeddings(ids), mask) ...)); the BERT layers are
  post-LN self-attention layers that attend over the non-padded concept tokens (`concept_mask`),
  as ViCHA's text-mode kw_encoder does. The returned mask is `concept_mask` with `mask_padding`,
  else None (every concept position is attended to, ViCHA's behaviour).
  """
  text: bert.TextConfig
  vision_width: int
  num_layers: int = 2
  mask_padding: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.embeddings = bert.Embeddings(self.text, self.dtype)
    layer = nn.remat(bert.BertLayer, static_argnums=(5,)) if self.remat else bert.BertLayer
    self.encoder_layers = [layer(self.text, dtype=self.dtype, name=f"layer_{i}") for i in range(self.num_layers)]
    self.proj = layers.Dense(self.vision_width, ("mlp", "embed"), dtype=self.dtype)

  def __call__(self, concept_ids, concept_mask=None, *, deterministic=True):
    if concept_mask is None:
      concept_mask = jnp.ones(concept_ids.shape, jnp.int32)
    x = self.embeddings(concept_ids, deterministic=deterministic)
    for layer in self.encoder_layers:
      x = layer(x, concept_mask, None, None, deterministic)
    tokens = self.proj(x)
    return tokens, (concept_mask.astype(jnp.int32) if self.mask_padding else None)


def _build(model) -> ConceptEncoder:
  cfg = model.config
  settings = cfg.image_tokens
  return ConceptEncoder(cfg.text, cfg.vision.width, settings.layers, settings.mask_padding, cfg.compute_dtype,
                        cfg.remat, name="image_tokens")


vlp.register_image_tokens(KIND, config_class=ConceptTokensConfig, build=_build)


def init_from_text(text_params: dict, num_layers: int = 2) -> dict:
  """Concept-encoder params taken from the text tower's (ViCHA initialises its kw_encoder from
  bert-base-uncased's embeddings and layers 0..num_layers-1).

  Args:
    text_params: the `text` subtree of a params tree (e.g. converted bert-base-uncased).
    num_layers: concept-encoder layers.

  Returns:
    The `image_tokens` subtree without `proj` (which `init_from` then initialises):
    {embeddings, layer_0, ..., layer_{num_layers-1}}, copies of the text tower's.
  """
  missing = [name for name in ["embeddings"] + [f"layer_{i}" for i in range(num_layers)] if name not in text_params]
  if missing:
    raise ValueError(f"init_from_text: the text params lack {missing}")
  out = {"embeddings": text_params["embeddings"]}
  out.update({f"layer_{i}": text_params[f"layer_{i}"] for i in range(num_layers)})
  return out
