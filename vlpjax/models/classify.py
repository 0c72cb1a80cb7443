"""Classification fine-tuning models: SNLI-VE (`kind = "ve"`) and NLVR2 (`kind = "nlvr"`).

docs/method_spec.md §1.4 (NLVR2 and SNLI-VE rows):

* `VEModel`: the pretraining model plus an MLP head on the fusion CLS,
  Dense(D) -> ReLU -> Dense(num_classes = 3) (0 contradiction, 1 neutral, 2 entailment).
* `NLVRModel`: two images, one sentence. Both images go through the ViT as one [2B] batch, the
  text through the text layers, then through a fusion stack widened as ALBEF's NLVR model does:
  every pretrained fusion layer j becomes a pair of layers, the first cross-attending image 0,
  the second image 1 (ALBEF's 18-layer BERT: layer 6 + 2j attends image 0, 7 + 2j image 1).
  The two layers of a pair share their cross-attention key and value projections (ALBEF's
  `share_cross_attention` ties `crossattention.self.{key,value}` of layers 6 + 2j and 7 + 2j);
  queries, attention outputs, LayerNorms, self-attention and FFN are separate. Heads: an MLP
  D -> D -> ReLU -> 2 on the final CLS (`cls_head`), and a single Dense D -> 3 for the
  text-assignment pre-step (`ta_head`, ALBEF's `model_pretrain_nlvr.py`).

Parameter tree of the widened fusion (`nlvr_fusion`), for pretrained fusion layer j:

  nlvr_fusion/pair_j/cross_key, cross_value     the shared cross-attention key / value Dense
  nlvr_fusion/pair_j/layer_{0,1}/attention, attention_norm, crossattention/{query,out},
                                 crossattention_norm, intermediate, output, output_norm

i.e. `fusion/layer_j` of a pretraining checkpoint with its `crossattention/{key,value}` moved up
to the pair. `NLVRModel.remap_pretrained` builds this tree from `fusion/layer_j`.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpjax.models import bert, layers, vlp


class ClassifierHead(nn.Module):
  """ALBEF's `cls_head`: Dense(hidden) -> ReLU -> Dense(num_classes); logits float32."""
  hidden: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls):
    x = layers.Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="hidden")(cls)
    x = nn.relu(x)
    return layers.Dense(self.num_classes, ("mlp", None), dtype=self.dtype, name="out")(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- SNLI-VE


@dataclasses.dataclass(frozen=True)
class VEConfig(vlp.ModelConfig):
  num_classes: int = 3


@vlp.register_model("ve")
class VEModel(vlp.VLPModel):
  """VLPModel + `cls_head` on the fusion CLS (SNLI-VE).

  Extra methods:
    classify(cls [B,D]) -> logits [B,num_classes] float32
    cls_logits(images [B,H,W,3], text_ids [B,L], text_mask [B,L], deterministic) -> [B,num_classes]
  """
  config: VEConfig
  config_class = VEConfig

  def setup(self):
    super().setup()
    self.cls_head = ClassifierHead(self.config.text.width, self.config.num_classes, self.config.compute_dtype)

  def classify(self, cls):
    return self.cls_head(cls)

  def cls_logits(self, images, text_ids, text_mask, deterministic=True, *, concept_ids=None, concept_mask=None):
    image = self.encode_image(images, concept_ids=concept_ids, concept_mask=concept_mask, deterministic=deterministic)
    text = self.encode_text(text_ids, text_mask, deterministic)
    fused = self.fuse(text["states"], text_mask, image["states"], image["mask"], deterministic=deterministic)
    return self.classify(fused["text_states"][:, 0])

  def __call__(self, images, text_ids, text_mask, deterministic=True):
    out = super().__call__(images, text_ids, text_mask, deterministic)
    out["cls_logits"] = self.cls_logits(images, text_ids, text_mask, deterministic,
                                        **self.init_concepts(text_ids, text_mask))
    return out


# ----------------------------------------------------------------------------- NLVR2


def _attend(query, key, value, mask, dropout_rate: float, deterministic: bool, dtype):
  """Multi-head attention core, as `layers.Attention` computes it.

  query [B,Lq,H,Dh], key/value [B,Lk,H,Dh], mask {0,1} [B,Lk] or None -> context [B,Lq,H*Dh].
  """
  bool_mask = layers.key_padding_mask(mask)
  if dropout_rate > 0.0 and not deterministic:
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * query.shape[-1] ** -0.5
    if bool_mask is not None:
      logits = jnp.where(bool_mask, logits, jnp.finfo(jnp.float32).min)
    weights = nn.Dropout(dropout_rate)(jax.nn.softmax(logits, axis=-1), deterministic=False)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), value)
  else:
    context = jax.nn.dot_product_attention(query, key, value, mask=bool_mask)
  return context.reshape(context.shape[:2] + (-1,))


class SharedKeyValueCrossAttention(nn.Module):
  """Cross-attention whose key/value heads [B,N,H,Dh] are projected by the enclosing pair.

  Owns only the query and output projections (named as in `layers.Attention`).
  """
  num_heads: int
  width: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, key, value, mask=None, *, deterministic=True):
    query = layers.Dense(self.width, ("embed", "heads"), dtype=self.dtype, name="query")(inputs_q)
    query = query.reshape(query.shape[:-1] + (self.num_heads, self.width // self.num_heads))
    context = _attend(query, key, value, mask, self.dropout_rate, deterministic, self.dtype)
    return layers.Dense(self.width, ("heads", "embed"), dtype=self.dtype, name="out")(context)


class NlvrFusionLayer(nn.Module):
  """One layer of a pair: `bert.BertLayer` with cross-attention to pre-projected image keys/values."""
  cfg: bert.TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, image_key, image_value, deterministic=True):
    cfg = self.cfg
    attn = layers.Attention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype, name="attention")
    x = bert.add_and_norm(cfg, self.dtype, "attention_norm", attn(x, x, mask, deterministic=deterministic), x,
                          deterministic)
    cross = SharedKeyValueCrossAttention(cfg.num_heads, cfg.width, cfg.attention_dropout, self.dtype,
                                         name="crossattention")
    x = bert.add_and_norm(cfg, self.dtype, "crossattention_norm",
                          cross(x, image_key, image_value, deterministic=deterministic), x, deterministic)
    return bert.feed_forward_block(cfg, self.dtype, x, deterministic)


class NlvrFusionPair(nn.Module):
  """Two fusion layers made from one pretrained layer: `layer_0` attends image 0, `layer_1`
  image 1, with one cross-attention key/value projection (`cross_key`, `cross_value`) for both."""
  cfg: bert.TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, image0_states, image1_states, deterministic=True):
    cfg = self.cfg
    heads = (cfg.num_heads, cfg.width // cfg.num_heads)
    key_proj = layers.Dense(cfg.width, ("embed", "heads"), dtype=self.dtype, name="cross_key")
    value_proj = layers.Dense(cfg.width, ("embed", "heads"), dtype=self.dtype, name="cross_value")
    for slot, image_states in enumerate((image0_states, image1_states)):
      image_key = key_proj(image_states)
      image_value = value_proj(image_states)
      x = NlvrFusionLayer(cfg, self.dtype, name=f"layer_{slot}")(
          x, mask, image_key.reshape(image_key.shape[:-1] + heads),
          image_value.reshape(image_value.shape[:-1] + heads), deterministic)
    return x


class NlvrFusion(nn.Module):
  """`fusion_layers` pairs; text states [B,L,D] in, text states [B,L,D] out."""
  cfg: bert.TextConfig
  dtype: Any = jnp.float32
  remat: Any = False   # a `layers.remat_policy` value (or bool)

  def setup(self):
    # `deterministic` (argument 5, counting self) must be static under remat.
    pair = layers.remat(NlvrFusionPair, self.remat, static_argnums=(5,))
    self.pairs = [pair(self.cfg, self.dtype, name=f"pair_{j}") for j in range(self.cfg.fusion_layers)]

  def __call__(self, text_states, text_mask, image0_states, image1_states, *, deterministic=True):
    x = text_states
    for pair in self.pairs:
      x = pair(x, text_mask, image0_states, image1_states, deterministic)
    return x


@dataclasses.dataclass(frozen=True)
class NLVRConfig(vlp.ModelConfig):
  num_classes: int = 2
  ta_classes: int = 3


_NLVR_HEADS = ("itc", "itm", "mlm")


def _moved_cross_attention(layer: dict) -> tuple[dict, dict, dict]:
  """Splits a pretrained fusion layer's params into (layer without cross K/V, key, value)."""
  cross = dict(layer["crossattention"])
  key, value = cross.pop("key"), cross.pop("value")
  return {**layer, "crossattention": cross}, key, value


def _new_containers(tree: dict) -> dict:
  return jax.tree.map(lambda leaf: leaf, tree)


@vlp.register_model("nlvr")
class NLVRModel(vlp.VLPModel):
  """VLPModel with ALBEF's widened two-image fusion (`nlvr_fusion`), `cls_head` and `ta_head`.

  The base `fusion` module is never called, so it has no params; `fuse` is not available.
  Extra methods (B = sentences; image states [B,N,Dv]):
    encode_image_pair(image0, image1 [B,H,W,3]) -> (states0, states1), one ViT call on [2B]
    fuse_pair(text_states [B,L,D], text_mask [B,L], image0_states, image1_states, deterministic)
      -> text states [B,L,D]
    pair_cls(image0, image1, text_ids [B,L], text_mask [B,L], deterministic) -> fused CLS [B,D]
    classify(cls [B,D]) -> [B,num_classes]; ta_classify(cls) -> [B,ta_classes] (float32)
    nlvr_logits(image0, image1, text_ids, text_mask, deterministic) -> [B,num_classes]
    ta_logits(image0, image1, text_ids, text_mask, deterministic) -> [B,ta_classes]
  """
  config: NLVRConfig
  config_class = NLVRConfig

  @staticmethod
  def remap_pretrained(params: dict) -> dict:
    """Adds `nlvr_fusion` duplicated from the pretrained `fusion/layer_j` when it is missing.

    pair_j/layer_0 and pair_j/layer_1 both get fusion/layer_j (without its cross-attention
    key/value); pair_j/cross_key / cross_value get fusion/layer_j/crossattention/key / value.
    A checkpoint that already has `nlvr_fusion` (TA pre-step or NLVR fine-tune) is returned
    unchanged; `fusion` itself is kept (reported unused by the partial restore).
    """
    if "nlvr_fusion" in params or "fusion" not in params:
      return params
    fusion = params["fusion"]
    num_layers = len([name for name in fusion if name.startswith("layer_")])
    missing = [f"layer_{j}" for j in range(num_layers) if f"layer_{j}" not in fusion]
    if missing or any("crossattention" not in fusion[f"layer_{j}"] for j in range(num_layers)):
      raise ValueError(f"NLVRModel.remap_pretrained: checkpoint 'fusion' has layers {sorted(fusion)}; "
                       "expected layer_0..layer_{K-1} with cross-attention (config.model.fusion='cross')")
    pairs = {}
    for j in range(num_layers):
      layer, key, value = _moved_cross_attention(fusion[f"layer_{j}"])
      # Fresh containers per copy (the leaves, immutable once loaded, are shared).
      pairs[f"pair_{j}"] = {"layer_0": _new_containers(layer), "layer_1": _new_containers(layer),
                            "cross_key": _new_containers(key), "cross_value": _new_containers(value)}
    return {**params, "nlvr_fusion": pairs}

  def setup(self):
    cfg = self.config
    if cfg.fusion != "cross":
      raise ValueError(f"config.model.kind='nlvr' needs config.model.fusion='cross', got {cfg.fusion!r}")
    unsupported = [h for h in cfg.heads if h not in _NLVR_HEADS]
    if unsupported:
      raise ValueError(f"config.model.kind='nlvr' supports config.model.heads {_NLVR_HEADS}; "
                       f"got {unsupported}")
    super().setup()
    dtype = cfg.compute_dtype
    self.nlvr_fusion = NlvrFusion(cfg.text, dtype, cfg.remat)
    self.cls_head = ClassifierHead(cfg.text.width, cfg.num_classes, dtype)
    self.ta_head = layers.Dense(cfg.ta_classes, ("embed", None), dtype=dtype)

  def encode_image_pair(self, image0, image1, deterministic=True, *, concept0_ids=None, concept0_mask=None,
                        concept1_ids=None, concept1_mask=None):
    """Both images in one ViT call on [2B]; each with its own concepts (ViCHA's kwords1 / kwords2)
    when given. The pair fusion attends to every image token (ViCHA's padding is not masked;
    `image_tokens.mask_padding` is not honoured here)."""
    concepts = {}
    if concept0_ids is not None and concept1_ids is not None:
      ones = lambda ids: jnp.ones(ids.shape, jnp.int32)
      concepts = dict(concept_ids=jnp.concatenate([concept0_ids, concept1_ids], axis=0),
                      concept_mask=jnp.concatenate([ones(concept0_ids) if concept0_mask is None else concept0_mask,
                                                    ones(concept1_ids) if concept1_mask is None else concept1_mask]))
    states = self.encode_image(jnp.concatenate([image0, image1], axis=0), deterministic=deterministic,
                               **concepts)["states"]
    return states[:image0.shape[0]], states[image0.shape[0]:]

  def fuse_pair(self, text_states, text_mask, image0_states, image1_states, deterministic=True):
    return self.nlvr_fusion(text_states, text_mask, image0_states, image1_states, deterministic=deterministic)

  def pair_cls(self, image0, image1, text_ids, text_mask, deterministic=True, **concepts):
    image0_states, image1_states = self.encode_image_pair(image0, image1, deterministic, **concepts)
    text = self.encode_text(text_ids, text_mask, deterministic)
    return self.fuse_pair(text["states"], text_mask, image0_states, image1_states, deterministic)[:, 0]

  def classify(self, cls):
    return self.cls_head(cls)

  def ta_classify(self, cls):
    return self.ta_head(cls).astype(jnp.float32)

  def nlvr_logits(self, image0, image1, text_ids, text_mask, deterministic=True, **concepts):
    """`concepts`: concept0_ids, concept0_mask, concept1_ids, concept1_mask (optional)."""
    return self.classify(self.pair_cls(image0, image1, text_ids, text_mask, deterministic, **concepts))

  def ta_logits(self, image0, image1, text_ids, text_mask, deterministic=True, **concepts):
    return self.ta_classify(self.pair_cls(image0, image1, text_ids, text_mask, deterministic, **concepts))

  def __call__(self, images, text_ids, text_mask, deterministic=True):
    """Creates every param: both slots see `images`; returns a dict of outputs."""
    cfg = self.config
    concepts = self.init_concepts(text_ids, text_mask)
    if concepts:
      concepts = dict(concept0_ids=text_ids, concept0_mask=text_mask, concept1_ids=text_ids,
                      concept1_mask=text_mask)
    image0_states, image1_states = self.encode_image_pair(images, images, deterministic, **concepts)
    text = self.encode_text(text_ids, text_mask, deterministic)
    states = self.fuse_pair(text["states"], text_mask, image0_states, image1_states, deterministic)
    cls = states[:, 0]
    out = dict(nlvr_logits=self.classify(cls), ta_logits=self.ta_classify(cls))
    if "itc" in cfg.heads:
      out.update(image_feat=self.project_image(image0_states[:, 0]),
                 text_feat=self.project_text(text["states"][:, 0]), temp=self.temperature())
    if "itm" in cfg.heads:
      out["itm_logits"] = self.itm_logits(cls)
    if "mlm" in cfg.heads:
      out["mlm_logits"] = self.mlm_logits(states)
    return out
