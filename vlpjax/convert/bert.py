"""Hugging Face BERT key layouts (also inside ALBEF's `text_encoder` and ViCHA's `kw_encoder`).

HF key (under a prefix such as `bert.` or `text_encoder.bert.`) -> vlpjax leaf
  embeddings.{word,position,token_type}_embeddings   -> embeddings/{word,position,token_type}/embedding
  embeddings.LayerNorm                               -> embeddings/norm/norm
  encoder.layer.N.attention.self.{query,key,value}   -> layer_N/attention/{query,key,value}/dense
  encoder.layer.N.attention.output.dense             -> layer_N/attention/out/dense
  encoder.layer.N.attention.output.LayerNorm         -> layer_N/attention_norm/norm
  encoder.layer.N.crossattention.* (ALBEF fusion)    -> layer_N/crossattention/*, layer_N/crossattention_norm
  encoder.layer.N.intermediate.dense                 -> layer_N/intermediate/dense
  encoder.layer.N.output.dense / output.LayerNorm    -> layer_N/output/dense, layer_N/output_norm/norm
  cls.predictions.transform.{dense,LayerNorm}, bias  -> mlm_head/{transform/dense, transform_norm/norm, bias}
  cls.predictions.decoder.{weight,bias}              -> tied to the word embedding and to the bias
"""
import re
from typing import Mapping, Sequence

import numpy as np

from vlpjax.convert import mapping

# Buffers and heads no vlpjax model uses.
IGNORED_BERT = (
    (r"(.*\.)?embeddings\.position_ids", "buffer (positions are computed)"),
    (r"(.*\.)?embeddings\.token_type_ids", "buffer (token types default to 0)"),
    (r"(.*\.)?pooler\.dense\.(weight|bias)", "BERT pooler: unused by ALBEF-style models"),
    (r"(.*\.)?cls\.seq_relationship\.(weight|bias)", "next-sentence-prediction head: unused"),
)


def canonical_layer_norm_key(key: str) -> str:
  """Old (TF-ported) checkpoints name LayerNorm params gamma / beta."""
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def embeddings(src: str, dst: str) -> list[mapping.Entry]:
  """`src` = '<prefix>embeddings', `dst` = '<root>/<tower>/embeddings'."""
  entries = [mapping.copy(f"{src}.{name}_embeddings.weight", f"{dst}/{name}/embedding")
             for name in ("word", "position", "token_type")]
  return entries + mapping.layer_norm(f"{src}.LayerNorm", f"{dst}/norm/norm")


def _attention(src: str, dst: str) -> list[mapping.Entry]:
  entries = []
  for name in ("query", "key", "value"):
    entries += mapping.linear(f"{src}.self.{name}", f"{dst}/{name}/dense")
  return entries + mapping.linear(f"{src}.output.dense", f"{dst}/out/dense")


def layer(src: str, dst: str, cross_attention: bool, feed_forward: bool = True) -> list[mapping.Entry]:
  """One BERT layer: `src` = '<prefix>encoder.layer.N', `dst` = '<root>/<tower>/layer_M'."""
  entries = _attention(f"{src}.attention", f"{dst}/attention")
  entries += mapping.layer_norm(f"{src}.attention.output.LayerNorm", f"{dst}/attention_norm/norm")
  if cross_attention:
    entries += _attention(f"{src}.crossattention", f"{dst}/crossattention")
    entries += mapping.layer_norm(f"{src}.crossattention.output.LayerNorm", f"{dst}/crossattention_norm/norm")
  if feed_forward:
    entries += mapping.linear(f"{src}.intermediate.dense", f"{dst}/intermediate/dense")
    entries += mapping.linear(f"{src}.output.dense", f"{dst}/output/dense")
    entries += mapping.layer_norm(f"{src}.output.LayerNorm", f"{dst}/output_norm/norm")
  return entries


def mlm_head(src: str, dst: str, word_embedding_key: str) -> mapping.Layout:
  """`src` = '<prefix>cls.predictions'; the decoder is tied to the word embeddings."""
  entries = [mapping.copy(f"{src}.bias", f"{dst}/bias")]
  entries += mapping.linear(f"{src}.transform.dense", f"{dst}/transform/dense")
  entries += mapping.layer_norm(f"{src}.transform.LayerNorm", f"{dst}/transform_norm/norm")
  return mapping.Layout(entries=entries,
                        tied=[(f"{src}.decoder.weight", word_embedding_key),
                              (f"{src}.decoder.bias", f"{src}.bias")])


def num_layers(keys: Sequence[str], prefix: str) -> int:
  """1 + the highest N of '<prefix>encoder.layer.N.' keys (0 when there are none)."""
  indices = mapping.layer_indices(keys, re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
  return indices[-1] + 1 if indices else 0


def first_cross_attention_layer(keys: Sequence[str], prefix: str) -> int | None:
  """The first layer N with '<prefix>encoder.layer.N.crossattention.' keys (ALBEF: 6), or None."""
  indices = mapping.layer_indices(keys, re.escape(prefix) + r"encoder\.layer\.(\d+)\.crossattention\.")
  return indices[0] if indices else None


def text_config_from(state_dict: Mapping[str, np.ndarray], prefix: str, text_layers: int,
                     fusion_layers: int, hints: Mapping | None = None) -> dict:
  """TextConfig fields read from the shapes under `prefix` (and an HF config.json for heads / eps;
  `num_heads` is None without one).

  Raises:
    ValueError: a key the shapes are read from is absent (names it).
  """
  hints = hints or {}

  def shape(key):
    if key not in state_dict:
      raise ValueError(f"checkpoint has no key {key!r}; is --source right? (first keys: "
                       f"{sorted(state_dict)[:5]})")
    return state_dict[key].shape

  vocab_size, width = shape(f"{prefix}embeddings.word_embeddings.weight")
  intermediate = f"{prefix}encoder.layer.0.intermediate.dense.weight"
  mlp_dim = (shape(intermediate)[0] if intermediate in state_dict
             else hints.get("intermediate_size", 4 * width))
  # Not in the weights' shapes: None unless a config says it (the importer then refuses to write
  # without one, rather than guess).
  heads = hints.get("num_attention_heads")
  return dict(
      vocab_size=int(vocab_size), width=int(width),
      num_heads=None if heads is None else int(heads),
      mlp_dim=int(mlp_dim), text_layers=int(text_layers), fusion_layers=int(fusion_layers),
      max_positions=int(shape(f"{prefix}embeddings.position_embeddings.weight")[0]),
      type_vocab_size=int(shape(f"{prefix}embeddings.token_type_embeddings.weight")[0]),
      layer_norm_eps=float(hints.get("layer_norm_eps", 1e-12)))


def plan_hf_bert(state_dict: Mapping[str, np.ndarray], target=None, *, fusion_from_bert: bool | None = None,
                 hints: Mapping | None = None, **unused) -> mapping.Plan:
  """Plans an HF BertModel / BertForMaskedLM / BertForPreTraining state dict (`bert.` optional).

  Layers 0 .. text_layers-1 fill `text/layer_*`. With `fusion_from_bert` (default: on when the
  target has fusion layers) the next `fusion_layers` BERT layers fill the self-attention and FFN
  of `fusion/layer_*`, as ALBEF initialises its fusion encoder from BERT layers 6-11; the
  cross-attention stays newly initialised. Without a target, every BERT layer is a text layer.
  A `cls.predictions` MLM head fills `mlm_head`. BERT layers beyond those are unmapped.
  """
  del unused
  sd, origin = mapping.canonicalize(
      state_dict, lambda k: canonical_layer_norm_key(k[len("bert."):] if k.startswith("bert.") else k))
  keys = list(sd)
  bert_layers = num_layers(keys, "")
  if target is not None:
    text_layers, fusion_layers = target.text.text_layers, target.text.fusion_layers
  else:
    text_layers, fusion_layers = bert_layers, 0
  if fusion_from_bert is None:
    fusion_from_bert = fusion_layers > 0
  entries = embeddings("embeddings", "params/text/embeddings")
  for i in range(text_layers):
    entries += layer(f"encoder.layer.{i}", f"params/text/layer_{i}", cross_attention=False)
  ignored = list(IGNORED_BERT)
  notes = []
  if fusion_from_bert and fusion_layers:
    for j in range(fusion_layers):
      entries += layer(f"encoder.layer.{text_layers + j}", f"params/fusion/layer_{j}", cross_attention=False)
    notes.append(f"fusion layers 0..{fusion_layers - 1}: self-attention and FFN from BERT layers "
                 f"{text_layers}..{text_layers + fusion_layers - 1}; any cross-attention is newly "
                 "initialised")
  else:
    ignored += [(rf"encoder\.layer\.{i}\..*", "--nofusion_from_bert: fusion layers are not taken from BERT")
                for i in range(text_layers, text_layers + fusion_layers)]
  layout = mapping.Layout(entries=entries, ignored=ignored)
  scope = ("text", "fusion")
  if any(k.startswith("cls.predictions.") for k in keys):
    layout.extend(mlm_head("cls.predictions", "params/mlm_head", "embeddings.word_embeddings.weight"))
    scope += ("mlm_head",)
  model_config = dict(text=text_config_from(sd, "", text_layers, fusion_layers, hints))
  return mapping.Plan(layout=layout, state_dict=sd, origin=origin, model_config=model_config,
                      scope=scope, notes=notes)
