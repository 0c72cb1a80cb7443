"""SNLI-VE / NLVR2: the models (widened two-image fusion, remap of pretrained fusion layers), the
`cls` and `nlvr_ta` objectives against float64 NumPy references, and the classification evaluator."""
import dataclasses
import functools
import sys
import types
import zlib
from typing import Any, Callable

import compile_log
import flax.linen as nn
import input_pipeline
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from vlpjax import checkpoint, sharding
from vlpjax.evaluators import classification
from vlpjax.models import bert, classify, vit, vlp
from vlpjax.objectives import classify as objectives
from vlpjax.objectives import context as context_lib

# ----------------------------------------------------------------------------- tiny real models

TEXT = bert.TextConfig(vocab_size=50, width=16, num_heads=2, mlp_dim=32, text_layers=1, fusion_layers=2,
                       max_positions=16, dropout=0.1, attention_dropout=0.1)
# A vision width unlike the text width checks the cross-attention key/value input width.
VISION = vit.VisionConfig(image_size=16, patch_size=8, width=24, depth=1, num_heads=2, mlp_ratio=2.0)
BATCH, TEXT_LEN = 4, 6


def _model(kind: str, **overrides):
  return vlp.build_model(dict(kind=kind, vision=dataclasses.asdict(VISION), text=dataclasses.asdict(TEXT),
                              heads=("itc", "itm"), dtype="float32", **overrides))


@functools.lru_cache(maxsize=None)
def _init(kind: str, seed: int = 0):
  """(model, params) of a tiny model of `kind` (cached: init compiles)."""
  model = _model(kind)
  inputs = vlp.init_inputs(model.config, BATCH, TEXT_LEN)
  init = jax.jit(lambda key: nn.unbox(model.init({"params": key}, *inputs)))
  return model, init(jax.random.key(seed))["params"]


def _inputs(seed: int, batch: int = BATCH):
  rng = np.random.default_rng(seed)
  size = VISION.image_size
  images = rng.standard_normal((3, batch, size, size, 3)).astype(np.float32)
  lengths = rng.integers(2, TEXT_LEN + 1, size=batch)
  text_mask = (np.arange(TEXT_LEN)[None, :] < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(1, TEXT.vocab_size, size=(batch, TEXT_LEN))
  text_ids = np.where(text_mask == 1, tokens, 0).astype(np.int32)
  return dict(image=images[0], image0=images[1], image1=images[2], text_ids=text_ids, text_mask=text_mask)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _perturbed(params, seed: int, scale: float = 0.05):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def test_ve_model_logits():
  model, params = _init("ve")
  assert isinstance(model, classify.VEModel) and model.config.num_classes == 3
  inputs = _inputs(0)
  apply = jax.jit(functools.partial(model.apply, {"params": params}), static_argnames="method")
  logits = apply(inputs["image"], inputs["text_ids"], inputs["text_mask"], method=model.cls_logits)
  assert logits.shape == (BATCH, 3) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  out = apply(inputs["image"], inputs["text_ids"], inputs["text_mask"])
  np.testing.assert_allclose(out["cls_logits"], logits, rtol=1e-6)
  flat = _flat(params)
  assert flat["cls_head/hidden/dense/kernel"].shape == (TEXT.width, TEXT.width)
  assert flat["cls_head/out/dense/kernel"].shape == (TEXT.width, 3)


def test_nlvr_params_have_one_cross_key_value_per_pair_and_no_base_fusion():
  model, params = _init("nlvr")
  assert isinstance(model, classify.NLVRModel)
  assert "fusion" not in params
  assert sorted(params["nlvr_fusion"]) == [f"pair_{j}" for j in range(TEXT.fusion_layers)]
  for pair in params["nlvr_fusion"].values():
    assert sorted(pair) == ["cross_key", "cross_value", "layer_0", "layer_1"]
    assert pair["cross_key"]["dense"]["kernel"].shape == (VISION.width, TEXT.width)
    for slot in ("layer_0", "layer_1"):
      assert sorted(pair[slot]["crossattention"]) == ["out", "query"]
  flat = _flat(params)
  assert flat["cls_head/out/dense/kernel"].shape == (TEXT.width, 2)
  assert flat["ta_head/dense/kernel"].shape == (TEXT.width, 3)


def _bert_layer_params(pair: dict, slot: int) -> dict:
  """The `bert.BertLayer` params equivalent to layer `slot` of an NLVR pair (shared K/V put back)."""
  layer = jax.tree.map(lambda x: x, pair[f"layer_{slot}"])
  layer["crossattention"] = dict(layer["crossattention"], key=pair["cross_key"], value=pair["cross_value"])
  return layer


def _reference_fuse_pair(layer_params: list[list[dict]], text_states, text_mask, image0_states,
                         image1_states):
  """Applies bert.BertLayer with layer_params[j][s] to image s, for j in order, s = 0 then 1."""
  layer = bert.BertLayer(TEXT, cross_attention=True)
  x = text_states
  for per_slot in layer_params:
    for slot, image_states in enumerate((image0_states, image1_states)):
      x = layer.apply({"params": per_slot[slot]}, x, text_mask, image_states, None, True)
  return x


def _states(model, params, inputs):
  bound = model.bind({"params": params})
  image0, image1 = bound.encode_image_pair(jnp.asarray(inputs["image0"]), jnp.asarray(inputs["image1"]))
  text = bound.encode_text(jnp.asarray(inputs["text_ids"]), jnp.asarray(inputs["text_mask"]))
  return bound, text["states"], image0, image1


def test_fuse_pair_is_two_bert_layers_per_pair_with_shared_key_value():
  # Random (not duplicated) pairs: layer_0 must attend image 0, layer_1 image 1, both through the
  # pair's single key/value projection.
  model, params = _init("nlvr", seed=3)
  inputs = _inputs(1)
  bound, text_states, image0, image1 = _states(model, params, inputs)
  fused = bound.fuse_pair(text_states, inputs["text_mask"], image0, image1)
  pairs = [params["nlvr_fusion"][f"pair_{j}"] for j in range(TEXT.fusion_layers)]
  expected = _reference_fuse_pair([[_bert_layer_params(p, 0), _bert_layer_params(p, 1)] for p in pairs],
                                  text_states, inputs["text_mask"], image0, image1)
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)
  swapped = bound.fuse_pair(text_states, inputs["text_mask"], image1, image0)
  assert not np.allclose(swapped, fused, atol=1e-3), "the two image slots are interchangeable"


def test_remap_duplicates_each_pretrained_fusion_layer_into_its_pair():
  _, pretrained = _init("vlp", seed=5)
  remapped = classify.NLVRModel.remap_pretrained(pretrained)
  flat, source = _flat(remapped), _flat(pretrained)
  for j in range(TEXT.fusion_layers):
    prefix = f"fusion/layer_{j}/"
    layer = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    for path, value in layer.items():
      if path.startswith(("crossattention/key/", "crossattention/value/")):
        shared = path.replace("crossattention/key/", "cross_key/")
        shared = shared.replace("crossattention/value/", "cross_value/")
        np.testing.assert_array_equal(flat[f"nlvr_fusion/pair_{j}/{shared}"], value)
        assert f"nlvr_fusion/pair_{j}/layer_0/{path}" not in flat
      else:
        for slot in (0, 1):
          np.testing.assert_array_equal(flat[f"nlvr_fusion/pair_{j}/layer_{slot}/{path}"], value)
  # Everything else is the checkpoint as it was.
  for path, value in source.items():
    np.testing.assert_array_equal(flat[path], value)
  # An already widened checkpoint (TA pre-step, NLVR fine-tune) is left alone.
  assert classify.NLVRModel.remap_pretrained(remapped) is remapped
  # Into a fresh NLVR model: every fusion leaf comes from the checkpoint; only the new heads are new.
  _, fresh = _init("nlvr")
  restored, report = checkpoint.partial_restore(fresh, remapped)
  assert sorted({p.split("/")[0] for p in report.new}) == ["cls_head", "ta_head"]
  assert all(p.startswith("fusion/") for p in report.unused)
  assert len([p for p in report.loaded if p.startswith("nlvr_fusion/")]) == len(_flat(fresh["nlvr_fusion"]))
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)


def test_remap_rejects_a_fusion_without_cross_attention():
  with pytest.raises(ValueError, match="remap_pretrained.*fusion"):
    classify.NLVRModel.remap_pretrained({"fusion": {"layer_0": {"attention": {}}}})


def test_nlvr_from_duplicated_layers_with_one_image_is_each_pretrained_layer_twice():
  _, pretrained = _init("vlp", seed=5)
  model, fresh = _init("nlvr")
  params, _ = checkpoint.partial_restore(fresh, classify.NLVRModel.remap_pretrained(pretrained))
  inputs = _inputs(2)
  image = jnp.asarray(inputs["image0"])
  logits = model.apply({"params": params}, image, image, inputs["text_ids"], inputs["text_mask"],
                       method=model.nlvr_logits)
  ta_logits = model.apply({"params": params}, image, image, inputs["text_ids"], inputs["text_mask"],
                          method=model.ta_logits)
  assert logits.shape == (BATCH, 2) and ta_logits.shape == (BATCH, 3)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(ta_logits))
  bound, text_states, image0, _ = _states(model, params, dict(inputs, image1=inputs["image0"]))
  fused = bound.fuse_pair(text_states, inputs["text_mask"], image0, image0)
  layers = [pretrained["fusion"][f"layer_{j}"] for j in range(TEXT.fusion_layers)]
  expected = _reference_fuse_pair([[p, p] for p in layers], text_states, inputs["text_mask"], image0, image0)
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)


def test_nlvr_rejects_merged_fusion():
  model = _model("nlvr", fusion="merged")
  with pytest.raises(ValueError, match="fusion='cross'"):
    model.init(jax.random.key(0), *vlp.init_inputs(model.config, 2, 4))


# ----------------------------------------------------------------------------- fake model for the objectives
# A few fixed matrices; every function is written over an array module `xp`, so the objectives see
# it through jnp while the references run the same formulas in float64 NumPy.

D, DV, E, V, N, C_VE = 6, 5, 4, 13, 3, 3


def _fake_params(seed: int) -> dict:
  rng = np.random.default_rng(seed)

  def normal(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  return {"word": normal(V, D), "vision": normal(DV, DV, scale=DV**-0.5),
          "text_mix": normal(D, D, scale=D**-0.5), "image0_mix": normal(DV, D, scale=DV**-0.5),
          "image1_mix": normal(DV, D, scale=DV**-0.5),
          "image_proj": normal(DV, E), "ve_head": normal(D, C_VE, scale=2.0), "ve_bias": normal(C_VE),
          "nlvr_head": normal(D, 2, scale=2.0), "nlvr_bias": normal(2), "ta_head": normal(D, 3, scale=2.0),
          "ta_bias": normal(3)}


def _fake_encode_image(xp, p, images):
  """'Images' are token arrays [B, N, Dv] -> states [B, N, Dv]."""
  return xp.tanh(images @ p["vision"])


def _fake_fuse_pair(xp, p, text_states, text_mask, image0_states, image1_states):
  """[B, L, D]: every text token mixed with the masked text mean and both images' means."""
  weights = text_mask[..., None].astype(text_states.dtype)
  text_mean = xp.sum(text_states * weights, axis=1) / xp.maximum(xp.sum(weights, axis=1), 1)
  mix = (text_mean @ p["text_mix"] + xp.mean(image0_states, 1) @ p["image0_mix"]
         + xp.mean(image1_states, 1) @ p["image1_mix"])
  return xp.tanh(text_states + mix[:, None, :])


def _fake_cls_logits(xp, p, images, text_ids, text_mask):
  image_states = _fake_encode_image(xp, p, images)
  zeros = xp.zeros_like(image_states)
  cls = _fake_fuse_pair(xp, p, p["word"][text_ids], text_mask, image_states, zeros)[:, 0]
  return cls @ p["ve_head"] + p["ve_bias"]


def _fake_nlvr_logits(xp, p, image0, image1, text_ids, text_mask):
  cls = _fake_fuse_pair(xp, p, p["word"][text_ids], text_mask, _fake_encode_image(xp, p, image0),
                        _fake_encode_image(xp, p, image1))[:, 0]
  return cls @ p["nlvr_head"] + p["nlvr_bias"]


def _fake_image_feat(xp, p, images):
  projected = _fake_encode_image(xp, p, images)[:, 0] @ p["image_proj"]
  return projected / xp.sqrt(xp.sum(projected**2, axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class FakeModelFns:
  """`ctx.student` / `ctx.teacher`: apply(method, ...) over the fake formulas."""
  params: Any
  deterministic: bool
  stop_gradient: bool

  def apply(self, method, *args, deterministic=True):
    del deterministic  # The fake model has no dropout.
    fns = {"cls_logits": _fake_cls_logits, "nlvr_logits": _fake_nlvr_logits,
           "fuse_pair": _fake_fuse_pair,
           "ta_classify": lambda xp, p, cls: cls @ p["ta_head"] + p["ta_bias"]}
    out = fns[method](jnp, self.params, *args)
    return jax.lax.stop_gradient(out) if self.stop_gradient else out


@dataclasses.dataclass(frozen=True)
class FakeContext:
  cfg: ml_collections.ConfigDict
  alpha: jax.Array
  rng: Callable[[str], jax.Array]
  student: FakeModelFns
  teacher: FakeModelFns
  image: dict
  text: dict
  image_feat: jax.Array
  ema_image_feat: jax.Array


def _fake_batch(seed: int, batch: int = 6, num_classes: int = C_VE) -> dict:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 6, size=batch)
  text_mask = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int32)
  return {"image": rng.standard_normal((batch, N, DV)).astype(np.float32),
          "image0": rng.standard_normal((batch, N, DV)).astype(np.float32),
          "image1": rng.standard_normal((batch, N, DV)).astype(np.float32),
          "text_ids": np.where(text_mask == 1, rng.integers(1, V, size=(batch, 5)), 0).astype(np.int32),
          "text_mask": text_mask, "label": rng.integers(0, num_classes, size=batch).astype(np.int32)}


def _fake_context(params, teacher, batch, cfg=None, alpha=0.4, seed=0) -> FakeContext:
  base_key = jax.random.key(seed)
  return FakeContext(
      cfg=ml_collections.ConfigDict(cfg or {}), alpha=jnp.asarray(alpha, jnp.float32),
      rng=lambda name: jax.random.fold_in(base_key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
      student=FakeModelFns(params, deterministic=False, stop_gradient=False),
      teacher=FakeModelFns(teacher, deterministic=True, stop_gradient=True),
      image={"states": _fake_encode_image(jnp, params, jnp.asarray(batch["image"]))},
      text={"states": params["word"][batch["text_ids"]]},
      image_feat=_fake_image_feat(jnp, params, jnp.asarray(batch["image"])),
      ema_image_feat=jax.lax.stop_gradient(_fake_image_feat(jnp, teacher, jnp.asarray(batch["image"]))))


def _fake_setup(seed: int):
  params = _fake_params(seed)
  rng = np.random.default_rng(seed + 100)
  teacher = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
  return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, teacher)


def _np64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating)
                      else np.asarray(x), tree)


def _log_softmax(z):
  z = z - z.max()
  return z - np.log(np.sum(np.exp(z)))


def reference_cls_loss(params, teacher, batch, head, alpha, distill=True):
  """Loops over examples in float64: (loss, ce, soft ce, accuracy)."""
  params, teacher, batch = _np64(params), _np64(teacher), _np64(batch)
  ce = soft = correct = 0.0
  size = len(batch["label"])
  for b in range(size):
    row = {k: v[b:b + 1] for k, v in batch.items()}
    if head == "nlvr":
      args = (row["image0"], row["image1"], row["text_ids"], row["text_mask"])
      student, target = _fake_nlvr_logits(np, params, *args)[0], _fake_nlvr_logits(np, teacher, *args)[0]
    else:
      args = (row["image"], row["text_ids"], row["text_mask"])
      student, target = _fake_cls_logits(np, params, *args)[0], _fake_cls_logits(np, teacher, *args)[0]
    log_probs = _log_softmax(student)
    teacher_probs = np.exp(_log_softmax(target))
    ce += -log_probs[int(row["label"][0])] / size
    soft += -np.sum(teacher_probs * log_probs) / size
    correct += float(np.argmax(student) == row["label"][0]) / size
  loss = (1 - alpha) * ce + alpha * soft if distill else ce
  return loss, ce, soft, correct


@pytest.mark.parametrize("head,alpha", [("ve", 0.4), ("nlvr", 0.4), ("ve", 0.0), ("nlvr", 1.0)])
def test_cls_loss_matches_reference(head, alpha):
  params, teacher = _fake_setup(1)
  batch = _fake_batch(2, num_classes=3 if head == "ve" else 2)
  if head == "ve":
    batch = {k: v for k, v in batch.items() if k not in ("image0", "image1")}
  ctx = _fake_context(params, teacher, batch, alpha=alpha)
  loss, metrics = objectives.cls_loss(ctx, {k: jnp.asarray(v) for k, v in batch.items()})
  expected, ce, soft, accuracy = reference_cls_loss(params, teacher, batch, head, alpha)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["distill"], soft, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], accuracy, atol=1e-6)


def test_cls_loss_head_setting_and_no_distillation():
  params, teacher = _fake_setup(3)
  batch = _fake_batch(4, num_classes=2)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  # The batch has image, image0 and image1: 'auto' picks nlvr, `head` overrides it.
  for head in ("auto", "ve"):
    expected_head = "nlvr" if head == "auto" else "ve"
    ctx = _fake_context(params, teacher, batch, {"head": head, "distill": False}, alpha=0.4)
    loss, metrics = objectives.cls_loss(ctx, jbatch)
    expected, ce, _, _ = reference_cls_loss(params, teacher, batch, expected_head, 0.4, distill=False)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    assert "distill" not in metrics
  with pytest.raises(ValueError, match="'head'.*vqa"):
    objectives.cls_loss(_fake_context(params, teacher, batch, {"head": "vqa"}), jbatch)
  with pytest.raises(KeyError, match="'cls' needs batch keys.*label"):
    objectives.cls_loss(_fake_context(params, teacher, batch),
                        {k: v for k, v in jbatch.items() if k != "label"})


def test_text_assignment_slots_match_reference_on_fixed_draws():
  rng = np.random.default_rng(0)
  size = 9
  labels = np.array([0, 1, 2] * 3)
  first = np.array([(b + 1 + rng.integers(0, size - 1)) % size for b in range(size)])
  second = np.array([next(j for j in (rng.permutation(size)) if j not in (b, first[b])) for b in range(size)])
  slot0, slot1 = objectives.text_assignment_slots(jnp.asarray(labels), jnp.asarray(first),
                                                  jnp.asarray(second))
  for b in range(size):
    expected = {0: (b, first[b]), 1: (first[b], b), 2: (first[b], second[b])}[labels[b]]
    assert (int(slot0[b]), int(slot1[b])) == expected, b


NUM_DRAWS = 20000


def test_partner_draws_follow_softmax_without_replacement():
  rng = np.random.default_rng(1)
  sims = (1.5 * rng.standard_normal((4, 4))).astype(np.float32)
  keys = jax.random.split(jax.random.key(2), NUM_DRAWS)
  draws = jax.jit(jax.vmap(lambda k: objectives.sample_partners(k, sims)))(keys)
  first, second = [np.asarray(x) for x in draws]
  rows = np.arange(4)
  assert np.all(first != rows) and np.all(second != rows) and np.all(first != second)
  for b in range(4):
    others = [j for j in range(4) if j != b]
    weights = np.exp(sims[b, others].astype(np.float64) - sims[b, others].max())
    p = dict(zip(others, weights / weights.sum()))
    for i in others:
      np.testing.assert_allclose(np.mean(first[:, b] == i), p[i], atol=0.015)
      for j in others:
        if j != i:
          joint = np.mean((first[:, b] == i) & (second[:, b] == j))
          np.testing.assert_allclose(joint, p[i] * p[j] / (1 - p[i]), atol=0.012)


def test_partner_sampling_needs_three_images():
  with pytest.raises(ValueError, match="B >= 3"):
    objectives.sample_partners(jax.random.key(0), jnp.zeros((2, 2)))


def test_text_assignment_draws_have_the_stated_properties():
  size = 6
  sims = np.random.default_rng(3).standard_normal((size, size)).astype(np.float32)
  keys = jax.random.split(jax.random.key(4), 3000)
  draws = jax.jit(jax.vmap(lambda k: objectives.draw_text_assignment(k, sims)))(keys)
  labels, slot0, slot1 = (np.asarray(draws[k]) for k in ("labels", "slot0", "slot1"))
  own = np.broadcast_to(np.arange(size), labels.shape)
  assert set(np.unique(labels)) == {0, 1, 2}
  np.testing.assert_allclose(np.bincount(labels.ravel(), minlength=3) / labels.size, [1 / 3] * 3, atol=0.02)
  assert np.all(slot0[labels == 0] == own[labels == 0]) and np.all(slot1[labels == 0] != own[labels == 0])
  assert np.all(slot1[labels == 1] == own[labels == 1]) and np.all(slot0[labels == 1] != own[labels == 1])
  both_other = labels == 2
  assert np.all(slot0[both_other] != own[both_other]) and np.all(slot1[both_other] != own[both_other])
  assert np.all(slot0 != slot1)


def reference_ta_loss(params, batch, slot0, slot1, labels):
  """Given the construction: mean_b CE(ta_head(fuse(text_b, image_slot0[b], image_slot1[b]))) in float64."""
  params, batch = _np64(params), _np64(batch)
  states = _fake_encode_image(np, params, batch["image"])
  total, correct = 0.0, 0.0
  for b in range(len(labels)):
    text_states = params["word"][batch["text_ids"][b:b + 1]]
    fused = _fake_fuse_pair(np, params, text_states, batch["text_mask"][b:b + 1], states[slot0[b]][None],
                            states[slot1[b]][None])
    logits = fused[0, 0] @ params["ta_head"] + params["ta_bias"]
    total += -_log_softmax(logits)[labels[b]] / len(labels)
    correct += float(np.argmax(logits) == labels[b]) / len(labels)
  return total, correct


@pytest.mark.parametrize("partner_features", ["ema", "student"])
def test_nlvr_ta_loss_matches_reference_given_its_construction(partner_features):
  params, teacher = _fake_setup(5)
  batch = _fake_batch(6)
  ctx = _fake_context(params, teacher, batch, {"partner_features": partner_features}, seed=7)
  loss, metrics = objectives.nlvr_ta_loss(ctx, {k: jnp.asarray(v) for k, v in batch.items()})
  feats = ctx.ema_image_feat if partner_features == "ema" else ctx.image_feat
  expected_sims = _np64(feats) @ _np64(feats).T / 0.07
  np.testing.assert_allclose(objectives.partner_similarities(ctx), expected_sims, rtol=1e-5, atol=1e-4)
  draw = objectives.draw_text_assignment(ctx.rng("nlvr_ta"), objectives.partner_similarities(ctx))
  construction = [np.asarray(draw[k]) for k in ("slot0", "slot1", "labels")]
  expected, accuracy = reference_ta_loss(params, batch, *construction)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], accuracy, atol=1e-6)


def test_nlvr_ta_partners_come_from_the_configured_features():
  params, teacher = _fake_setup(6)
  batch = _fake_batch(7)
  rows = np.arange(6)
  # Similarity 1 within a pair of images, 0 across pairs: at a low temperature the partner of
  # an image is its pair mate. EMA pairs (0,1) (2,3) (4,5); student pairs (0,3) (1,4) (2,5).
  ema_mate, student_mate = rows ^ 1, (rows + 3) % 6
  ema_feats = jnp.asarray(np.eye(3, dtype=np.float32)[rows // 2])
  student_feats = jnp.asarray(np.eye(3, dtype=np.float32)[rows % 3])
  ctx = dataclasses.replace(_fake_context(params, teacher, batch), ema_image_feat=ema_feats,
                            image_feat=student_feats)
  for features, mate in (("ema", ema_mate), ("student", student_mate)):
    view = dataclasses.replace(ctx, cfg=ml_collections.ConfigDict({"partner_features": features,
                                                                   "temperature": 0.001}))
    for seed in range(5):
      draw = objectives.draw_text_assignment(jax.random.key(seed), objectives.partner_similarities(view))
      labels, slot0, slot1 = (np.asarray(draw[k]) for k in ("labels", "slot0", "slot1"))
      partner = np.where(labels == 0, slot1, slot0)
      np.testing.assert_array_equal(partner[labels < 2], mate[labels < 2])


# ----------------------------------------------------------------------------- real context, jitted grads


def _real_grads(kind: str, objective: str, cfg=None):
  model, params = _init(kind)
  ema_params = _perturbed(params, 11)
  inputs = _inputs(3)
  batch = {k: jnp.asarray(v) for k, v in inputs.items()}
  batch["label"] = jnp.asarray([0, 1, 1, 0] if kind == "nlvr" else [0, 1, 2, 2], jnp.int32)
  image_keys = ("image0", "image1") if (kind, objective) == ("nlvr", "cls") else ("image",)
  batch = {k: batch[k] for k in (*image_keys, "text_ids", "text_mask", "label")}
  loss_fn = getattr(objectives, {"cls": "cls_loss", "nlvr_ta": "nlvr_ta_loss"}[objective])

  def total(params, ema_params):
    ctx = context_lib.Context(model=model, params=params, ema_params=ema_params, objective_state={}, batch=batch,
                              rng=jax.random.key(0), step=jnp.zeros((), jnp.int32), alpha=jnp.float32(0.4),
                              num_groups=1, cfg=ml_collections.ConfigDict(cfg or {}))
    return loss_fn(ctx, batch)[0]

  loss, (grads, ema_grads) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(params, ema_params)
  return loss, _flat(grads), _flat(ema_grads)


@pytest.mark.parametrize("kind,objective,head", [("ve", "cls", "cls_head"), ("nlvr", "cls", "cls_head"),
                                                 ("nlvr", "nlvr_ta", "ta_head")])
def test_jitted_grads_are_finite_and_never_reach_the_ema_params(kind, objective, head):
  loss, grads, ema_grads = _real_grads(kind, objective)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  for path, grad in ema_grads.items():
    assert not np.any(grad), f"gradient reached the EMA param {path}"
  for prefix in (head, "vision/", "text/", "nlvr_fusion/" if kind == "nlvr" else "fusion/"):
    assert sum(float(np.abs(g).sum()) for p, g in grads.items() if p.startswith(prefix)) > 0, prefix
  if kind == "nlvr":
    other_head = "ta_head" if head == "cls_head" else "cls_head"
    assert not any(np.any(g) for p, g in grads.items() if p.startswith(other_head))


# ----------------------------------------------------------------------------- evaluator


def test_accuracy_metrics_by_hand():
  labels = [0, 0, 1, 2, 2, 2]
  predictions = [0, 1, 1, 2, 0, 2]
  out = classification.accuracy_metrics(predictions, labels, 3, ("contradiction", "neutral", "entailment"))
  assert out["accuracy"] == pytest.approx(400 / 6)
  assert out["num_examples"] == 6
  assert out["class_accuracy/contradiction"] == pytest.approx(50.0)
  assert out["class_accuracy/neutral"] == pytest.approx(100.0)
  assert out["class_accuracy/entailment"] == pytest.approx(200 / 3)
  expected = {("contradiction", "contradiction"): 1, ("contradiction", "neutral"): 1,
              ("neutral", "neutral"): 1, ("entailment", "contradiction"): 1, ("entailment", "entailment"): 2}
  names = ("contradiction", "neutral", "entailment")
  for t in names:
    for p in names:
      assert out[f"confusion/{t}_as_{p}"] == expected.get((t, p), 0), (t, p)
  assert len(out) == 2 + 3 + 9


def test_accuracy_metrics_class_without_examples_and_errors():
  out = classification.accuracy_metrics([1, 1, 0], [1, 1, 1], 2)
  assert out["accuracy"] == pytest.approx(200 / 3)
  assert np.isnan(out["class_accuracy/class0"]) and out["class_accuracy/class1"] == pytest.approx(200 / 3)
  assert out["confusion/class1_as_class0"] == 1 and out["confusion/class0_as_class1"] == 0
  with pytest.raises(ValueError, match="outside"):
    classification.accuracy_metrics([0, 2], [0, 1], 2)
  with pytest.raises(ValueError, match="equally many"):
    classification.accuracy_metrics([], [], 2)


def _eval_batches(kind: str, seed: int, valid_rows=((1, 1, 1, 0), (1, 1, 0, 0))):
  batches = []
  for k, valid in enumerate(valid_rows):
    batch = _inputs(seed + k)
    if kind == "nlvr":
      del batch["image"]
    else:
      del batch["image0"], batch["image1"]
    num_classes = 2 if kind == "nlvr" else 3
    batch["label"] = np.random.default_rng(seed + k).integers(0, num_classes, size=BATCH).astype(np.int32)
    batch["valid"] = np.asarray(valid, bool)
    first = sum(int(np.sum(b["valid"])) for b in batches)
    batch["index"] = np.where(batch["valid"], np.cumsum(batch["valid"]) - 1 + first, -1).astype(np.int32)
    batches.append(batch)
  return batches


def _direct_predictions(model, params, batches):
  predictions, labels = [], []
  for batch in batches:
    if isinstance(model, classify.NLVRModel):
      logits = model.apply({"params": params}, batch["image0"], batch["image1"], batch["text_ids"],
                           batch["text_mask"], method=model.nlvr_logits)
    else:
      logits = model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_mask"],
                           method=model.cls_logits)
    predictions.append(np.argmax(np.asarray(logits), axis=-1)[batch["valid"]])
    labels.append(batch["label"][batch["valid"]])
  return np.concatenate(predictions), np.concatenate(labels)


@pytest.mark.parametrize("kind", ["ve", "nlvr"])
def test_evaluate_scores_the_valid_rows_with_the_model_kinds_forward(kind):
  model, params = _init(kind)
  batches = _eval_batches(kind, 20)
  predictions, labels = _direct_predictions(model, params, batches)
  assert len(labels) == 5
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])
  out = classification.evaluate(model, params, batches, mesh=mesh)
  names = classification.CLASS_NAMES[kind]
  expected = classification.accuracy_metrics(predictions, labels, len(names), names)
  assert out == pytest.approx(expected, nan_ok=True)
  table = classification.format_results(out)
  assert f"accuracy {out['accuracy']:.2f}" in table and all(n in table for n in names)


def test_run_reads_make_eval_data_and_takes_the_labels_of_the_split(monkeypatch):
  model, params = _init("ve")
  batches = _eval_batches("ve", 30)
  predictions, true_labels = _direct_predictions(model, params, batches)
  split_labels = np.zeros([5], np.int32)
  for batch in batches:
    split_labels[batch["index"][batch["valid"]]] = batch["label"][batch["valid"]]
  np.testing.assert_array_equal(split_labels, true_labels)
  # An unreadable row arrives all zero, label included; the split's `labels` keep its class. The
  # batch label of example 3 is changed so that scoring it instead would flip that row.
  right = predictions[3] == true_labels[3]
  batches[1]["label"][0] = (true_labels[3] + 1) % 3 if right else predictions[3]
  calls = []

  class FakeEvalData:
    num_examples = 5
    labels = split_labels

    def batches(self):
      return iter(batches)

  def make_eval_data(input_cfg, *, split, batch_size):
    calls.append((input_cfg.format, split, batch_size))
    return FakeEvalData()

  fake_tasks = types.ModuleType("input_pipeline.tasks")
  fake_tasks.make_eval_data = make_eval_data
  monkeypatch.setitem(sys.modules, "input_pipeline.tasks", fake_tasks)
  monkeypatch.setattr(input_pipeline, "tasks", fake_tasks, raising=False)
  config = ml_collections.ConfigDict(dict(input=dict(format="snli_ve"),
                                          eval=dict(split="dev", batch_size=BATCH)))
  out = classification.run(config, model, params)
  assert calls == [("snli_ve", "dev", BATCH)]
  assert out["accuracy"] == pytest.approx(100.0 * np.mean(predictions == true_labels))
  FakeEvalData.num_examples = 6
  with pytest.raises(ValueError, match="5 valid rows.*6 examples"):
    classification.run(config, model, params)


def test_evaluator_compiles_once_and_repeats_its_results():
  """One Evaluator, three evaluations on a mesh: `predict` compiles on the first only."""
  model, params = _init("nlvr")
  batches = _eval_batches("nlvr", 40)
  predictions, labels = _direct_predictions(model, params, batches)

  class FakeEvalData:
    num_examples = 5

    def batches(self):
      return iter(batches)

  config = ml_collections.ConfigDict(dict(input=dict(format="nlvr2"), eval=dict(split="dev", batch_size=BATCH)))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
  evaluator = classification.Evaluator(config, model, mesh, data=FakeEvalData())
  params = jax.device_put(params, sharding.replicated(mesh))
  with compile_log.compile_log() as first:
    results = [evaluator(params)]
  with compile_log.compile_log() as later:
    results += [evaluator(params), evaluator(params)]
  assert first.count("jit(predict)") == 1 and later == []
  assert evaluator.functions["predict"]._cache_size() == 1
  names = classification.CLASS_NAMES["nlvr"]
  assert results[0] == results[1] == results[2]
  assert results[0] == pytest.approx(classification.accuracy_metrics(predictions, labels, 2, names), nan_ok=True)


def test_evaluator_rejects_a_model_without_a_classification_head():
  model, _ = _init("vlp")
  with pytest.raises(ValueError, match="'ve' or 'nlvr'"):
    classification.make_predict_fn(model)
