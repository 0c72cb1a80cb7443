"""Weakly-supervised grounding: IoU and box scores by hand, Grad-CAM against a re-implemented layer
whose attention probabilities are an explicit input (differentiated with `jax.grad`), masking of
padded text tokens, bicubic upsampling against torch, and the evaluator end to end on fake data."""
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import albef
from vlpjax import sharding
from vlpjax.evaluators import grounding
from vlpjax.models import bert, vit, vlp

NEG_INF = -np.inf


@pytest.fixture(scope="module")
def tiny():
  """The tiny ALBEF model (2 fusion layers, 2 ViT blocks, 4x4 patch grid, 2 heads) and its params."""
  config = albef.get_config("tiny")
  model = vlp.VLPModel(vlp.ModelConfig.from_config(config.model))
  init = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))
  params = jax.device_get(init(jax.random.PRNGKey(5))["params"])
  # A larger ITM head gives match-logit gradients well above float32 noise.
  params["itm_head"]["dense"]["kernel"] = params["itm_head"]["dense"]["kernel"] * 50.0
  return model, params


def _inputs(model, batch=3, text_len=7, seed=0):
  rng = np.random.default_rng(seed)
  size = model.config.vision.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  lengths = np.array([text_len, 3, 5, 2, 6, 4, 7, 1][:batch])
  text_mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
  text_ids = rng.integers(1, model.config.text.vocab_size, (batch, text_len)).astype(np.int32) * text_mask
  return images, text_ids, text_mask


# ----------------------------------------------------------------------------- IoU and box scores


def test_iou_hand_computed():
  unit = [0.0, 0.0, 1.0, 1.0]
  assert float(grounding.iou(unit, unit)) == pytest.approx(1.0)
  assert float(grounding.iou(unit, [0.0, 0.5, 1.0, 1.5])) == pytest.approx(0.5 / 1.5)      # half overlap
  assert float(grounding.iou(unit, [0.25, 0.25, 0.75, 0.75])) == pytest.approx(0.25)      # contained
  assert float(grounding.iou([0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75])) == pytest.approx(1 / 7)
  assert float(grounding.iou(unit, [1.0, 0.0, 2.0, 1.0])) == 0.0                          # shared edge
  assert float(grounding.iou(unit, [2.0, 2.0, 3.0, 3.0])) == 0.0                          # disjoint
  # Broadcast: [3, 4] against [4].
  got = grounding.iou(np.array([unit, [0.0, 0.5, 1.0, 1.5], [2.0, 2.0, 3.0, 3.0]]), np.array(unit))
  np.testing.assert_allclose(got, [1.0, 1 / 3, 0.0], rtol=1e-6)


def test_iou_degenerate_boxes_are_zero_not_nan():
  point = [0.5, 0.5, 0.5, 0.5]
  line = [0.2, 0.1, 0.2, 0.9]
  inverted = [0.8, 0.8, 0.2, 0.2]
  unit = [0.0, 0.0, 1.0, 1.0]
  got = np.asarray(grounding.iou(np.array([point, point, line, inverted, inverted]),
                                 np.array([point, unit, line, inverted, unit])))
  np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, 0.0, 0.0])


def test_box_scores_hand_computed():
  heat = np.arange(16, dtype=np.float32).reshape(4, 4)   # heat[r, c] = 4 r + c
  boxes = np.array([
      [0.0, 0.0, 0.5, 0.5],     # rows 0-1, cols 0-1: (0 + 1 + 4 + 5) / sqrt(2 * 2) = 5
      [0.3, 0.25, 0.8, 1.0],    # rows floor(1.2)..floor(3.2)-1 = 1-2, cols 1-3: 48 / sqrt(2 * 3)
      [0.5, 0.0, 0.5, 1.0],     # zero height -> never chosen
      [0.0, 0.0, 1.0, 1.0],     # masked below
      [0.3, 0.0, 0.45, 1.0],    # rows floor(1.2)..floor(1.8)-1: no pixel row, area 0.6 * 4 > 0 -> 0
      [0.0, 0.0, 1.0, 1.0],     # whole map: 120 / 4
      [0.9, 0.9, 0.1, 0.1],     # inverted -> never chosen
  ], np.float32)
  mask = np.array([True, True, True, False, True, True, True])
  got = np.asarray(grounding.box_scores(heat, boxes, mask))
  want = [5.0, 48 / np.sqrt(6.0), NEG_INF, NEG_INF, 0.0, 30.0, NEG_INF]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _slow_box_score(heat, box, mask):
  """ALBEF's grounding_eval loop in float64: int() pixel bounds, sum, / area ** 0.5."""
  height, width = heat.shape
  area = (box[2] - box[0]) * height * (box[3] - box[1]) * width
  if not mask or box[2] <= box[0] or box[3] <= box[1]:
    return NEG_INF
  total = 0.0
  for r in range(int(box[0] * height), int(box[2] * height)):
    for c in range(int(box[1] * width), int(box[3] * width)):
      total += float(heat[r, c])
  return total / area ** 0.5


def test_box_scores_match_slow_reference_on_random_boxes():
  rng = np.random.default_rng(1)
  heat = rng.normal(size=(7, 9)).astype(np.float32)
  corners = np.sort(rng.uniform(0, 1, (40, 2, 2)), axis=1).astype(np.float32)   # [P, (min, max), (y, x)]
  boxes = np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], axis=1)
  mask = rng.uniform(size=40) < 0.8
  got = np.asarray(grounding.box_scores(heat, boxes, mask))
  want = np.array([_slow_box_score(heat, b.astype(np.float64), m) for b, m in zip(boxes, mask)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.isfinite(want).sum() > 20


def test_concentrated_heat_map_ranks_its_box_first():
  heat = np.zeros((2, 32, 32), np.float32)
  heat[:, 8:16, 20:28] = 1.0                                         # the box (0.25, 0.625, 0.5, 0.875)
  heat += np.random.default_rng(2).uniform(0, 0.01, heat.shape).astype(np.float32)
  target = [0.25, 0.625, 0.5, 0.875]
  proposals = np.array([[[0.0, 0.0, 0.5, 0.5],        # elsewhere
                         [0.0, 0.5, 1.0, 1.0],        # contains the mass but 8x the area
                         target,
                         [0.5, 0.5, 1.0, 1.0]]] * 2, np.float32)
  mask = np.array([[True, True, True, True], [True, True, False, True]])   # example 1: target masked out
  gt = np.array([target, target], np.float32)
  out = grounding.locate(heat, proposals, mask, gt)
  np.testing.assert_array_equal(out["best"], [2, 1])
  np.testing.assert_array_equal(out["hit"], [True, False])
  np.testing.assert_allclose(out["iou"], [1.0, 0.125], rtol=1e-6)   # 0.0625 / 0.5
  np.testing.assert_allclose(out["box"][1], proposals[1, 1])
  # No usable proposal: a miss with IoU 0, even though padding rows hold the ground-truth box.
  out = grounding.locate(heat[:1], np.array([[target, target]], np.float32), np.zeros((1, 2), bool), gt[:1])
  assert not bool(out["hit"][0]) and float(out["iou"][0]) == 0.0


def test_split_accuracy_hand_computed():
  hits = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  split_id = np.array([0, 0, 0, 1, 1, 0, 2])
  valid = np.array([1, 1, 1, 1, 1, 0, 0], bool)          # the last two are padding
  out = grounding.split_accuracy(hits, split_id, valid, ["val", "testA", "testB"])
  assert out == pytest.approx(dict(acc_val=200 / 3, acc_testA=50.0, accuracy=60.0, num_examples=5.0))
  with pytest.raises(ValueError, match="split_names"):
    grounding.split_accuracy(hits, split_id, np.ones(7, bool), ["val", "testA"])
  with pytest.raises(ValueError, match="no valid example"):
    grounding.split_accuracy(hits, split_id, np.zeros(7, bool), ["val"])


# ----------------------------------------------------------------------------- Grad-CAM post-processing


def test_itm_gradcam_matches_loops_and_ignores_padding_rows():
  rng = np.random.default_rng(3)
  batch, heads, length, grid = 3, 2, 5, 3
  # Two extra image tokens after the patches (ViCHA-style) must be ignored.
  attention = rng.uniform(size=(batch, heads, length, 1 + grid * grid + 2)).astype(np.float32)
  gradients = rng.normal(size=attention.shape).astype(np.float32)
  text_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
  got = np.asarray(grounding.itm_gradcam(attention, gradients, text_mask, grid))
  want = np.zeros((batch, grid, grid))
  for b in range(batch):
    valid = [l for l in range(length) if text_mask[b, l]]
    for y in range(grid):
      for x in range(grid):
        column = 1 + y * grid + x
        total = sum(float(attention[b, h, l, column]) * max(float(gradients[b, h, l, column]), 0.0)
                    for h in range(heads) for l in valid)
        want[b, y, x] = total / (heads * len(valid)) if valid else 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got.dtype == np.float32 and np.all(got[2] == 0)


def test_itc_gradcam_matches_loops():
  rng = np.random.default_rng(4)
  batch, heads, grid = 2, 3, 2
  tokens = 1 + grid * grid
  attention = rng.uniform(size=(batch, heads, tokens, tokens)).astype(np.float32)
  gradients = rng.normal(size=attention.shape).astype(np.float32)
  got = np.asarray(grounding.itc_gradcam(attention, gradients, grid))
  want = np.zeros((batch, grid, grid))
  for b in range(batch):
    for y in range(grid):
      for x in range(grid):
        column = 1 + y * grid + x
        want[b, y, x] = np.mean([float(attention[b, h, 0, column]) * max(float(gradients[b, h, 0, column]), 0)
                                 for h in range(heads)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- Grad-CAM against a reference


def _dense(p, x):
  return x @ p["dense"]["kernel"] + p["dense"]["bias"]


def _layer_norm(p, x, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p["norm"]["scale"] + p["norm"]["bias"]


def _split_heads(x, heads):
  return x.reshape(x.shape[:2] + (heads, x.shape[-1] // heads))


def _attention_probs(p, queries, keys, key_mask, heads):
  """softmax(q k^T / sqrt(d)) [batch, heads, q_len, k_len], masked keys excluded."""
  q, k = _split_heads(_dense(p["query"], queries), heads), _split_heads(_dense(p["key"], keys), heads)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :] > 0, logits, -1e30)
  return jax.nn.softmax(logits, axis=-1)


def _attend(p, probs, keys, heads):
  v = _split_heads(_dense(p["value"], keys), heads)
  context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  return _dense(p["out"], context.reshape(context.shape[:2] + (-1,)))


def _reference_itm(model, params, images, text_ids, text_mask, layer):
  """(probs, d Σ match / d probs, Σ match) with fusion layer `layer` re-implemented around its probs."""
  cfg = model.config.text
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
  image_states = apply(model.encode_image, images)["states"]
  x = apply(model.encode_text, text_ids, text_mask)["states"]
  fusion = params["fusion"]

  def flax_layer(i, states):
    layer_module = bert.BertLayer(cfg, cross_attention=True)
    return layer_module.apply({"params": fusion[f"layer_{i}"]}, states, text_mask, image_states)

  for i in range(layer):
    x = flax_layer(i, x)
  p = fusion[f"layer_{layer}"]
  self_probs = _attention_probs(p["attention"], x, x, text_mask, cfg.num_heads)
  heads, eps = cfg.num_heads, cfg.layer_norm_eps
  h = _layer_norm(p["attention_norm"], x + _attend(p["attention"], self_probs, x, heads), eps)
  probs = _attention_probs(p["crossattention"], h, image_states, None, heads)

  def match_sum(cross_probs):
    cross = _attend(p["crossattention"], cross_probs, image_states, heads)
    y = _layer_norm(p["crossattention_norm"], h + cross, eps)
    ffn = _dense(p["output"], jax.nn.gelu(_dense(p["intermediate"], y), approximate=False))
    y = _layer_norm(p["output_norm"], y + ffn, eps)
    for i in range(layer + 1, cfg.fusion_layers):
      y = flax_layer(i, y)
    return jnp.sum(apply(model.itm_logits, y[:, 0])[:, 1])

  return np.asarray(probs), np.asarray(jax.grad(match_sum)(probs)), float(match_sum(probs))


def _reference_itc(model, params, images, text_ids, text_mask, block):
  """(probs, d Σ s_ii / temp / d probs) with ViT block `block` re-implemented around its probs."""
  cfg = model.config.vision
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
  text_feat = apply(model.project_text, apply(model.encode_text, text_ids, text_mask)["states"][:, 0])
  vision = params["vision"]
  x = vit.VisionTransformer(cfg).apply({"params": vision}, images, method="embed")
  for i in range(block):
    x = vit.VitBlock(cfg).apply({"params": vision[f"block_{i}"]}, x)
  p = vision[f"block_{block}"]
  y = _layer_norm(p["norm1"], x, cfg.layer_norm_eps)
  probs = _attention_probs(p["attn"], y, y, None, cfg.num_heads)

  def similarity_sum(self_probs):
    z = x + _attend(p["attn"], self_probs, y, cfg.num_heads)
    u = _layer_norm(p["norm2"], z, cfg.layer_norm_eps)
    z = z + _dense(p["mlp"]["fc2"], jax.nn.gelu(_dense(p["mlp"]["fc1"], u), approximate=False))
    for i in range(block + 1, cfg.depth):
      z = vit.VitBlock(cfg).apply({"params": vision[f"block_{i}"]}, z)
    image_feat = apply(model.project_image, _layer_norm(vision["norm"], z, cfg.layer_norm_eps)[:, 0])
    return jnp.sum(image_feat * text_feat) / apply(model.temperature)

  return np.asarray(probs), np.asarray(jax.grad(similarity_sum)(probs))


def _slow_itm_heat(probs, grads, text_mask, grid):
  batch, heads, length, _ = probs.shape
  heat = np.zeros((batch, grid * grid))
  for b in range(batch):
    valid = [l for l in range(length) if text_mask[b, l]]
    for j in range(grid * grid):
      heat[b, j] = sum(float(probs[b, h, l, 1 + j]) * max(float(grads[b, h, l, 1 + j]), 0.0)
                       for h in range(heads) for l in valid) / (heads * len(valid))
  return heat.reshape(batch, grid, grid)


@pytest.mark.parametrize("layer", [0, 1])
def test_itm_gradcam_matches_reimplemented_fusion_layer(tiny, layer):
  model, params = tiny
  images, text_ids, text_mask = _inputs(model)
  probs, grads, match_sum = _reference_itm(model, params, images, text_ids, text_mask, layer)
  # The re-implementation is the model: same match logits.
  fused = model.apply({"params": params}, images, text_ids, text_mask)["itm_logits"][:, 1]
  np.testing.assert_allclose(match_sum, float(jnp.sum(fused)), rtol=1e-5)
  assert (grads > 0).any() and (grads < 0).any()          # ReLU has something to do
  module_fn = jax.jit(lambda p, *a: grounding.itm_attention_and_gradients(model, p, *a, layer=layer))
  attention, gradients = module_fn(params, images, text_ids, text_mask)
  scale = np.abs(grads).max()
  np.testing.assert_allclose(attention, probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gradients, grads, rtol=1e-3, atol=1e-4 * scale)
  heat = np.asarray(grounding.make_gradcam_fn(model, layer=layer)(params, images, text_ids, text_mask))
  want = _slow_itm_heat(probs, grads, text_mask, model.config.vision.grid)
  assert heat.shape == (3, 4, 4) and heat.dtype == np.float32
  assert want.max() > 0
  np.testing.assert_allclose(heat, want, rtol=1e-3, atol=1e-4 * want.max())


def test_itc_gradcam_matches_reimplemented_vit_block(tiny):
  model, params = tiny
  images, text_ids, text_mask = _inputs(model, seed=1)
  probs, grads = _reference_itc(model, params, images, text_ids, text_mask, block=0)
  assert (grads[:, :, 0, 1:] > 0).any() and (grads[:, :, 0, 1:] < 0).any()
  attention, gradients = jax.jit(lambda p, *a: grounding.itc_attention_and_gradients(model, p, *a, layer=0))(
      params, images, text_ids, text_mask)
  np.testing.assert_allclose(attention, probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gradients, grads, rtol=1e-3, atol=1e-4 * np.abs(grads).max())
  gradcam = grounding.make_gradcam_fn(model, layer=0, mode="itc")
  heat = np.asarray(gradcam(params, images, text_ids, text_mask))
  want = (probs[:, :, 0, 1:] * np.maximum(grads[:, :, 0, 1:], 0)).mean(axis=1).reshape(3, 4, 4)
  assert heat.shape == (3, 4, 4) and want.max() > 0
  np.testing.assert_allclose(heat, want, rtol=1e-3, atol=1e-4 * want.max())


def test_padded_text_tokens_do_not_contribute(tiny):
  model, params = tiny
  images, text_ids, text_mask = _inputs(model, batch=2, text_len=8, seed=2)
  text_mask[:] = (np.arange(8) < 5).astype(np.int32)
  text_ids = text_ids * 0 + np.random.default_rng(9).integers(1, 50, (2, 8)).astype(np.int32)
  gradcam = grounding.make_gradcam_fn(model, layer=1)
  padded = np.asarray(gradcam(params, images, text_ids * text_mask, text_mask))
  garbage_padding = np.asarray(gradcam(params, images, text_ids, text_mask))   # pad positions hold real ids
  unpadded = np.asarray(gradcam(params, images, text_ids[:, :5], text_mask[:, :5]))
  assert unpadded.max() > 0
  np.testing.assert_allclose(padded, unpadded, rtol=1e-4, atol=1e-5 * unpadded.max())
  np.testing.assert_allclose(garbage_padding, unpadded, rtol=1e-4, atol=1e-5 * unpadded.max())


def test_gradcam_setting_errors_name_the_key(tiny):
  model, _ = tiny
  with pytest.raises(ValueError, match="config.eval.gradcam_layer=2 is out of range"):
    grounding.check_gradcam_setting(model.config, "itm", 2, "config.eval.gradcam_layer")
  with pytest.raises(ValueError, match="block_num=5"):
    grounding.check_gradcam_setting(model.config, "itc", 5, "config.eval.block_num")
  with pytest.raises(ValueError, match="gradcam_mode"):
    grounding.check_gradcam_setting(model.config, "cam", 0)
  merged_config = dict(albef.get_config("tiny").model.to_dict(), fusion="merged")
  merged = vlp.VLPModel(vlp.ModelConfig.from_config(merged_config))
  with pytest.raises(ValueError, match="config.model.fusion"):
    grounding.make_gradcam_fn(merged, layer=0)
  grounding.check_gradcam_setting(merged.config, "itc", 1)   # ITC mode works with any fusion


# ----------------------------------------------------------------------------- upsampling and display


def test_upsample_keeps_constants_and_identity():
  rng = np.random.default_rng(5)
  heat = rng.uniform(size=(2, 4, 4)).astype(np.float32)
  np.testing.assert_allclose(grounding.upsample(heat, 4), heat, rtol=1e-6)
  np.testing.assert_allclose(grounding.upsample(np.full((1, 3, 3), 2.5, np.float32), (7, 11)),
                             np.full((1, 7, 11), 2.5), rtol=1e-6)
  assert grounding.upsample(heat, (12, 20)).shape == (2, 12, 20)


def test_upsample_matches_torch_bicubic():
  torch = pytest.importorskip("torch")
  heat = np.random.default_rng(6).uniform(size=(2, 4, 4)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(heat)[:, None], size=(13, 9), mode="bicubic",
                                         align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(grounding.upsample(heat, (13, 9)), want, rtol=1e-5, atol=1e-6)


def test_overlay_colours_hot_red_and_cold_blue():
  image = np.full((4, 6, 3), 100, np.uint8)
  heat = np.zeros((4, 6), np.float32)
  heat[1, 2] = 3.0                                                     # hottest -> jet(1) = dark red
  heat[0, 0] = 2.625                                                   # 0.875 of the range -> pure red
  out = grounding.overlay(image, heat, alpha=0.5)
  assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
  np.testing.assert_array_equal(out[0, 0], [178, 50, 50])             # 0.5 * 100 + 0.5 * 255 * (1, 0, 0)
  np.testing.assert_array_equal(out[1, 2], [114, 50, 50])             # jet(1) = (0.5, 0, 0)
  np.testing.assert_array_equal(out[3, 5], [50, 50, 114])             # jet(0) = (0, 0, 0.5)
  np.testing.assert_array_equal(grounding.overlay(image, heat, alpha=0.0), image)
  assert grounding.overlay(image, np.ones((4, 6)), alpha=1.0)[0, 0].tolist() == [0, 0, 128]   # constant map
  with pytest.raises(ValueError, match="same size"):
    grounding.overlay(image, np.zeros((8, 12)))


# ----------------------------------------------------------------------------- the evaluator


def _eval_batches(model, batch_size):
  """Two padded batches whose outcome does not depend on the heat map (see the test)."""
  images, text_ids, text_mask = _inputs(model, batch=8, text_len=6, seed=7)
  gt = np.array([[0.1, 0.1, 0.6, 0.5]] * 8, np.float32)
  far = np.array([0.7, 0.7, 0.9, 0.9], np.float32)
  proposals = np.stack([np.stack([gt[i]] * 3) for i in range(8)])            # [8, 3, 4]: every proposal = gt
  mask = np.ones((8, 3), bool)
  mask[2] = False                     # val example without a usable proposal: miss
  proposals[4] = far                  # testA example: every proposal disjoint from gt: miss
  split_id = np.array([0, 0, 0, 1, 1, 0, 0, 0], np.int32)   # val: hit hit miss; testA: hit miss
  valid = np.arange(8) < 5            # rows 5-7 are padding (their proposals would be hits)
  arrays = dict(image=images, text_ids=text_ids, text_mask=text_mask, gt_box=gt, proposals=proposals,
                proposal_mask=mask, split_id=split_id, index=np.where(valid, np.arange(8), -1), valid=valid)
  return [{k: v[s:s + batch_size] for k, v in arrays.items()} for s in range(0, 8, batch_size)]


class _FakeEvalData:
  split_names = ["val", "testA", "testB"]

  def __init__(self, batches):
    self._batches = batches
    self.num_examples = 5

  def batches(self):
    return iter(self._batches)


def _fake_tasks(monkeypatch, data, calls):
  def make_eval_data(input_config, *, split, batch_size):
    calls.append((split, batch_size))
    return data

  fake = types.ModuleType("input_pipeline.tasks")
  fake.make_eval_data = make_eval_data
  import input_pipeline
  monkeypatch.setitem(sys.modules, "input_pipeline.tasks", fake)
  monkeypatch.setattr(input_pipeline, "tasks", fake, raising=False)


def _eval_config(batch_size, **eval_keys):
  eval_config = dict(kind="grounding", split="val", batch_size=batch_size, **eval_keys)
  return ml_collections.ConfigDict(dict(input=dict(format="refcoco"), eval=eval_config))


def test_run_counts_hits_per_split_and_skips_padding(tiny, monkeypatch):
  model, params = tiny
  calls = []
  _fake_tasks(monkeypatch, _FakeEvalData(_eval_batches(model, 4)), calls)
  results = grounding.run(_eval_config(4, gradcam_mode="itm", gradcam_layer=1), model, params)
  assert calls == [("val", 4)]
  assert results == pytest.approx(dict(acc_val=200 / 3, acc_testA=50.0, accuracy=60.0, num_examples=5.0))
  text = grounding.format_results(results)
  assert text.split("\n")[0].split() == ["val", "testA", "overall"]
  assert text.split("\n")[1].split() == ["66.67", "50.00", "60.00"]


def test_run_itc_mode_on_a_mesh(tiny, monkeypatch):
  model, params = tiny
  _fake_tasks(monkeypatch, _FakeEvalData(_eval_batches(model, 8)), [])
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  results = grounding.run(_eval_config(8, gradcam_mode="itc", block_num=1), model, params, mesh=mesh)
  assert results == pytest.approx(dict(acc_val=200 / 3, acc_testA=50.0, accuracy=60.0, num_examples=5.0))
  with pytest.raises(ValueError, match="config.eval.gradcam_layer=2"):
    grounding.run(_eval_config(8), model, params)   # ALBEF's default layer 2; the tiny model has 2 layers


def test_evaluate_matches_slow_ranking_of_the_heat_maps(tiny):
  """Random proposals: the evaluator's hits equal ALBEF's loop over the upsampled Grad-CAM."""
  model, params = tiny
  rng = np.random.default_rng(8)
  images, text_ids, text_mask = _inputs(model, batch=4, text_len=6, seed=8)
  corners = np.sort(rng.uniform(0, 1, (4, 7, 2, 2)), axis=2).astype(np.float32)
  proposals = np.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], -1)
  mask = rng.uniform(size=(4, 7)) < 0.8
  mask[:, 0] = True
  gradcam = grounding.make_gradcam_fn(model, layer=0, size="image")
  heat = np.asarray(gradcam(params, images, text_ids, text_mask))
  best = [int(np.argmax([_slow_box_score(heat[b], proposals[b, p].astype(np.float64), mask[b, p])
                         for p in range(7)])) for b in range(4)]
  gt = np.stack([proposals[0, best[0]], proposals[1, best[1]] + 0.3,              # exact hit, a miss,
                 proposals[2, best[2]], proposals[3, (best[3] + 1) % 7]])         # a hit, probably a miss
  want_iou = [float(grounding.iou(proposals[b, best[b]], gt[b])) for b in range(4)]
  batch = dict(image=images, text_ids=text_ids, text_mask=text_mask, gt_box=gt, proposals=proposals,
               proposal_mask=mask, split_id=np.zeros(4, np.int32), valid=np.ones(4, bool))
  results = grounding.evaluate(model, params, [batch], ["val"], layer=0)
  assert results["accuracy"] == pytest.approx(100.0 * np.mean(np.array(want_iou) >= 0.5))
  assert want_iou[0] == pytest.approx(1.0) and want_iou[1] < 0.5
