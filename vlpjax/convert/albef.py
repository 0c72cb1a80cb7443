"""ALBEF and ViCHA PyTorch checkpoints (docs/method_spec.md §1.5, §2.5).

Online modules go to `params/`, their `_m` momentum mirrors to `ema_params/` (the EMA tree has
the structure of the params; modules without a mirror, `itm_head` and `temp`, copy the online
value). A checkpoint without any `_m` key (released fine-tuned files) gets EMA = online.

ALBEF key                                       -> vlpjax leaf
  visual_encoder.*  (timm ViT)                  -> vision/*  (see vit.py)
  text_encoder.bert.embeddings.*                -> text/embeddings/*  (see bert.py)
  text_encoder.bert.encoder.layer.N (N < F)     -> text/layer_N  (F: first layer with crossattention, 6)
  text_encoder.bert.encoder.layer.N (N >= F)    -> fusion/layer_{N-F}  (+ crossattention)
  text_encoder.cls.predictions.*                -> mlm_head/*  (decoder tied to the word embedding)
  vision_proj / text_proj                       -> vision_proj/proj/dense, text_proj/proj/dense
  itm_head, temp                                -> itm_head/dense, temp
  cls_head.0 / cls_head.2 (SNLI-VE, 3 classes)  -> cls_head/{hidden,out}/dense (model kind 've')
NLVR2 files (2-class cls_head, or ta_head; model kind 'nlvr'): the text encoder has 2 layers per
fusion layer, 6 + 2j attending image 0 and 7 + 2j image 1, sharing cross-attention key / value:
  text_encoder.bert.encoder.layer.(F + 2j + s)  -> nlvr_fusion/pair_j/layer_s (cross-attention
                                                   query / out / norm, self-attention, FFN)
  ...layer.(F + 2j).crossattention.self.key/value -> nlvr_fusion/pair_j/cross_key, cross_value
  ...layer.(F + 2j + 1).crossattention.self.key/value: tied to layer F + 2j's (checked equal)
  cls_head (2 classes), ta_head                 -> cls_head/{hidden,out}/dense, ta_head/dense
  text_decoder.bert.embeddings.* (VQA)          -> answer_decoder/embeddings/*  (model kind 'vqa')
  text_decoder.bert.encoder.layer.N             -> answer_decoder/layer_N (+ crossattention)
  text_decoder.cls.predictions.*                -> answer_decoder/lm_head/* (decoder tied)
  image_queue / text_queue [256, Q]             -> queues image / text [Q, 256] (transposed)
  queue_ptr [1], idx_queue [1, Q]               -> queues ptr (int32 scalar), idx [Q] (int32, empty = -1)
Downstream files name the text encoder `text_encoder.` (a BertModel); it is read as `text_encoder.bert.`.

ViCHA adds (`--source=vicha`; configs/vicha.py's model: image_tokens of kind 'concepts', heads
hitc and mae, vlpjax/models/{concepts,hitc,mae}.py):
  kw_encoder.* (n-layer BertModel, + `_m`)      -> image_tokens/{embeddings, layer_N}
  kw_proj (+ `_m`)                              -> image_tokens/proj/dense
  vision_proj_hidden.L                          -> vision_proj_hidden_L/proj/dense
  text_proj_hidden.L                            -> text_proj_hidden_L/proj/dense
  decoder_embed                                 -> mae_decoder/embed/dense
  decoder_pos_embed                             -> (none: MAE's fixed sin-cos table, a constant of the
                                                   model computed from its grid; checked equal to
                                                   `mae.sincos_table` at the checkpoint's grid)
  decoder_blocks.N (timm blocks), decoder_norm  -> mae_decoder/block_N/*, mae_decoder/norm/norm
  mask_token, mae_proj                          -> mae_decoder/mask_token, mae_decoder/pred/dense
The model config read from a ViCHA file: image_tokens = {kind: concepts, layers: n (kw_encoder's),
mask_padding: False}; with the hierarchical projections, head hitc with L levels at ViCHA's
indices (ViT blocks depth-1-L .. depth-2 and text layers T-1-L .. T-2, 0-based: its hidden states
[-(L+1):-1]); with the decoder, head mae (width, depth from the shapes; 16 heads, fixed in ViCHA's
code; decoder_norm eps 1e-5; CLS without position).
"""
import json
import os
import re
from typing import Mapping

import numpy as np

from vlpjax.convert import bert, mapping, resample, vit

ONLINE, MOMENTUM = ("", "params"), ("_m", "ema_params")
# Modules ALBEF keeps a momentum copy of; ViCHA adds the concept encoder and its projection.
MOMENTUM_MODULES = ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "cls_head",
                    "text_decoder")
VICHA_MOMENTUM_MODULES = ("kw_encoder", "kw_proj")
_TEXT_EMBEDDING_NAMES = r"(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm|position_ids)"


def canonical_key(key: str) -> str:
  """One name per parameter: `text_encoder[_m].bert.*`, `kw_encoder[_m].embeddings.*`, and
  LayerNorm `weight` / `bias` for the old `gamma` / `beta`."""
  key = bert.canonical_layer_norm_key(key)
  key = re.sub(r"^(text_encoder(?:_m)?)\.(?!bert\.|cls\.)", r"\1.bert.", key)
  key = re.sub(r"^(kw_encoder(?:_m)?)\.bert\.", r"\1.", key)
  # ViCHA with num_hidden_layers_kw = 0 uses a bare BertEmbeddings as kw_encoder.
  return re.sub(rf"^(kw_encoder(?:_m)?)\.{_TEXT_EMBEDDING_NAMES}\b", r"\1.embeddings.\2", key)


def stored_config_hints(stored: Mapping | None, input_path: str) -> tuple[dict | None, list[str]]:
  """The BERT config named by the training config an ALBEF / ViCHA file stores (`{'config': ...}`).

  ALBEF's YAML config holds `bert_config: 'configs/config_bert.json'` (heads, LayerNorm eps,
  fusion_layer), read here relative to the working directory, then to the checkpoint's folder (an
  inline dict is used as is); the ViT's head count is fixed in ALBEF's code and stored nowhere.

  Returns:
    (hints for `bert.text_config_from`, or None; notes for the report).
  """
  if not stored:
    return None, []
  source = stored.get("bert_config")
  if isinstance(source, Mapping):
    return dict(source), ["text heads / LayerNorm eps from the checkpoint's stored config (bert_config)"]
  if not isinstance(source, str):
    return None, []
  for candidate in (source, os.path.join(os.path.dirname(os.path.abspath(input_path)), source)):
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return json.load(f), [f"text heads / LayerNorm eps from {candidate} (the stored config's bert_config)"]
  return None, [f"the stored config's bert_config {source!r} was not found: text heads unknown"]


def _has(keys, prefix: str) -> bool:
  return any(k.startswith(prefix) for k in keys)


def _queue_entries(keys) -> list[mapping.Entry]:
  entries = []
  if {"image_queue", "text_queue", "queue_ptr"} & keys:
    for name in ("image", "text"):
      entries.append(mapping.Entry(f"{name}_queue", lambda x, n=name: {
          f"queues/{n}": np.ascontiguousarray(x.T, dtype=np.float32)}))
    entries.append(mapping.Entry("queue_ptr", lambda x: {
        "queues/ptr": np.asarray(x.reshape(-1)[0], np.int32)}))
  if "idx_queue" in keys:
    # ALBEF marks empty slots with -100, vlpjax with -1; image ids are never negative.
    entries.append(mapping.Entry("idx_queue", lambda x: {
        "queues/idx": np.where(x.reshape(-1) < 0, -1, x.reshape(-1)).astype(np.int32)}))
  return entries


def _nlvr_fusion_layer(text: str, root: str, index: int, fusion_start: int) -> mapping.Layout:
  """Text-encoder layer `index` >= `fusion_start` of an NLVR2 file as slot s of pair j."""
  j, slot = divmod(index - fusion_start, 2)
  src, pair = f"{text}encoder.layer.{index}", f"{root}/nlvr_fusion/pair_{j}"
  dst = f"{pair}/layer_{slot}"
  entries = bert.layer(src, dst, cross_attention=False)
  cross = f"{src}.crossattention"
  entries += mapping.linear(f"{cross}.self.query", f"{dst}/crossattention/query/dense")
  entries += mapping.linear(f"{cross}.output.dense", f"{dst}/crossattention/out/dense")
  entries += mapping.layer_norm(f"{cross}.output.LayerNorm", f"{dst}/crossattention_norm/norm")
  layout = mapping.Layout(entries=entries)
  for name in ("key", "value"):
    if slot == 0:
      layout.entries += mapping.linear(f"{cross}.self.{name}", f"{pair}/cross_{name}/dense")
    else:
      first = f"{text}encoder.layer.{index - 1}.crossattention.self.{name}"
      layout.tied += [(f"{cross}.self.{name}.{p}", f"{first}.{p}") for p in ("weight", "bias")]
  return layout


def _tower_layout(keys, suffix: str, root: str, *, depth: int, grid: int, bert_layers: int,
                  fusion_start: int, has_mlm: bool, vicha: bool, nlvr: bool = False) -> mapping.Layout:
  """The online (suffix '') or momentum (suffix '_m') copy of every module that has one."""
  entries = vit.timm_vit(f"visual_encoder{suffix}.", f"{root}/vision", depth, grid)
  text = f"text_encoder{suffix}.bert."
  entries += bert.embeddings(f"{text}embeddings", f"{root}/text/embeddings")
  layout = mapping.Layout()
  for i in range(bert_layers):
    if i < fusion_start:
      entries += bert.layer(f"{text}encoder.layer.{i}", f"{root}/text/layer_{i}", cross_attention=False)
    elif nlvr:
      layout.extend(_nlvr_fusion_layer(text, root, i, fusion_start))
    else:
      entries += bert.layer(f"{text}encoder.layer.{i}", f"{root}/fusion/layer_{i - fusion_start}",
                            cross_attention=True)
  layout.entries = entries + layout.entries
  if has_mlm:
    layout.extend(bert.mlm_head(f"text_encoder{suffix}.cls.predictions", f"{root}/mlm_head",
                                f"{text}embeddings.word_embeddings.weight"))
  for proj in ("vision_proj", "text_proj"):
    if _has(keys, f"{proj}."):
      layout.entries += mapping.linear(f"{proj}{suffix}", f"{root}/{proj}/proj/dense")
  if vicha and _has(keys, "kw_encoder."):
    concept = f"kw_encoder{suffix}."
    layout.entries += bert.embeddings(f"{concept}embeddings", f"{root}/image_tokens/embeddings")
    for i in range(bert.num_layers(keys, "kw_encoder.")):
      layout.entries += bert.layer(f"{concept}encoder.layer.{i}", f"{root}/image_tokens/layer_{i}",
                                   cross_attention=False)
  if vicha and _has(keys, "kw_proj."):
    layout.entries += mapping.linear(f"kw_proj{suffix}", f"{root}/image_tokens/proj/dense")
  if _has(keys, "cls_head."):
    # ALBEF's VE head: Sequential(Linear(D, D), ReLU, Linear(D, 3)).
    layout.entries += mapping.linear(f"cls_head{suffix}.0", f"{root}/cls_head/hidden/dense")
    layout.entries += mapping.linear(f"cls_head{suffix}.2", f"{root}/cls_head/out/dense")
  if _has(keys, "text_decoder."):
    # ALBEF's VQA answer decoder: a BertLMHeadModel with cross-attention in every layer.
    decoder, dst = f"text_decoder{suffix}.bert.", f"{root}/answer_decoder"
    layout.entries += bert.embeddings(f"{decoder}embeddings", f"{dst}/embeddings")
    for i in range(bert.num_layers(keys, "text_decoder.bert.")):
      layout.entries += bert.layer(f"{decoder}encoder.layer.{i}", f"{dst}/layer_{i}",
                                   cross_attention=True)
    layout.extend(bert.mlm_head(f"text_decoder{suffix}.cls.predictions", f"{dst}/lm_head",
                                f"{decoder}embeddings.word_embeddings.weight"))
  return layout


def _fixed_sincos_entry(key: str) -> mapping.Entry:
  """ViCHA's `decoder_pos_embed` [1, 1 + g*g, D]: MAE's fixed sin-cos table, which vlpjax computes
  from the model's grid (`models.mae.sincos_table`) instead of storing; converted to no leaf after
  checking that it is that table (a trained or foreign table is refused, naming the key)."""

  def check(x):
    from vlpjax.models import mae  # the model's definition of the table
    grid = resample.grid_size(x, key)
    expected = mae.sincos_table(x.shape[-1], grid)
    error = float(np.max(np.abs(x.astype(np.float64) - expected)))
    if error > 1e-5:
      raise ValueError(f"checkpoint key {key!r} is not MAE's fixed 2-D sin-cos table of a {grid}x{grid} grid "
                       f"(max |difference| {error:.3g}); vlpjax recomputes that table, so this checkpoint's "
                       "decoder cannot be represented")
    return {}

  return mapping.Entry(key, check)


def _vicha_online_entries(keys) -> list[mapping.Entry]:
  """Hierarchical-alignment heads and the MAE branch (no momentum copies)."""
  entries = []
  for side in ("vision", "text"):
    for level in mapping.layer_indices(keys, rf"{side}_proj_hidden\.(\d+)\."):
      entries += mapping.linear(f"{side}_proj_hidden.{level}",
                                f"params/{side}_proj_hidden_{level}/proj/dense")
  if _has(keys, "decoder_"):
    entries += mapping.linear("decoder_embed", "params/mae_decoder/embed/dense")
    entries.append(_fixed_sincos_entry("decoder_pos_embed"))
    for i in range(vit.timm_depth(keys, "decoder_")):
      entries += vit.timm_block(f"decoder_blocks.{i}", f"params/mae_decoder/block_{i}")
    entries += mapping.layer_norm("decoder_norm", "params/mae_decoder/norm/norm")
  if {"mask_token", "mae_proj.weight"} & keys:
    entries.append(mapping.copy("mask_token", "params/mae_decoder/mask_token"))
    entries += mapping.linear("mae_proj", "params/mae_decoder/pred/dense")
  return entries


def plan_albef(state_dict: Mapping[str, np.ndarray], target=None, *, image_res: int | None = None,
               vicha: bool = False, hints: Mapping | None = None, **unused) -> mapping.Plan:
  """Plans an ALBEF (or, with `vicha`, ViCHA) pretraining or downstream state dict.

  Which optional modules are expected follows the keys present: the MLM head, ITM head,
  projections, queues, ViCHA's parts, and the momentum mirrors (all of them once any `_m` key
  exists). Within a module every key is expected. The layer split and widths come from the
  file; the importer checks them against `target`. `hints`: a BERT config (`stored_config_hints`)
  for the text heads and LayerNorm eps.
  """
  del target, unused
  sd, origin = mapping.canonicalize(state_dict, canonical_key)
  keys = set(sd)
  text = "text_encoder.bert."
  if "visual_encoder.pos_embed" not in keys or f"{text}embeddings.word_embeddings.weight" not in keys:
    raise ValueError("not an ALBEF/ViCHA state dict: it needs 'visual_encoder.pos_embed' and "
                     "'text_encoder.bert.embeddings.word_embeddings.weight' "
                     f"(first keys: {sorted(keys)[:5]})")
  classes = sd["cls_head.2.weight"].shape[0] if "cls_head.2.weight" in keys else None
  nlvr = classes == 2 or _has(keys, "ta_head.")
  if classes is not None and classes not in (2, 3):
    raise ValueError(f"cls_head with {classes} outputs: ALBEF's heads have 3 (SNLI-VE) or 2 "
                     "(NLVR2) classes")
  depth = vit.timm_depth(keys, "visual_encoder.")
  bert_layers = bert.num_layers(keys, text)
  fusion_start = bert.first_cross_attention_layer(keys, text)
  fusion_start = bert_layers if fusion_start is None else fusion_start
  vision_cfg = vit.vision_config_from(
      sd, pos_key="visual_encoder.pos_embed", patch_key="visual_encoder.patch_embed.proj.weight",
      fc1_key="visual_encoder.blocks.0.mlp.fc1.weight", depth=depth, image_res=image_res)
  grid = vision_cfg["image_size"] // vision_cfg["patch_size"]
  has_mlm = _has(keys, "text_encoder.cls.")
  momentum_modules = MOMENTUM_MODULES + (VICHA_MOMENTUM_MODULES if vicha else ())
  has_momentum = any(_has(keys, f"{module}_m.") for module in momentum_modules)

  layout = mapping.Layout(ignored=list(bert.IGNORED_BERT))
  for suffix, root in (ONLINE, MOMENTUM) if has_momentum else (ONLINE,):
    layout.extend(_tower_layout(keys, suffix, root, depth=depth, grid=grid, bert_layers=bert_layers,
                                fusion_start=fusion_start, has_mlm=has_mlm, vicha=vicha, nlvr=nlvr))
  if _has(keys, "itm_head."):
    layout.entries += mapping.linear("itm_head", "params/itm_head/dense")
  if _has(keys, "ta_head."):
    layout.entries += mapping.linear("ta_head", "params/ta_head/dense")
  # A 0-d parameter in ALBEF; accept a [1] tensor as well.
  layout.entries.append(mapping.Entry("temp", lambda x: {
      "params/temp": np.asarray(x, np.float32).reshape(())}))
  layout.entries += _queue_entries(keys)
  if vicha:
    layout.entries += _vicha_online_entries(keys)

  heads = ["itc"] + (["itm"] if _has(keys, "itm_head.") else []) + (["mlm"] if has_mlm else [])
  embed_dim = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in keys else 256
  model_config = dict(
      vision=vision_cfg,
      text=bert.text_config_from(sd, text, fusion_start,
                                 (bert_layers - fusion_start) // (2 if nlvr else 1), hints),
      fusion="cross", embed_dim=int(embed_dim), heads=heads)
  if nlvr:
    model_config.update(kind="nlvr")
  elif classes is not None:
    model_config.update(kind="ve", num_classes=int(classes))
  if _has(keys, "text_decoder."):
    model_config.update(kind="vqa", vqa_mode="generate",
                        answer_layers=bert.num_layers(keys, "text_decoder.bert."))
  extra_scope = ()
  if vicha:
    extra_scope = _vicha_model_config(sd, model_config, depth=depth, text_layers=fusion_start)
  notes = vit.resample_note(sd, "visual_encoder.pos_embed", grid)
  if not has_momentum:
    notes.append("no momentum (_m) weights: EMA params synthesised as a copy of the online params")
  if _has(keys, "image_queue") and "idx_queue" not in keys:
    notes.append("no idx_queue: queue ids set to -1 (empty)")
  return mapping.Plan(layout=layout, state_dict=sd, origin=origin, model_config=model_config,
                      scope=("vision", "text", "fusion", "vision_proj", "text_proj", "itm_head",
                             "mlm_head", "temp", "cls_head", "answer_decoder", "nlvr_fusion",
                             "ta_head") + extra_scope,
                      momentum="checkpoint" if has_momentum else "synthesised", notes=notes)


def _vicha_model_config(sd: Mapping[str, np.ndarray], model_config: dict, *, depth: int,
                        text_layers: int) -> tuple[str, ...]:
  """Adds ViCHA's parts present in `sd` to `model_config` (in place); returns their param subtrees."""
  keys = set(sd)
  scope = []
  if _has(keys, "kw_encoder."):
    model_config["image_tokens"] = dict(kind="concepts", layers=bert.num_layers(keys, "kw_encoder."),
                                        mask_padding=False)
    scope.append("image_tokens")
  levels = len(mapping.layer_indices(keys, r"vision_proj_hidden\.(\d+)\."))
  head_config = {}
  if levels:
    # ViCHA aligns hidden_states[-(L+1):-1] of both towers (the ViT's: one per block; BERT's: the
    # embeddings, then one per layer).
    head_config["hitc"] = dict(vision_layers=tuple(range(depth - 1 - levels, depth - 1)),
                               text_layers=tuple(range(text_layers - 1 - levels, text_layers - 1)),
                               embed_dim=0)  # 0 = the model's embed_dim
    if sd["vision_proj_hidden.0.weight"].shape[0] != model_config["embed_dim"]:
      head_config["hitc"]["embed_dim"] = int(sd["vision_proj_hidden.0.weight"].shape[0])
    scope += [f"{side}_proj_hidden_{level}" for side in ("vision", "text") for level in range(levels)]
  if "decoder_embed.weight" in keys:
    head_config["mae"] = dict(width=int(sd["decoder_embed.weight"].shape[0]),
                              depth=vit.timm_depth(keys, "decoder_"), num_heads=16, mlp_ratio=float(
                                  sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / sd["decoder_embed.weight"].shape[0]),
                              norm_eps=1e-5, cls_position=False)
    scope.append("mae_decoder")
  model_config["heads"] = list(model_config["heads"]) + list(head_config)
  if head_config:
    model_config["head_config"] = head_config
  return tuple(scope)


def plan_vicha(state_dict, target=None, **options) -> mapping.Plan:
  return plan_albef(state_dict, target, vicha=True, **options)
