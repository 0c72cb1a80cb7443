"""ViCHA's model pieces: concept tokens in the image encoder (and their padding, ViCHA's way and
masked), the visible-patch encoder of the MAE branch, the concept encoder taken from BERT layers."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import config_lib
from vlpjax.models import concepts, vlp


@pytest.fixture(scope="module")
def tiny():
  """(config, params) of configs/vicha.py:tiny."""
  cfg = vlp.build_config(config_lib.load_config("configs/vicha.py:tiny").model)
  model = vlp.VLPModel(cfg)
  params = jax.jit(lambda r: model.init({"params": r, "dropout": r}, *vlp.init_inputs(cfg))["params"])(
      jax.random.PRNGKey(0))
  return cfg, jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))


def _with_mask_padding(cfg, value: bool):
  return dataclasses.replace(cfg, image_tokens=dataclasses.replace(cfg.image_tokens, mask_padding=value))


@functools.lru_cache
def _encode_and_fuse_fn(cfg):
  model = vlp.VLPModel(cfg)

  def run(m, images, concept_ids, concept_mask, text_ids, text_mask):
    image = m.encode_image(images, concept_ids=concept_ids, concept_mask=concept_mask)
    text = m.encode_text(text_ids, text_mask)
    fused = m.fuse(text["states"], text_mask, image["states"], image["mask"])
    return image["states"], image["mask"], fused["text_states"]

  return jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs, method=run))


def _encode_and_fuse(cfg, params, *inputs):
  return _encode_and_fuse_fn(cfg)(params, *inputs)


def test_concept_tokens_change_the_image_and_padding_follows_the_flag(tiny):
  cfg, params = tiny
  rng = np.random.default_rng(0)
  size, n = cfg.vision.image_size, cfg.vision.num_patches
  images = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
  text_ids = jnp.asarray(rng.integers(5, 100, (2, 6)), jnp.int32)
  text_mask = jnp.ones((2, 6), jnp.int32)
  ids = rng.integers(5, 100, (2, 7))
  mask = np.ones((2, 7), np.int32)
  mask[:, 4:] = 0
  ids[:, 4:] = 0  # padding
  other_words = ids.copy()
  other_words[:, 1:4] = rng.integers(5, 100, (2, 3))
  other_padding = ids.copy()
  other_padding[:, 4:] = rng.integers(5, 100, (2, 3))  # what stands in the padded slots

  states, image_mask, fused = _encode_and_fuse(cfg, params, images, ids, mask, text_ids, text_mask)
  assert states.shape == (2, 1 + n + 7, cfg.vision.width) and image_mask is None
  plain = vlp.VLPModel(cfg).apply({"params": params}, images, method="encode_image")["states"]
  assert plain.shape == (2, 1 + n, cfg.vision.width)
  assert float(jnp.max(jnp.abs(states[:, :1 + n] - plain))) > 1e-3  # the concepts reach CLS and patches
  changed = _encode_and_fuse(cfg, params, images, other_words, mask, text_ids, text_mask)
  assert float(jnp.max(jnp.abs(changed[0][:, 0] - states[:, 0]))) > 1e-3
  # ViCHA's default: padded positions are attended to, so what they hold matters.
  padded = _encode_and_fuse(cfg, params, images, other_padding, mask, text_ids, text_mask)
  assert float(jnp.max(jnp.abs(padded[0][:, 0] - states[:, 0]))) > 1e-3

  # mask_padding: the ViT blocks and the fusion cross-attention ignore the padded concepts.
  masked_cfg = _with_mask_padding(cfg, True)
  base = _encode_and_fuse(masked_cfg, params, images, ids, mask, text_ids, text_mask)
  other = _encode_and_fuse(masked_cfg, params, images, other_padding, mask, text_ids, text_mask)
  np.testing.assert_array_equal(np.asarray(base[1]), np.concatenate([np.ones((2, 1 + n), np.int32), mask], 1))
  np.testing.assert_allclose(np.asarray(base[0][:, :1 + n + 4]), np.asarray(other[0][:, :1 + n + 4]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(base[2]), np.asarray(other[2]), atol=1e-5)
  changed = _encode_and_fuse(masked_cfg, params, images, other_words, mask, text_ids, text_mask)
  assert float(jnp.max(jnp.abs(changed[0][:, 0] - base[0][:, 0]))) > 1e-3


def test_visible_patch_encoder_equals_the_full_encoder_restricted_to_the_kept_tokens(tiny):
  """keep_indices runs only the visible patches; the full encoder whose attention may only look at
  CLS and the kept patches gives the same states there (CLS with its position: cls_position=True;
  ViCHA's cls_position=False equals a CLS whose position row is zero)."""
  cfg, params = tiny
  rng = np.random.default_rng(1)
  size, n = cfg.vision.image_size, cfg.vision.num_patches
  images = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
  keep = np.stack([rng.permutation(n)[:n // 4] for _ in range(2)]).astype(np.int32)

  def visible(m, cls_position):
    return m.vision(images, keep_indices=jnp.asarray(keep), cls_position=cls_position)["states"]

  def restricted(m):
    vision = m.vision
    x = vision.embed(images)
    key_mask = np.zeros((2, 1 + n), np.int32)
    key_mask[:, 0] = 1
    np.put_along_axis(key_mask[:, 1:], keep, 1, axis=1)
    for block in vision.blocks:
      x = block(x, jnp.asarray(key_mask))
    return vision.norm(x)

  model = vlp.VLPModel(cfg)
  full = np.asarray(model.apply({"params": params}, method=restricted))
  expected = np.concatenate([full[:, :1], np.take_along_axis(full[:, 1:], keep[..., None], axis=1)], axis=1)
  got = np.asarray(model.apply({"params": params}, True, method=visible))
  assert got.shape == (2, 1 + n // 4, cfg.vision.width)
  np.testing.assert_allclose(got, expected, atol=2e-5)
  # ViCHA's quirk: its CLS lacks the position embedding, i.e. the full encoder with a zero CLS row.
  quirk = np.asarray(model.apply({"params": params}, False, method=visible))
  assert np.max(np.abs(quirk - got)) > 1e-3
  zero_cls = jax.tree.map(lambda x: x, params)
  zero_cls["vision"] = dict(params["vision"], pos_embedding=params["vision"]["pos_embedding"].at[:, 0].set(0.0))
  full = np.asarray(model.apply({"params": zero_cls}, method=restricted))
  expected = np.concatenate([full[:, :1], np.take_along_axis(full[:, 1:], keep[..., None], axis=1)], axis=1)
  np.testing.assert_allclose(quirk, expected, atol=2e-5)


def test_concept_encoder_from_bert_layers(tiny):
  cfg, params = tiny
  taken = concepts.init_from_text(params["text"], cfg.image_tokens.layers)
  assert set(taken) == {"embeddings", "layer_0", "layer_1"}
  for name in taken:
    for a, b in zip(jax.tree.leaves(taken[name]), jax.tree.leaves(params["text"][name])):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="layer_5"):
    concepts.init_from_text(params["text"], 6)
