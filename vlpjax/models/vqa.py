"""VQA model (`config.model.kind = "vqa"`): ALBEF's generative answer decoder, or a classifier head.

`vqa_mode = "generate"` (ALBEF, docs/method_spec.md §1.4): the question is fused with the image by the
usual towers (`vqa_encode`), and an answer decoder -- a BERT LM decoder with causal
self-attention, cross-attention to the fused question states and an FFN in every layer, and an
MLM-style LM head tied to its own word embeddings -- scores answers token by token
(`answer_logits`). Its parameters start from the pretrained text embeddings, fusion layers
0..n-1 (cross-attention included) and MLM head (`remap_pretrained`), as ALBEF starts its decoder
from BERT layers 6-11 of the pretrained model.

`vqa_mode = "classify"` (VinVL / MVP): an MLP on the fused [CLS] state gives one logit per answer
of a fixed vocabulary (`vqa_logits`), trained with BCE against soft VQA scores.

Parameter tree: the `VLPModel` tree plus `answer_decoder` {embeddings, layer_0..layer_{n-1},
lm_head} (generate) or `vqa_head` {fc1, norm, fc2} (classify).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpjax.models import bert, heads, layers, vlp

VQA_MODES = ("generate", "classify")


@dataclasses.dataclass(frozen=True)
class VQAConfig(vlp.ModelConfig):
  """`vqa_mode`: "generate" (answer decoder) or "classify" (MLP over `num_answers` answers).

  `answer_layers`: decoder depth; 0 = `text.fusion_layers` (ALBEF: 6 = the fusion depth).
  """
  vqa_mode: str = "generate"
  num_answers: int = 3129
  answer_layers: int = 0

  @property
  def decoder_layers(self) -> int:
    return self.answer_layers or self.text.fusion_layers

  @classmethod
  def from_config(cls, cfg) -> "VQAConfig":
    model = super().from_config(cfg)
    if model.vqa_mode not in VQA_MODES:
      raise ValueError(f"config.model.vqa_mode must be one of {VQA_MODES}, got {model.vqa_mode!r}")
    if model.answer_layers < 0:
      raise ValueError(
          f"config.model.answer_layers must be >= 0 (0 = fusion depth), got {model.answer_layers}")
    if model.vqa_mode == "classify" and model.num_answers <= 0:
      raise ValueError(f"config.model.num_answers must be > 0 in classify mode, got {model.num_answers}")
    return model


class CausalSelfAttention(nn.Module):
  """Self-attention where position q sees the positions k <= q whose `mask` is 1.

  Same parameters as `layers.Attention` (query, key, value, out), so a BERT or fusion layer's
  self-attention loads into it unchanged. A row without any visible key (an all-padding answer
  row) attends uniformly instead of producing NaN.
  """
  num_heads: int
  width: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, *, deterministic=True):
    """x [batch, length, width], mask {0,1} [batch, length] -> [batch, length, width]."""
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
    head_dim = self.width // self.num_heads

    def project(name):
      y = layers.Dense(self.width, ("embed", "heads"), dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

    query, key, value = project("query"), project("key"), project("value")  # [batch, length, heads, head_dim]
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    visible = causal[None, None] & mask.astype(bool)[:, None, None, :]  # [batch, 1, q, k]
    if self.dropout_rate > 0.0 and not deterministic:
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * head_dim ** -0.5
      weights = jax.nn.softmax(jnp.where(visible, logits, jnp.finfo(jnp.float32).min), axis=-1)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    else:
      context = jax.nn.dot_product_attention(query, key, value, mask=visible)
    context = context.reshape(context.shape[:2] + (self.width,))
    return layers.Dense(self.width, ("heads", "embed"), dtype=self.dtype, name="out")(context)


class DecoderLayer(nn.Module):
  """`bert.BertLayer` with cross-attention and a causal self-attention (same parameter names).

  Post-LN: h = LN(x + drop(causal_attn(x))); h = LN(h + drop(cross_attn(h, memory)));
  out = LN(h + drop(ffn(h))).
  """
  cfg: bert.TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, memory, memory_mask, deterministic=True):
    cfg = self.cfg
    attn = CausalSelfAttention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype, name="attention")
    x = bert.add_and_norm(cfg, self.dtype, "attention_norm", attn(x, mask, deterministic=deterministic), x,
                          deterministic)
    cross = layers.Attention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype,
                             name="crossattention")
    x = bert.add_and_norm(cfg, self.dtype, "crossattention_norm",
                          cross(x, memory, memory_mask, deterministic=deterministic), x, deterministic)
    return bert.feed_forward_block(cfg, self.dtype, x, deterministic)


class AnswerDecoder(nn.Module):
  """ALBEF's answer decoder (BertLMHeadModel, cross-attention in every layer).

  __call__(ids [N, La], mask [N, La], memory [N, Lq, D], memory_mask [N, Lq]) -> logits
  [N, La, V] float32; logits[:, t] predict token t + 1.
  """
  cfg: bert.TextConfig
  num_layers: int
  dtype: Any = jnp.float32
  remat: Any = False   # a `layers.remat_policy` value (or bool)

  def setup(self):
    # `deterministic` (argument 5, counting self) must be static under remat.
    layer = layers.remat(DecoderLayer, self.remat, static_argnums=(5,))
    self.embeddings = bert.Embeddings(self.cfg, self.dtype)
    self.layers = [layer(self.cfg, self.dtype, name=f"layer_{i}") for i in range(self.num_layers)]
    self.lm_head = heads.MlmHead(self.cfg.width, self.cfg.vocab_size, self.cfg.layer_norm_eps, self.dtype)

  def __call__(self, ids, mask, memory, memory_mask, *, deterministic=True):
    x = self.embeddings(ids, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, mask, memory, memory_mask, deterministic)
    return self.lm_head(x, self.embeddings)


class AnswerClassifier(nn.Module):
  """VinVL's VQA head: dense(width -> 2 width) + GELU + LayerNorm + dense(-> num_answers)."""
  width: int
  num_answers: int
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls):
    x = layers.Dense(2 * self.width, ("embed", "mlp"), dtype=self.dtype, name="fc1")(cls)
    x = nn.gelu(x, approximate=False)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)
    return layers.Dense(self.num_answers, ("mlp", None), dtype=self.dtype, name="fc2")(x).astype(jnp.float32)


def _decoder_layer_from_fusion(fusion_layer: dict) -> dict:
  """A fusion layer's params as decoder-layer params.

  The fusion cross-attention key/value kernels [image width, width] read the image tokens; the
  decoder's memory is the fused question, of text width. When the two widths differ, key and
  value are left out, so these two projections start freshly initialised instead of failing the
  restore with a shape mismatch.
  """
  layer = dict(fusion_layer)
  cross = layer.get("crossattention")
  if cross is not None and "query" in cross:
    width = np.shape(cross["query"]["dense"]["kernel"])[0]
    layer["crossattention"] = {
        name: value for name, value in cross.items()
        if name not in ("key", "value") or np.shape(value["dense"]["kernel"])[0] == width}
  return layer


@vlp.register_model("vqa")
class VQAModel(vlp.VLPModel):
  """VLPModel + answer decoder (generate) or answer classifier (classify).

  Methods beyond VLPModel's:
    vqa_encode(images [B,H,W,3], q_ids [B,Lq], q_mask [B,Lq], *, concept_ids, concept_mask)
      -> fused question states [B,Lq,D] (concepts: ViCHA's image-side tokens, optional)
    answer_logits(answer_ids [N,La], answer_mask [N,La], q_states [N,Lq,D], q_mask [N,Lq])
      -> [N,La,V] float32 (generate mode); row n attends to question states q_states[n], so
      callers gather the question of every answer row first.
    vqa_logits(cls [B,D]) -> [B,num_answers] float32 (classify mode)
  """
  config: VQAConfig
  config_class = VQAConfig

  @staticmethod
  def remap_pretrained(params: dict) -> dict:
    """Adds `answer_decoder` built from a pretraining checkpoint, as ALBEF's VQA.py does.

    answer_decoder/embeddings <- text/embeddings; answer_decoder/layer_i <- fusion/layer_i for
    every fusion layer (a shallower decoder leaves the extra ones unused; cross-attention
    key/value only when the image width equals the text width); answer_decoder/lm_head <-
    mlm_head. A checkpoint that already has `answer_decoder` (a VQA finetune) is returned as
    is, and so is one without `text` / `fusion`. In classify mode the added subtree is simply
    unused by the restore.
    """
    if "answer_decoder" in params or "text" not in params or "fusion" not in params:
      return params
    decoder = {name: _decoder_layer_from_fusion(layer) for name, layer in params["fusion"].items()
               if name.startswith("layer_")}
    if "embeddings" in params["text"]:
      decoder["embeddings"] = params["text"]["embeddings"]
    if "mlm_head" in params:
      decoder["lm_head"] = params["mlm_head"]
    return {**params, "answer_decoder": decoder}

  def setup(self):
    super().setup()
    cfg, dtype = self.config, self.config.compute_dtype
    if cfg.vqa_mode == "generate":
      self.answer_decoder = AnswerDecoder(cfg.text, cfg.decoder_layers, dtype, cfg.remat)
    else:
      self.vqa_head = AnswerClassifier(cfg.text.width, cfg.num_answers, cfg.text.layer_norm_eps, dtype)

  def vqa_encode(self, images, q_ids, q_mask, deterministic=True, *, concept_ids=None, concept_mask=None):
    image = self.encode_image(images, concept_ids=concept_ids, concept_mask=concept_mask, deterministic=deterministic)
    text = self.encode_text(q_ids, q_mask, deterministic)
    return self.fuse(text["states"], q_mask, image["states"], image["mask"], deterministic=deterministic)["text_states"]

  def answer_logits(self, answer_ids, answer_mask, q_states, q_mask, deterministic=True):
    return self.answer_decoder(answer_ids, answer_mask, q_states, q_mask, deterministic=deterministic)

  def vqa_logits(self, cls):
    return self.vqa_head(cls)

  def __call__(self, images, text_ids, text_mask, deterministic=True):
    """VLPModel's outputs plus `answer_logits` (the question read as an answer) or `vqa_logits`."""
    out = super().__call__(images, text_ids, text_mask, deterministic)
    q_states = self.vqa_encode(images, text_ids, text_mask, deterministic, **self.init_concepts(text_ids, text_mask))
    if self.config.vqa_mode == "generate":
      out["answer_logits"] = self.answer_logits(text_ids, text_mask, q_states, text_mask, deterministic)
    else:
      out["vqa_logits"] = self.vqa_logits(q_states[:, 0])
    return out
