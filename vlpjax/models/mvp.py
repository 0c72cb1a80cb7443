"""MVP (MVPTR; Li, Fan, Tou, Chen, Wei, Huang, ACM MM 2022) on ViT patches: model kind `mvp`.

docs/method_spec.md §5.2 / §5.5. MVPTR encodes two semantic levels per modality: text = `[CLS] words
phrases [SEP]` (phrase concepts are extra rows of the word-embedding table), vision = object tags
`[CLS] tags [SEP]` + region features. A uni-modal stage (a text encoder and a visual encoder) is
followed by a cross-modal single-stream encoder over [text outputs ; visual outputs of the
regions]. vlpjax has no region detector, so (the [D] adaptation):

  * the visual encoder is the ViT over patches, with the tag tokens appended as extra image-side
    tokens (`vlp.register_image_tokens` kind `mvp_tags`): the tags go through the *shared* text
    embeddings (word + position + token type 1 + LayerNorm, as MVPTR embeds its tag sequence),
    then, only when the text width differs from the ViT width, through a Dense `tag_in` to the
    ViT width (tiny configs; at full size both are 768 and the tags enter unchanged). The ViT
    then attends over [CLS, patches, tags];
  * the text encoder is the usual BERT text tower over `[CLS] words phrases [SEP]`, its word
    table enlarged by `phrase_vocab_size` rows (phrase ids follow the word vocabulary);
  * the cross-modal encoder is the core `merged` fusion over [text outputs ; ViT outputs of the
    patches]: the ViT CLS and the tag positions are dropped as MVPTR drops its visual
    `[CLS] tags [SEP]` segment, unless `fusion_tags` (MVPTR's `use_b`) keeps the tags (the CLS
    is dropped either way);
  * global embeddings: the uni-modal CLS states through `vsc_head` projections (MVPTR's
    `txt_proj` / `vis_proj`, bias-free, init N(0, width^-0.5)), L2-normalised, with a learnable
    `logit_scale` (init log(1/0.07), never clamped);
  * ITM scores the cross-modal CLS through a BERT pooler (dense + tanh), as MVPTR.

Heads (`config.model.heads`): `vsc` (`vsc_head`), `itm`, `mlm` (the word vocabulary of the
shared table; phrases are never predicted by it), `mcr` (`mcr_head`: masked tag recovery over
the word rows, plus a bias over the phrase rows for the optional phrase loss).

Downstream kinds `mvp_vqa` (VQA classifier) and `mvp_ve` (SNLI-VE) are the task models with this
model's towers, so an MVP checkpoint restores into them (`configs/finetune_mvp.py`).
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpjax import synthetic
from vlpjax.models import bert, classify, heads, layers, vit, vlp, vqa

LOGIT_SCALE_INIT = math.log(1 / 0.07)


# ----------------------------------------------------------------------------- object tags


TAG_EMBEDS = ("shared", "words")


@dataclasses.dataclass(frozen=True)
class TagTokensConfig:
  """`config.model.image_tokens` for MVP's object tags (`[CLS] tags [SEP]` token ids)."""
  kind: str = "mvp_tags"
  token_type: int = 1
  # 'shared': word + position + token type through the text embeddings (MVPTR; a converted
  # checkpoint). 'words': the shared word rows only, under the tags' own LayerNorm `tag_norm`
  # (configs/mvp.py's demo sizes, trained from scratch: see TagTokens).
  embed: str = "shared"

  def __post_init__(self):
    if self.embed not in TAG_EMBEDS:
      raise ValueError(f"config.model.image_tokens.embed must be one of {TAG_EMBEDS}, got {self.embed!r}")


class TagTokens(nn.Module):
  """Object-tag ids -> extra ViT tokens, through the model's shared text embeddings.

  (concept_ids [B,T], concept_mask [B,T]) -> (tokens [B,T,Dv], concept_mask), by `embed`:
    'shared': LayerNorm(word + position + token type `token_type`) of `text` (the model's text
      tower's embeddings module, as MVPTR embeds its tag sequence);
    'words':  tag_norm(word), the rows of the shared word table under the tags' own LayerNorm:
      no position or token-type rows and not the text's LayerNorm;
  then a Dense to the ViT width `vision_width` when the text width differs (`tag_in`).

  Why 'words' exists (measured on configs/mvp.py:demo, VSC alone, 150 steps, batch 64; the
  i2t accuracy of the last batch): with 'shared' the ViT's gradient reaches the position rows,
  the token-type rows and the LayerNorm that every text token goes through as well, and from a
  random init (word, position and type rows of equal scale, so two thirds of an embedding is not
  the word) VSC does not learn: 0.03 (patches alone: 0.42; 'shared' with the tags' gradient
  stopped: 0.19; 'words': 0.28). MVPTR starts from BERT, whose word rows dominate.
  """
  text: Any
  vision_width: int
  token_type: int = 1
  embed: str = "shared"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, concept_ids, concept_mask, deterministic=True):
    if self.embed == "words":
      rows = self.text.embeddings.word(concept_ids)
      tokens = layers.LayerNorm(self.text.embeddings.cfg.layer_norm_eps, self.dtype, name="tag_norm")(rows)
    else:
      types = jnp.full_like(concept_ids, self.token_type)
      tokens = self.text.embeddings(concept_ids, types, deterministic=deterministic)
    if tokens.shape[-1] != self.vision_width:
      tokens = layers.Dense(self.vision_width, ("mlp", "embed"), dtype=self.dtype, name="tag_in")(tokens)
    return tokens, concept_mask


def _build_tag_tokens(model):
  cfg = model.config
  tags = cfg.image_tokens
  return TagTokens(model.text, cfg.vision.width, tags.token_type, tags.embed, cfg.compute_dtype)


vlp.register_image_tokens("mvp_tags", config_class=TagTokensConfig, build=_build_tag_tokens)


# ----------------------------------------------------------------------------- heads


def attend_rows(model, states, start: int, stop: int):
  """states [..., D] scored against rows [start, stop) of the shared word table -> [..., stop-start]."""
  dtype = model.config.compute_dtype
  table = model.text.embeddings.word.embedding[start:stop]
  return jnp.dot(states.astype(dtype), table.astype(dtype).T)


class _Rows:
  """The `attend` interface `heads.MlmHead` calls, restricted to some rows of the word table."""

  def __init__(self, model, start: int, stop: int):
    self._model, self._start, self._stop = model, start, stop

  def attend(self, states):
    return attend_rows(self._model, states, self._start, self._stop)


def word_vocab_size(model) -> int:
  """Rows of the word vocabulary: the tokenizer's (`config.text.vocab_size`)."""
  return model.config.text.vocab_size


def phrase_vocab_size(model) -> int:
  return getattr(model.config, "phrase_vocab_size", 0)


class VscHead(nn.Module):
  """MVPTR's global embeddings: CLS @ txt_proj / vis_proj (no bias), L2-normalised; `logit_scale`."""
  text_width: int
  vision_width: int
  embed_dim: int
  dtype: Any = jnp.float32

  def setup(self):
    def proj_init(width):
      return layers.with_axes(nn.initializers.normal(width ** -0.5), ("embed", None))

    self.txt_proj = self.param("txt_proj", proj_init(self.text_width), (self.text_width, self.embed_dim),
                               jnp.float32)
    self.vis_proj = self.param("vis_proj", proj_init(self.vision_width), (self.vision_width, self.embed_dim),
                               jnp.float32)
    self.logit_scale = self.param("logit_scale", layers.with_axes(nn.initializers.constant(LOGIT_SCALE_INIT), ()),
                                  (), jnp.float32)

  def project_text(self, cls):
    return layers.l2_normalize(cls.astype(self.dtype) @ self.txt_proj.astype(self.dtype))

  def project_image(self, cls):
    return layers.l2_normalize(cls.astype(self.dtype) @ self.vis_proj.astype(self.dtype))

  def scale(self):
    return self.logit_scale


class McrHead(nn.Module):
  """MVPTR's `half_mlm` for the tags: BERT's prediction transform (dense + GELU + LN) on
  visual-encoder states, decoded against the word rows of the shared table (+ `bias`).

  With phrase rows in the table it also predicts phrases from text-encoder states (the optional
  phrase loss of `mcr`; MVPTR has no such head): its own transform (`phrase_transform`,
  `phrase_transform_norm`; the text width may differ from the ViT's), decoded against the phrase
  rows (+ `phrase_bias`).
  """
  width: int
  word_vocab: int
  phrase_vocab: int
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  def setup(self):
    def bias(size):
      return layers.with_axes(nn.initializers.zeros, ("vocab",)), (size,), jnp.float32

    self.transform = layers.Dense(self.width, ("embed", "mlp"), dtype=self.dtype)
    self.transform_norm = layers.LayerNorm(self.layer_norm_eps, self.dtype)
    self.bias = self.param("bias", *bias(self.word_vocab))
    if self.phrase_vocab:
      self.phrase_transform = layers.Dense(self.width, ("embed", "mlp"), dtype=self.dtype)
      self.phrase_transform_norm = layers.LayerNorm(self.layer_norm_eps, self.dtype)
      self.phrase_bias = self.param("phrase_bias", *bias(self.phrase_vocab))

  def words(self, states, rows: _Rows):
    hidden = self.transform_norm(nn.gelu(self.transform(states), approximate=False))
    return rows.attend(hidden).astype(jnp.float32) + self.bias

  def phrases(self, states, rows: _Rows):
    hidden = self.phrase_transform_norm(nn.gelu(self.phrase_transform(states), approximate=False))
    return rows.attend(hidden).astype(jnp.float32) + self.phrase_bias


def vsc_project_text(model, cls):
  """[B, D] -> [B, embed_dim] unit norm (float32)."""
  return model.vsc_head.project_text(cls)


def vsc_project_image(model, cls):
  """[B, Dv] -> [B, embed_dim] unit norm (float32)."""
  return model.vsc_head.project_image(cls)


def vsc_logit_scale(model):
  """The raw learnable scalar s; logits are cosine * exp(s)."""
  return model.vsc_head.scale()


def mcr_logits(model, states):
  """Tag predictions [..., V_words] of visual-encoder states [..., Dv] (tied to the word rows)."""
  return model.mcr_head.words(states, _Rows(model, 0, word_vocab_size(model)))


def phrase_logits(model, states):
  """Phrase predictions [..., V_phrases] of text states [..., D] (tied to the phrase rows)."""
  start = word_vocab_size(model)
  return model.mcr_head.phrases(states, _Rows(model, start, start + phrase_vocab_size(model)))


def _build_vsc(model):
  cfg = model.config
  model.vsc_head = VscHead(cfg.text.width, cfg.vision.width, cfg.embed_dim, cfg.compute_dtype)


def _init_vsc(model, feats):
  return dict(vsc_text=vsc_project_text(model, feats["text"]["states"][:, 0]),
              vsc_image=vsc_project_image(model, feats["image"]["states"][:, 0]),
              vsc_logit_scale=vsc_logit_scale(model))


def _build_mcr(model):
  cfg = model.config
  model.mcr_head = McrHead(cfg.text.width, word_vocab_size(model), phrase_vocab_size(model),
                           cfg.text.layer_norm_eps, cfg.compute_dtype)


def _init_mcr(model, feats):
  out = dict(mcr_logits=mcr_logits(model, feats["image"]["states"]))
  if phrase_vocab_size(model):
    out["phrase_logits"] = phrase_logits(model, feats["text"]["states"])
  return out


heads.register_head("vsc", build=_build_vsc, init=_init_vsc)
heads.register_head("mcr", build=_build_mcr, init=_init_mcr)


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class MvpConfig(vlp.ModelConfig):
  """MVP's model fields beyond `ModelConfig`.

  `text.vocab_size` is the word vocabulary (the tokenizer's); the shared table has
  `text.vocab_size + phrase_vocab_size` rows (MVPTR: 30522 + 73599 = 104121).
  `fusion_tags`: keep the tag positions of the visual encoder in the cross-modal input
  (MVPTR's `use_b`); by default only the patches enter it.
  """
  fusion: str = "merged"
  heads: tuple[str, ...] = ("vsc", "itm", "mlm", "mcr")
  embed_dim: int = 768
  phrase_vocab_size: int = 0
  fusion_tags: bool = False

  @property
  def table_size(self) -> int:
    return self.text.vocab_size + self.phrase_vocab_size

  @classmethod
  def from_config(cls, cfg) -> "MvpConfig":
    model = super().from_config(cfg)
    if model.fusion != "merged":
      raise ValueError(f"config.model.fusion must be 'merged' for MVP's single-stream cross-modal "
                       f"encoder, got {model.fusion!r}")
    if model.phrase_vocab_size < 0:
      raise ValueError(f"config.model.phrase_vocab_size must be >= 0, got {model.phrase_vocab_size}")
    if model.image_tokens is not None and not isinstance(model.image_tokens, TagTokensConfig):
      raise ValueError(f"config.model.image_tokens.kind must be 'mvp_tags' (or unset) for MVP, got "
                       f"{model.image_tokens.kind!r}")
    return model


@vlp.register_model("mvp")
class MvpModel(vlp.VLPModel):
  """MVP: ViT (+ tag tokens) and text towers, merged cross-modal encoder, pooler, heads.

  Methods beyond / replacing VLPModel's:
    encode_text(ids [B,L], mask)       the text encoder over `[CLS] words phrases [SEP]` ids
    encode_image(images, *, concept_ids=None, concept_mask=None)
                                       ViT over [CLS, patches (, tags)] -> states [B, 1+P(+T), Dv]
    fuse(text_states, text_mask, image_states, image_mask=None)
                                       merged fusion over [text ; patches (; tags with fusion_tags)]
                                       -> dict(text_states [B,L,D], image_states [B,P(+T),D], ...)
    project_text / project_image(cls)  VSC global embeddings (`vsc` head), [B, embed_dim] unit norm
    itm_logits(cls [B,D])              itm_head(tanh(pooler(cls))) -> [B, 2] (1 = match)
    mlm_logits(states [B,L,D])         [B, L, V_words] over the word rows of the shared table
  Head functions (`ctx.student.apply(fn, ...)`): vsc_project_text, vsc_project_image,
  vsc_logit_scale, mcr_logits, phrase_logits.
  """
  config: MvpConfig
  config_class = MvpConfig

  def setup(self):
    # VLPModel.setup with the text tower's table enlarged by the phrase rows, and the pooler.
    cfg, dtype = self.config, self.config.compute_dtype
    self.vision = vit.VisionTransformer(cfg.vision, dtype, cfg.remat, scan=cfg.scan_layers)
    self.text = bert.TextEncoder(dataclasses.replace(cfg.text, vocab_size=cfg.table_size), dtype, cfg.remat,
                               scan=cfg.scan_layers)
    self.fusion = bert.make_fusion(cfg.fusion, cfg.text, dtype, cfg.remat, cfg.sow_attention, cfg.scan_layers)
    if cfg.image_tokens is not None:
      self.image_tokens = vlp.image_tokens_spec(cfg.image_tokens.kind).build(self)
    self.pooler = layers.Dense(cfg.text.width, ("embed", "mlp"), dtype=dtype)
    for name in cfg.heads:
      heads.get_head(name).build(self)

  @property
  def num_patches(self) -> int:
    return self.config.vision.num_patches

  def fuse(self, text_states, text_mask, image_states, image_mask=None, deterministic=True):
    """Cross-modal encoder over [text ; visual outputs of the patches (and tags with fusion_tags)].

    `image_states` [B, 1+P(+T), Dv] are the visual encoder's outputs (CLS first), `image_mask`
    [B, 1+P+T] their attention mask (None = all valid).
    """
    end = None if self.config.fusion_tags else 1 + self.num_patches
    image = image_states[:, 1:end]
    mask = None if image_mask is None else image_mask[:, 1:end]
    return self.fusion(text_states, text_mask, image, mask, deterministic=deterministic)

  def project_image(self, cls):
    return vsc_project_image(self, cls) if "vsc" in self.config.heads else super().project_image(cls)

  def project_text(self, cls):
    return vsc_project_text(self, cls) if "vsc" in self.config.heads else super().project_text(cls)

  def itm_logits(self, cls):
    return self.itm_head(jnp.tanh(self.pooler(cls))).astype(jnp.float32)

  def mlm_logits(self, states):
    return self.mlm_head(states, _Rows(self, 0, word_vocab_size(self)))


# ----------------------------------------------------------------------------- downstream kinds


@dataclasses.dataclass(frozen=True)
class MvpVQAConfig(vqa.VQAConfig, MvpConfig):
  """`mvp_vqa`: VQAConfig's fields (use vqa_mode='classify', MVPTR's head) on MVP's towers."""
  heads: tuple[str, ...] = ()


@vlp.register_model("mvp_vqa")
class MvpVQAModel(vqa.VQAModel, MvpModel):
  """The VQA model (`vlpjax.models.vqa`) on MVP's towers: an MVP checkpoint restores into it."""
  config: MvpVQAConfig
  config_class = MvpVQAConfig


@dataclasses.dataclass(frozen=True)
class MvpVEConfig(classify.VEConfig, MvpConfig):
  """`mvp_ve`: SNLI-VE's 3-way head on MVP's towers."""
  heads: tuple[str, ...] = ()


@vlp.register_model("mvp_ve")
class MvpVEModel(classify.VEModel, MvpModel):
  """The SNLI-VE model (`vlpjax.models.classify`) on MVP's towers."""
  config: MvpVEConfig
  config_class = MvpVEConfig



# ----------------------------------------------------------------------------- synthetic batches

# Benchmark batches (`vlpjax.synthetic`): MVPTR's 5 phrase slots and 20 tag tokens.
SYNTHETIC_PHRASES = 5
SYNTHETIC_TAGS = 20


def _synthetic_shapes(config, global_batch: int) -> dict:
  length = int(config.input.max_len) + SYNTHETIC_PHRASES + 1
  text = jax.ShapeDtypeStruct((global_batch, length), jnp.int32)
  tags = jax.ShapeDtypeStruct((global_batch, SYNTHETIC_TAGS), jnp.int32)
  return dict(text_ids=text, text_mask=text, mlm_ids=text, mlm_labels=text, phrase_mask=text, phrase_labels=text,
              concept_ids=tags, concept_mask=tags, concept_mlm_ids=tags, concept_mlm_labels=tags)


def _synthetic_batch(config, rng, batch: dict) -> dict:
  """The base batch's words followed by 5 random phrases and [SEP]; random tags, 15% masked."""
  words = int(config.model.text.vocab_size)
  phrases = int(config.model.get("phrase_vocab_size", 0) or 0)
  b = batch["text_ids"].shape[0]
  phrase_key, tag_key, mask_key = jax.random.split(rng, 3)
  phrase_ids = (jax.random.randint(phrase_key, (b, SYNTHETIC_PHRASES), words, words + phrases) if phrases
                else jnp.zeros((b, SYNTHETIC_PHRASES), jnp.int32))
  tail = jnp.concatenate([phrase_ids, jnp.full((b, 1), 3, jnp.int32)], axis=1)
  ones, minus = jnp.ones_like(tail), -jnp.ones_like(tail)
  phrase_slots = jnp.concatenate([jnp.ones_like(phrase_ids), jnp.zeros((b, 1), jnp.int32)], axis=1)
  tag_ids = jax.random.randint(tag_key, (b, SYNTHETIC_TAGS), 5, words)
  masked = jax.random.uniform(mask_key, tag_ids.shape) < 0.15
  return dict(
      text_ids=jnp.concatenate([batch["text_ids"], tail], axis=1),
      text_mask=jnp.concatenate([batch["text_mask"], ones], axis=1),
      mlm_ids=jnp.concatenate([batch["mlm_ids"], tail], axis=1),
      mlm_labels=jnp.concatenate([batch["mlm_labels"], minus], axis=1),
      phrase_mask=jnp.concatenate([jnp.zeros_like(batch["text_ids"]), phrase_slots], axis=1),
      phrase_labels=jnp.concatenate([-jnp.ones_like(batch["text_ids"]), minus], axis=1),
      concept_ids=tag_ids, concept_mask=jnp.ones_like(tag_ids),
      concept_mlm_ids=jnp.where(masked, 4, tag_ids), concept_mlm_labels=jnp.where(masked, tag_ids, -1))


synthetic.register_extras("mvp", _synthetic_shapes, _synthetic_batch)
