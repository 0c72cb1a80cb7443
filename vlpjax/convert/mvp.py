"""MVPTR checkpoints (Hugging Face-style directories: `pytorch_model.bin` + `config.json`) -> the
`mvp` model kind.

MVPTR's `BiBertImgForPreTraining` (Junction4Nako/mvp_pytorch, oscar/modeling/modeling_vlbert.py)
holds, under `bert.` (`BiBertImgModel`): the shared `embeddings` (word table = words + phrases),
`txt_encoder`, `vis_encoder` and `mul_encoder` (6 post-LN BERT layers each, `encoder.layer.N`
layout), `pooler`, the global projections `txt_proj` / `vis_proj` (bare [768, 768] matrices, used
as `cls @ proj`) and the region-feature embedding `img_embedding` (Linear 2054 -> 768, optional
`LayerNorm`); and beside it `cls` (`BertPreTrainingHeads` over the word vocabulary only:
`predictions` = the MLM head, `seq_relationship` = the ITM head), `half_mlm` (the tag head of
MCR, also over the words), `qa_head` and `logit_scale`.

What maps where (vlpjax's MVP runs on ViT patches, docs/method_spec.md §5.5):

  bert.embeddings.*                   -> text/embeddings/* (the whole table, phrase rows included;
                                         the tags use the same embeddings, as in MVPTR)
  bert.txt_encoder.layer.N            -> text/layer_N
  bert.mul_encoder.layer.N            -> fusion/layer_N (the merged cross-modal encoder; its
                                         modality embedding, which MVPTR lacks, is written as zeros)
  bert.pooler.dense                   -> pooler/dense
  bert.txt_proj / bert.vis_proj       -> vsc_head/txt_proj / vis_proj (already [in, out])
  logit_scale                         -> vsc_head/logit_scale
  cls.predictions.{bias, transform}   -> mlm_head (decoder tied to the word rows of the table)
  cls.seq_relationship                -> itm_head, its two classes swapped: MVPTR's pre-training
                                         labels a matched pair 0 (BERT's "is next"), vlpjax 1
  half_mlm.{bias, transform}          -> mcr_head (decoder tied to the word rows)

Skipped with a reason (in the report): `bert.vis_encoder.*` (MVPTR's visual encoder is 6 BERT
layers over [tags ; region features]; vlpjax's is the ViT over patches, whose pre-LN blocks
have no counterpart: initialise the ViT from a ViT checkpoint), `bert.img_embedding.*` and the
image `bert.LayerNorm` (the region-feature embedding 2054 -> 768 has no counterpart on ViT
patches), `qa_head.*` (pre-training QA head), `classifier.*` (a fine-tuned task head), buffers.
`vision/*` is therefore never filled by this importer.
"""
import re
from typing import Mapping

import numpy as np

from vlpjax.convert import bert, mapping

SYNTHESISED_MODALITY = "(synthesised) fusion modality embedding = zeros"
_IGNORED = (
    (r"bert\.vis_encoder\..*", "MVPTR's visual encoder (BERT layers over [tags ; region features]) has no "
                               "counterpart: vlpjax's visual encoder is the ViT over patches"),
    (r"bert\.img_embedding\..*", "region-feature embedding (2054 -> 768): no counterpart on ViT patches"),
    (r"bert\.LayerNorm\..*", "LayerNorm of the region-feature embedding: no counterpart on ViT patches"),
    (r"bert\.code_embeddings\..*", "discrete image-code embedding: no counterpart on ViT patches"),
    (r"qa_head\..*", "pre-training QA head: unused"),
    (r"classifier\..*", "task classifier of a fine-tuned MVPTR checkpoint: finetune a new head"),
    (r"(.*\.)?embeddings\.position_ids", "buffer (positions are computed)"),
    (r"(.*\.)?embeddings\.token_type_ids", "buffer"),
)


def _swapped_classes(key: str, dst: str) -> list[mapping.Entry]:
  """`cls.seq_relationship` -> `itm_head/dense` with the classes in vlpjax's order (1 = match)."""

  def weight(x):
    if x.shape[0] != 2:
      raise ValueError(f"checkpoint key {key}.weight: expected 2 classes (MVPTR pre-training), got {x.shape}")
    return {f"{dst}/kernel": np.ascontiguousarray(x[::-1].T, np.float32)}

  return [mapping.Entry(f"{key}.weight", weight),
          mapping.Entry(f"{key}.bias", lambda x: {f"{dst}/bias": np.ascontiguousarray(x[::-1], np.float32)})]


def _prediction_head(src: str, dst: str, state_dict, word_table_key: str) -> mapping.Layout:
  """A word-vocabulary prediction head whose decoder is tied to (the word rows of) the table."""
  entries = [mapping.copy(f"{src}.bias", f"{dst}/bias")]
  entries += mapping.linear(f"{src}.transform.dense", f"{dst}/transform/dense")
  entries += mapping.layer_norm(f"{src}.transform.LayerNorm", f"{dst}/transform_norm/norm")
  layout = mapping.Layout(entries=entries, tied=[(f"{src}.decoder.bias", f"{src}.bias")])
  decoder = state_dict.get(f"{src}.decoder.weight")
  table = state_dict.get(word_table_key)
  if decoder is not None and table is not None:
    if np.array_equal(decoder, table[:decoder.shape[0]]):
      layout.ignored.append((re.escape(f"{src}.decoder.weight"),
                             f"tied: the first {decoder.shape[0]} (word) rows of {word_table_key}"))
    # A decoder that is no copy of the table cannot be represented (vlpjax ties it): unmapped.
  return layout


def plan_mvp(state_dict: Mapping[str, np.ndarray], target=None, *, hints: Mapping | None = None,
             **unused) -> mapping.Plan:
  """Plans an MVPTR state dict (see the module docstring).

  Without a target the model config is read from the shapes: the word vocabulary is the length
  of `cls.predictions.bias` (MVPTR's heads cover the words only), the phrase rows are the rest
  of the table; text / cross-modal layers from the layer indices; head counts from `hints` (the
  checkpoint's config.json).
  """
  del unused
  sd, origin = mapping.canonicalize(state_dict, bert.canonical_layer_norm_key)
  keys = list(sd)
  if "bert.embeddings.word_embeddings.weight" not in sd:
    raise ValueError(f"not an MVPTR checkpoint: no bert.embeddings.word_embeddings.weight (first keys: {sorted(sd)[:5]})")
  text_layers = bert.num_layers(keys, "bert.txt_")  # bert.txt_encoder.layer.N
  mul_layers = bert.num_layers(keys, "bert.mul_")
  if target is not None:
    if target.text.text_layers != text_layers or target.text.fusion_layers != mul_layers:
      raise ValueError(f"the checkpoint has {text_layers} text and {mul_layers} cross-modal layers; the target config "
                       f"has text.text_layers={target.text.text_layers}, text.fusion_layers={target.text.fusion_layers}")
  table_key = "bert.embeddings.word_embeddings.weight"
  entries = bert.embeddings("bert.embeddings", "params/text/embeddings")
  for i in range(text_layers):
    entries += bert.layer(f"bert.txt_encoder.layer.{i}", f"params/text/layer_{i}", cross_attention=False)
  for i in range(mul_layers):
    entries += bert.layer(f"bert.mul_encoder.layer.{i}", f"params/fusion/layer_{i}", cross_attention=False)
  entries += mapping.linear("bert.pooler.dense", "params/pooler/dense")
  layout = mapping.Layout(entries=entries, ignored=list(_IGNORED))
  scope = ["text", "fusion", "pooler"]
  heads = []
  notes = ["vision/*: MVPTR has no ViT (its visual encoder reads region features); the ViT keeps its "
           "initialisation (start it from a ViT checkpoint)"]
  if "bert.txt_proj" in sd:
    layout.entries += [mapping.copy("bert.txt_proj", "params/vsc_head/txt_proj"),
                       mapping.copy("bert.vis_proj", "params/vsc_head/vis_proj"),
                       mapping.copy("logit_scale", "params/vsc_head/logit_scale")]
    heads.append("vsc")
    scope.append("vsc_head")
    notes.append("vsc_head/vis_proj: MVPTR trained it on its visual encoder's CLS; here it reads the ViT's")
  if "cls.seq_relationship.weight" in sd:
    layout.entries += _swapped_classes("cls.seq_relationship", "params/itm_head/dense")
    heads.append("itm")
    scope.append("itm_head")
    notes.append("itm_head: cls.seq_relationship with its classes swapped (MVPTR labels a match 0)")
  if "cls.predictions.bias" in sd:
    layout.extend(_prediction_head("cls.predictions", "params/mlm_head", sd, table_key))
    heads.append("mlm")
    scope.append("mlm_head")
  if "half_mlm.bias" in sd:
    layout.extend(_prediction_head("half_mlm", "params/mcr_head", sd, table_key))
    heads.append("mcr")
    scope.append("mcr_head")
  width = int(sd[table_key].shape[1])
  if mul_layers:
    sd[SYNTHESISED_MODALITY] = np.zeros([2, width], np.float32)
    origin[SYNTHESISED_MODALITY] = SYNTHESISED_MODALITY
    layout.entries.append(mapping.copy(SYNTHESISED_MODALITY, "params/fusion/modality_embedding"))
    notes.append("fusion/modality_embedding: zeros (MVPTR's cross-modal encoder adds none)")
  word_vocab = int(sd["cls.predictions.bias"].shape[0]) if "cls.predictions.bias" in sd else int(
      (hints or {}).get("only_word_size", sd[table_key].shape[0]))
  text = bert.text_config_from(sd, "bert.", text_layers, mul_layers, _hints_with_mlp(sd, hints))
  model_config = dict(kind="mvp", fusion="merged", heads=tuple(heads), text=dict(text, vocab_size=word_vocab),
                      phrase_vocab_size=int(sd[table_key].shape[0]) - word_vocab,
                      image_tokens=dict(kind="mvp_tags"))
  if "bert.txt_proj" in sd:
    model_config["embed_dim"] = int(sd["bert.txt_proj"].shape[1])
    # No vision weights: a stand-in tower of the projection's input width for the shape check.
    model_config["vision"] = dict(image_size=16, patch_size=8, width=int(sd["bert.vis_proj"].shape[0]), depth=1,
                                  num_heads=1, mlp_ratio=1.0)
  return mapping.Plan(layout=layout, state_dict=sd, origin=origin, model_config=model_config, scope=tuple(scope),
                      notes=notes)


def _hints_with_mlp(sd, hints):
  """config.json hints with the MLP width read from the weights (MVPTR has no `bert.encoder`)."""
  hints = dict(hints or {})
  for key in ("bert.txt_encoder.layer.0.intermediate.dense.weight", "bert.mul_encoder.layer.0.intermediate.dense.weight"):
    if key in sd:
      hints["intermediate_size"] = int(sd[key].shape[0])
      break
  return hints
