"""ViCHA importer: a state dict built here from ViCHA's documented key names (docs/method_spec.md §2.5:
ALBEF's keys + kw_encoder, kw_proj, vision/text_proj_hidden, the MAE decoder, mask_token, mae_proj
and the `_m` mirrors) converts with every key accounted for, and the converted model computes what
ViCHA's PyTorch forward computes: a float64 NumPy re-implementation read from the torch keys of the
visual-concept path, one hierarchical level, and the MAE reconstruction.
"""
import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlpjax.convert import convert_state_dict, importer
from vlpjax.models import hitc, mae, vlp
from parity import max_relative_error
from test_convert_albef import (Dims, albef_state_dict, model_config, np_attention, np_bert_layer, np_gelu,
                                np_layer_norm, np_linear)

# 4 ViT blocks, 3 text + 2 fusion layers, 2 hierarchical levels (ViT blocks 1, 2 with text layers 0, 1).
D = Dims(depth=4, layers=5, fusion_start=3, hidden_levels=2, decoder_width=16, decoder_depth=2)
DECODER_HEADS = 16  # fixed in ViCHA's code


def mae_sincos_reference(width: int, grid: int) -> np.ndarray:
  """MAE's get_2d_sincos_pos_embed(width, grid, cls_token=True), written as its code reads:
  meshgrid(w, h) (so plane 0 is the column index), half the channels per plane, 1-D sin|cos."""
  grid_h = np.arange(grid, dtype=np.float32)
  grid_w = np.arange(grid, dtype=np.float32)
  planes = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([one_d(width // 2, planes[0]), one_d(width // 2, planes[1])], axis=1)
  return np.concatenate([np.zeros([1, width]), table], axis=0)[None].astype(np.float32)


def vicha_state_dict(d: Dims = D, **kwargs) -> dict:
  sd = albef_state_dict(d, vicha=True, **kwargs)
  sd["decoder_pos_embed"] = mae_sincos_reference(d.decoder_width, d.grid)  # fixed, as ViCHA builds it
  return sd


def vicha_config(d: Dims = D) -> vlp.ModelConfig:
  base = model_config(d, heads=("itc", "itm", "mlm", "hitc", "mae"))
  levels = d.hidden_levels
  return dataclasses.replace(
      base, image_tokens=vlp.image_tokens_spec("concepts").config_class(layers=d.concept_layers),
      head_config=(("hitc", hitc.HitcConfig(vision_layers=tuple(range(d.depth - 1 - levels, d.depth - 1)),
                                            text_layers=tuple(range(d.fusion_start - 1 - levels, d.fusion_start - 1)))),
                   ("mae", mae.MaeConfig(width=d.decoder_width, depth=d.decoder_depth, num_heads=DECODER_HEADS))))


# --- float64 NumPy re-implementation of ViCHA's forward, read from the torch keys --------------

def np_block(sd, block, x, heads, eps=1e-6):
  """timm Block: x + attn(LN(x)); x + mlp(LN(x)), fused qkv."""
  y = np_layer_norm(sd, f"{block}.norm1", x, eps)
  qkv = np_linear(sd, f"{block}.attn.qkv", y).reshape(x.shape[0], x.shape[1], 3, -1)
  x = x + np_linear(sd, f"{block}.attn.proj", np_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], heads))
  y = np_layer_norm(sd, f"{block}.norm2", x, eps)
  return x + np_linear(sd, f"{block}.mlp.fc2", np_gelu(np_linear(sd, f"{block}.mlp.fc1", y)))


def np_patch_tokens(sd, images, d: Dims):
  """patch_embed(images) + pos_embed[:, 1:]: [B, g*g, D]."""
  b, p, g = images.shape[0], d.patch, d.grid
  patches = images.reshape(b, g, p, g, p, 3)
  kernel = sd["visual_encoder.patch_embed.proj.weight"].astype(np.float64)
  x = np.einsum("biyjxc,dcyx->bijd", patches, kernel).reshape(b, g * g, -1)
  return x + sd["visual_encoder.patch_embed.proj.bias"] + sd["visual_encoder.pos_embed"][:, 1:]


def np_text_embed(sd, prefix, ids):
  x = sum(sd[f"{prefix}embeddings.{name}_embeddings.weight"].astype(np.float64)[index]
          for name, index in (("word", ids), ("position", np.arange(ids.shape[1])), ("token_type", 0)))
  return np_layer_norm(sd, f"{prefix}embeddings.LayerNorm", x, 1e-12)


def np_vicha_image(sd, images, concept_ids, concept_mask, d: Dims):
  """kw_encoder (text mode) -> kw_proj -> appended to [CLS+pos, patches+pos] -> every block, each
  block's output through the final norm (ViCHA's return_hidden_state). Padding is not masked."""
  kw = np_text_embed(sd, "kw_encoder.", concept_ids)
  for n in range(d.concept_layers):
    kw = np_bert_layer(sd, f"kw_encoder.encoder.layer.{n}", kw, concept_mask, d)
  kw = np_linear(sd, "kw_proj", kw)
  cls = sd["visual_encoder.cls_token"] + sd["visual_encoder.pos_embed"][:, :1]
  x = np.concatenate([np.broadcast_to(cls, (images.shape[0], 1, d.vision_width)),
                      np_patch_tokens(sd, images, d), kw], axis=1)
  hidden = []
  for i in range(d.depth):
    x = np_block(sd, f"visual_encoder.blocks.{i}", x, d.vision_heads)
    hidden.append(np_layer_norm(sd, "visual_encoder.norm", x, 1e-6))
  return hidden


def np_text_hidden(sd, ids, mask, d: Dims):
  x = np_text_embed(sd, "text_encoder.bert.", ids)
  hidden = []
  for n in range(d.fusion_start):
    x = np_bert_layer(sd, f"text_encoder.bert.encoder.layer.{n}", x, mask, d)
    hidden.append(x)
  return hidden


def np_mae(sd, images, keep, restore, d: Dims):
  """ViCHA's compute_mae(unimodal=True) up to the pixel predictions [B, N, p*p*3]."""
  x = np_patch_tokens(sd, images, d)
  x = np.take_along_axis(x, keep[..., None], axis=1)
  cls = np.broadcast_to(sd["visual_encoder.cls_token"], (images.shape[0], 1, d.vision_width))  # no pos
  x = np.concatenate([cls, x], axis=1)
  for i in range(d.depth):
    x = np_block(sd, f"visual_encoder.blocks.{i}", x, d.vision_heads)
  x = np_layer_norm(sd, "visual_encoder.norm", x, 1e-6)
  x = np_linear(sd, "decoder_embed", x)
  tokens = np.concatenate([x[:, 1:], np.broadcast_to(sd["mask_token"], (x.shape[0], restore.shape[1] + 1 - x.shape[1],
                                                                         x.shape[2]))], axis=1)
  x = np.concatenate([x[:, :1], np.take_along_axis(tokens, restore[..., None], axis=1)], axis=1)
  x = x + sd["decoder_pos_embed"]
  for i in range(d.decoder_depth):
    x = np_block(sd, f"decoder_blocks.{i}", x, DECODER_HEADS)
  x = np_layer_norm(sd, "decoder_norm", x, 1e-5)
  return np_linear(sd, "mae_proj", x)[:, 1:]


@functools.lru_cache
def ours(cfg: vlp.ModelConfig):
  model = vlp.VLPModel(cfg)

  def forward(m, images, concept_ids, concept_mask, ids, mask, keep, restore):
    image = m.encode_image(images, concept_ids=concept_ids, concept_mask=concept_mask)
    text = m.encode_text(ids, mask)
    image_feats, text_feats = hitc.hitc_features(m, image["layer_cls"], text["layer_cls"])
    return dict(states=image["states"], layer_cls=image["layer_cls"], text_layer_cls=text["layer_cls"],
                hitc_image=image_feats, hitc_text=text_feats, mae=mae.mae_predict(m, images, keep, restore))

  return jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=forward))


def _inputs(d: Dims, seed=1):
  rng = np.random.default_rng(seed)
  b, n = 2, d.grid * d.grid
  images = rng.standard_normal((b, d.grid * d.patch, d.grid * d.patch, 3)).astype(np.float32)
  concept_ids = rng.integers(1, d.vocab, (b, 6))
  concept_mask = np.ones((b, 6), np.int64)
  concept_mask[1, 3:] = 0
  concept_ids[1, 3:] = 0
  ids = rng.integers(1, d.vocab, (b, 5))
  mask = np.ones((b, 5), np.int64)
  mask[0, 3:] = 0
  shuffle = np.argsort(rng.random((b, n)), axis=1)
  keep, restore = shuffle[:, :1], np.argsort(shuffle, axis=1)  # 25% of a 2x2 grid: 1 visible patch
  return images, concept_ids, concept_mask, ids, mask, keep, restore


# --- tests -----------------------------------------------------------------------------------

def test_every_vicha_key_converts_and_fills_the_vicha_model():
  sd = vicha_state_dict()
  params, ema, report = convert_state_dict("vicha", sd, vicha_config())
  assert not report.unmapped and not report.missing and not report.not_in_model, report.table()
  assert set(report.converted) | set(report.tied) | set(report.ignored) == set(sd)
  assert not report.extra_subtrees
  assert report.converted["decoder_pos_embed"] == []  # checked, recomputed by the model
  shapes = importer.model_param_shapes(vicha_config())
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(flat) == set(shapes) - {"vision/mask_token"}
  assert report.not_converted == ["vision/mask_token"]
  np.testing.assert_array_equal(ema["image_tokens"]["proj"]["dense"]["kernel"], sd["kw_proj_m.weight"].T)
  np.testing.assert_array_equal(ema["image_tokens"]["layer_1"]["output"]["dense"]["kernel"],
                                sd["kw_encoder_m.encoder.layer.1.output.dense.weight"].T)
  np.testing.assert_array_equal(params["mae_decoder"]["block_1"]["attn"]["value"]["dense"]["bias"],
                                sd["decoder_blocks.1.attn.qkv.bias"][2 * D.decoder_width:])
  np.testing.assert_array_equal(ema["mae_decoder"]["mask_token"], sd["mask_token"])  # no mirror: online
  np.testing.assert_array_equal(ema["vision_proj_hidden_1"]["proj"]["dense"]["kernel"],
                                sd["vision_proj_hidden.1.weight"].T)
  # The same file read as plain ALBEF leaves ViCHA's modules unmapped.
  _, _, as_albef = convert_state_dict("albef", sd, model_config(D))
  assert "kw_encoder.encoder.layer.0.attention.self.query.weight" in as_albef.unmapped
  assert "decoder_pos_embed" in as_albef.unmapped


def test_model_config_read_from_a_vicha_file_is_configs_vicha_model():
  """Without a target the importer reads ViCHA's model from the keys; it equals vicha_config."""
  sd = vicha_state_dict(momentum=None)
  _, _, report = convert_state_dict("vicha", sd, model_overrides={"vision": {"num_heads": D.vision_heads},
                                                                 "text": {"num_heads": D.text_heads}})
  assert not report.failures(), report.table()
  read = vlp.build_config(report.model_config)
  assert read == vicha_config()
  assert not report.extra_subtrees and report.not_converted == ["vision/mask_token"]


def test_converted_vicha_matches_numpy_reference():
  sd = vicha_state_dict()
  cfg = vicha_config()
  params, _, _ = convert_state_dict("vicha", sd, cfg)
  params = dict(params, vision=dict(params["vision"], mask_token=np.zeros((1, 1, D.vision_width), np.float32)))
  images, concept_ids, concept_mask, ids, mask, keep, restore = _inputs(D)
  got = jax.tree.map(np.asarray, ours(cfg)(params, images, concept_ids, concept_mask, ids, mask, keep, restore))

  # The visual-concept path: every ViT block's LN'ed output over [CLS, patches, concepts].
  hidden = np_vicha_image(sd, images, concept_ids, concept_mask, D)
  assert got["states"].shape == (2, 1 + D.grid ** 2 + 6, D.vision_width)
  assert max_relative_error(got["states"], hidden[-1]) <= 1e-5
  for i in range(D.depth):
    assert max_relative_error(got["layer_cls"][i], hidden[i][:, 0]) <= 1e-5, i

  # One hierarchical level (level 1: ViT block 2 with text layer 1, 0-based).
  text_hidden = np_text_hidden(sd, ids, mask, D)
  normalize = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  level, block, layer = 1, 2, 1
  assert max_relative_error(got["hitc_image"][level],
                            normalize(np_linear(sd, f"vision_proj_hidden.{level}", hidden[block][:, 0]))) <= 1e-5
  assert max_relative_error(got["hitc_text"][level],
                            normalize(np_linear(sd, f"text_proj_hidden.{level}", text_hidden[layer][:, 0]))) <= 1e-5

  # The MAE reconstruction from the visible patch (CLS without its position, as ViCHA).
  assert max_relative_error(got["mae"], np_mae(sd, images, keep, restore, D)) <= 1e-5


def test_decoder_pos_embed_must_be_the_fixed_table():
  sd = vicha_state_dict(momentum=None)
  sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.01
  with pytest.raises(ValueError, match="'decoder_pos_embed' is not MAE's fixed 2-D sin-cos table"):
    convert_state_dict("vicha", sd, vicha_config())


def test_sincos_table_is_maes():
  for width, grid in ((16, 2), (768, 16), (64, 23)):
    np.testing.assert_allclose(mae.sincos_table(width, grid), mae_sincos_reference(width, grid), atol=1e-6)
