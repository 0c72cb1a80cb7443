"""MVP's objectives (vsc, mcr, wpg) against NumPy loops; VSC on 8 simulated devices."""
import types
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlpjax.models import mvp
from vlpjax.objectives import mcr, vsc, wpg


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(row):
  m = row.max()
  return row - (m + np.log(np.sum(np.exp(row - m))))


# ----------------------------------------------------------------------------- vsc


def reference_vsc(text_feat, image_feat, logit_scale, image_ids=None):
  """Per row: CE of the text row over images and of the image row over texts (float64)."""
  text_feat, image_feat = np.asarray(text_feat, np.float64), np.asarray(image_feat, np.float64)
  batch = text_feat.shape[0]
  scale = np.exp(float(logit_scale))
  t2i_total = i2t_total = 0.0
  for b in range(batch):
    positives = [j for j in range(batch) if j == b or (image_ids is not None and image_ids[j] == image_ids[b])]
    t2i_row = _log_softmax(np.array([scale * text_feat[b] @ image_feat[j] for j in range(batch)]))
    i2t_row = _log_softmax(np.array([scale * image_feat[b] @ text_feat[j] for j in range(batch)]))
    t2i_total -= np.mean([t2i_row[j] for j in positives])
    i2t_total -= np.mean([i2t_row[j] for j in positives])
  return 0.5 * (t2i_total + i2t_total) / batch


def _features(seed, batch=8, dim=6):
  rng = np.random.default_rng(seed)
  return (_unit(rng.standard_normal((batch, dim))).astype(np.float32),
          _unit(rng.standard_normal((batch, dim))).astype(np.float32))


@pytest.mark.parametrize("id_positives", [False, True])
def test_vsc_loss_matches_reference(id_positives):
  text_feat, image_feat = _features(0)
  image_ids = np.array([0, 1, 1, 2, 3, 3, 3, 4])
  logit_scale = np.float32(np.log(1 / 0.07))
  t2i = vsc.contrastive_logits(jnp.asarray(text_feat), jnp.asarray(image_feat), jnp.asarray(logit_scale))
  ctx = types.SimpleNamespace(cfg=ml_collections.ConfigDict(dict(id_positives=id_positives)),
                              vsc_sims=dict(t2i=t2i, i2t=t2i.T, logit_scale=jnp.asarray(logit_scale)))
  loss, metrics = vsc.vsc_loss(ctx, {"image_id": jnp.asarray(image_ids)})
  expected = reference_vsc(text_feat, image_feat, logit_scale, image_ids if id_positives else None)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-5)
  # Accuracy: the argmax of each text row is one of its positives.
  t2i_np = np.asarray(t2i)
  hits = [np.argmax(t2i_np[b]) == b or (id_positives and image_ids[np.argmax(t2i_np[b])] == image_ids[b])
          for b in range(8)]
  np.testing.assert_allclose(metrics["t2i_accuracy"], np.mean(hits))


def test_vsc_scale_is_learned_unclamped():
  text_feat, image_feat = _features(1)

  def loss(s):
    t2i = vsc.contrastive_logits(jnp.asarray(text_feat), jnp.asarray(image_feat), s)
    return vsc.symmetric_infonce(t2i, vsc.positive_targets(8))[0]

  for s in (-3.0, 0.0, 6.0):  # far outside ALBEF's temperature clamp range: no clip, gradients flow
    np.testing.assert_allclose(loss(jnp.float32(s)), reference_vsc(text_feat, image_feat, s), rtol=1e-5)
    assert float(jax.grad(loss)(jnp.float32(s))) != 0.0


def test_vsc_on_8_devices_equals_1_device():
  assert jax.device_count() >= 8
  text_feat, image_feat = _features(2, batch=16)
  image_ids = np.arange(16) // 2

  def loss_fn(t, i, s, ids):
    t2i = vsc.contrastive_logits(t, i, s)
    return vsc.symmetric_infonce(t2i, vsc.positive_targets(t.shape[0], ids))[0]

  args = (jnp.asarray(text_feat), jnp.asarray(image_feat), jnp.float32(2.0), jnp.asarray(image_ids))
  single = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(*args)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  sharded_args = (jax.device_put(args[0], rows), jax.device_put(args[1], rows), jax.device_put(args[2], replicated),
                  jax.device_put(args[3], rows))
  assert len(sharded_args[0].sharding.device_set) == 8
  multi = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(*sharded_args)
  np.testing.assert_allclose(multi[0], single[0], rtol=1e-6)
  np.testing.assert_allclose(multi[0], reference_vsc(text_feat, image_feat, 2.0, image_ids), rtol=1e-5)
  for a, b in zip(multi[1], single[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- mcr


class _FakeStudent:
  """`apply` of the two MCR head functions as fixed affine maps."""

  def __init__(self, seed, width, vision_width, words, phrases):
    rng = np.random.default_rng(seed)
    self.tag_kernel = rng.standard_normal((vision_width, words)).astype(np.float32)
    self.tag_bias = rng.standard_normal(words).astype(np.float32)
    self.phrase_kernel = rng.standard_normal((width, phrases)).astype(np.float32)
    self.phrase_bias = rng.standard_normal(phrases).astype(np.float32)

  def apply(self, fn, states):
    if fn is mvp.mcr_logits:
      return states @ self.tag_kernel + self.tag_bias
    if fn is mvp.phrase_logits:
      return states @ self.phrase_kernel + self.phrase_bias
    raise AssertionError(fn)


def reference_masked_ce(logits, labels):
  losses, correct = [], []
  for index in np.ndindex(labels.shape):
    if labels[index] >= 0:
      row = _log_softmax(np.asarray(logits[index], np.float64))
      losses.append(-row[labels[index]])
      correct.append(np.argmax(row) == labels[index])
  return (np.mean(losses), np.mean(correct)) if losses else (0.0, 0.0)


@pytest.mark.parametrize("phrase_loss", [False, True])
def test_mcr_loss_matches_reference(phrase_loss):
  rng = np.random.default_rng(3)
  batch, patches, tags, length, words, phrases, width, vision_width = 4, 5, 6, 7, 13, 5, 8, 6
  image_states = rng.standard_normal((batch, 1 + patches + tags, vision_width)).astype(np.float32)
  text_states = rng.standard_normal((batch, length, width)).astype(np.float32)
  tag_labels = np.where(rng.random((batch, tags)) < 0.4, rng.integers(0, words, (batch, tags)), -1)
  phrase_labels = np.where(rng.random((batch, length)) < 0.3, rng.integers(words, words + phrases, (batch, length)),
                           -1)
  student = _FakeStudent(4, width, vision_width, words, phrases)
  ctx = types.SimpleNamespace(cfg=ml_collections.ConfigDict(dict(phrase_loss=phrase_loss)), student=student,
                              corrupted_image={"states": jnp.asarray(image_states)},
                              corrupted_text={"states": jnp.asarray(text_states)},
                              model_config=types.SimpleNamespace(text=types.SimpleNamespace(vocab_size=words)))
  batch_arrays = {"concept_mlm_labels": jnp.asarray(tag_labels), "phrase_labels": jnp.asarray(phrase_labels)}
  loss, metrics = mcr.mcr_loss(ctx, batch_arrays)
  tag_logits = image_states[:, 1 + patches:] @ student.tag_kernel + student.tag_bias
  expected, tag_accuracy = reference_masked_ce(tag_logits, tag_labels)
  np.testing.assert_allclose(metrics["tag_accuracy"], tag_accuracy, atol=1e-6)
  np.testing.assert_allclose(metrics["tags_masked"], np.sum(tag_labels >= 0))
  if phrase_loss:
    phrase_logits = text_states @ student.phrase_kernel + student.phrase_bias
    phrase_expected, _ = reference_masked_ce(phrase_logits, np.where(phrase_labels >= 0, phrase_labels - words, -1))
    np.testing.assert_allclose(metrics["phrase_loss"], phrase_expected, rtol=1e-5)
    expected += phrase_expected
  else:
    assert "phrase_loss" not in metrics
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_mcr_loss_without_masked_tags_is_zero():
  loss, accuracy, count = mcr.masked_prediction_loss(jnp.ones((2, 3, 4)), -jnp.ones((2, 3), jnp.int32))
  assert float(loss) == 0.0 and float(accuracy) == 0.0 and float(count) == 0.0


# ----------------------------------------------------------------------------- wpg


def reference_wpg(phrase_states, phrase_mask, patch_states, negative_index, positive_pick, negative_pick,
                  margin=0.2, top_k=3, negative_states=None):
  """Loops over examples and phrases: cosines, sorted descending, the picked one, hinge. With
  `negative_states` (phrases, patches) row b's negative is scored on those rows b instead."""
  phrase_states, patch_states = np.asarray(phrase_states, np.float64), np.asarray(patch_states, np.float64)

  def score(b, image, picks, phrases=phrase_states, patches=patch_states):
    values = []
    for l in np.flatnonzero(phrase_mask[b]):
      phrase = phrases[b, l] / np.linalg.norm(phrases[b, l])
      cosines = sorted((phrase @ (p / np.linalg.norm(p)) for p in patches[image]), reverse=True)
      values.append(cosines[picks[b, l]])
    return np.mean(values)

  hinges, positives, negatives = [], [], []
  for b in range(phrase_states.shape[0]):
    if not phrase_mask[b].any():
      continue
    positives.append(score(b, b, positive_pick))
    if negative_states is None:
      negatives.append(score(b, negative_index[b], negative_pick))
    else:
      negatives.append(score(b, b, negative_pick, *(np.asarray(x, np.float64) for x in negative_states)))
    hinges.append(max(0.0, negatives[-1] + margin - positives[-1]))
  return np.mean(hinges), np.mean(positives), np.mean(negatives)


def _wpg_inputs(seed, batch=5, length=6, patches=7, width=4):
  rng = np.random.default_rng(seed)
  phrase_mask = (rng.random((batch, length)) < 0.4).astype(np.int32)
  phrase_mask[1] = 0  # an example without phrases takes no part
  return (rng.standard_normal((batch, length, width)).astype(np.float32), phrase_mask,
          rng.standard_normal((batch, patches, width)).astype(np.float32))


@pytest.mark.parametrize("seed,top_k,margin", [(0, 3, 0.2), (1, 1, 0.2), (2, 3, 2.0)])
def test_phrase_grounding_loss_matches_reference(seed, top_k, margin):
  phrase_states, phrase_mask, patch_states = _wpg_inputs(seed)
  rng = np.random.default_rng(seed + 10)
  negative_index = np.array([(b + rng.integers(1, 5)) % 5 for b in range(5)])
  positive_pick = rng.integers(0, top_k, phrase_mask.shape)
  negative_pick = rng.integers(0, top_k, phrase_mask.shape)
  loss, metrics = wpg.phrase_grounding_loss(
      jnp.asarray(phrase_states), jnp.asarray(phrase_mask), jnp.asarray(patch_states), jnp.asarray(negative_index),
      jnp.asarray(positive_pick), jnp.asarray(negative_pick), margin=margin, top_k=top_k)
  expected, positive, negative = reference_wpg(phrase_states, phrase_mask, patch_states, negative_index,
                                               positive_pick, negative_pick, margin, top_k)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["positive"], positive, rtol=1e-5)
  np.testing.assert_allclose(metrics["negative"], negative, rtol=1e-5)
  np.testing.assert_allclose(metrics["with_phrases"], np.mean(phrase_mask.any(axis=1)))


def test_wpg_objective_draws_and_scores_like_the_reference():
  phrase_states, phrase_mask, patch_states = _wpg_inputs(3)
  patches = patch_states.shape[1]
  tags = np.zeros((5, 2, 4), np.float32)  # fused tag outputs after the patches are not grounded to
  base_key = jax.random.key(11)
  ctx = types.SimpleNamespace(
      cfg=ml_collections.ConfigDict(dict(margin=0.3)),
      corrupted_fusion={"text_states": jnp.asarray(phrase_states),
                        "image_states": jnp.asarray(np.concatenate([patch_states, tags + 5.0], axis=1))},
      model_config=types.SimpleNamespace(vision=types.SimpleNamespace(num_patches=patches)),
      rng=lambda name: jax.random.fold_in(base_key, zlib.crc32(name.encode()) & 0x7FFFFFFF))
  loss, metrics = wpg.wpg_loss(ctx, {"phrase_mask": jnp.asarray(phrase_mask)})
  negative_key, positive_key, pick_key = jax.random.split(ctx.rng("wpg"), 3)
  negative_index = np.asarray(wpg.random_other_rows(negative_key, 5))
  positive_pick = np.asarray(jax.random.randint(positive_key, phrase_mask.shape, 0, 3))
  negative_pick = np.asarray(jax.random.randint(pick_key, phrase_mask.shape, 0, 3))
  expected, _, _ = reference_wpg(phrase_states, phrase_mask, patch_states, negative_index, positive_pick,
                                 negative_pick, margin=0.3)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)


def test_wpg_fused_negatives_score_a_pass_over_the_negative_pair():
  phrase_states, phrase_mask, patch_states = _wpg_inputs(5)
  batch, length, width = phrase_states.shape
  patches = patch_states.shape[1]
  rng = np.random.default_rng(7)
  text_enc = rng.standard_normal((batch, length, width)).astype(np.float32)
  image_enc = rng.standard_normal((batch, patches + 2, width)).astype(np.float32)  # patches + 2 tags
  image_mask = (rng.random((batch, patches + 2)) < 0.8).astype(np.int32)
  text_mask = np.ones((batch, length), np.int32)
  mixer = rng.standard_normal((width, width)).astype(np.float32)

  def fuse(xp, text, mask, image, img_mask):
    # A stand-in cross-modal pass whose outputs depend on both sides of the pair.
    pooled = (image * img_mask[..., None]).sum(1, keepdims=True) / img_mask.sum(1, keepdims=True)[..., None]
    return {"text_states": xp.tanh(text @ mixer + pooled),
            "image_states": image + xp.tanh(text.mean(1, keepdims=True) * mask.mean(1)[:, None, None])}

  base_key = jax.random.key(12)
  ctx = types.SimpleNamespace(
      cfg=ml_collections.ConfigDict(dict(margin=0.2, negatives="fused")),
      batch={"text_mask": jnp.asarray(text_mask)},
      corrupted_text={"states": jnp.asarray(text_enc)},
      corrupted_image={"states": jnp.asarray(image_enc), "mask": jnp.asarray(image_mask)},
      corrupted_fusion={"text_states": jnp.asarray(phrase_states),
                        "image_states": jnp.asarray(np.concatenate([patch_states, np.zeros((batch, 2, width))], 1))},
      student=types.SimpleNamespace(fuse=lambda t, m, i, im: fuse(jnp, t, m, i, im)),
      model_config=types.SimpleNamespace(vision=types.SimpleNamespace(num_patches=patches)),
      rng=lambda name: jax.random.fold_in(base_key, zlib.crc32(name.encode()) & 0x7FFFFFFF))
  loss, metrics = wpg.wpg_loss(ctx, {"phrase_mask": jnp.asarray(phrase_mask), "text_mask": jnp.asarray(text_mask)})
  negative_key, positive_key, pick_key = jax.random.split(ctx.rng("wpg"), 3)
  negative_index = np.asarray(wpg.random_other_rows(negative_key, batch))
  positive_pick = np.asarray(jax.random.randint(positive_key, phrase_mask.shape, 0, 3))
  negative_pick = np.asarray(jax.random.randint(pick_key, phrase_mask.shape, 0, 3))
  negative_pair = fuse(np, text_enc, text_mask, image_enc[negative_index], image_mask[negative_index])
  expected, positive, negative = reference_wpg(
      phrase_states, phrase_mask, patch_states, negative_index, positive_pick, negative_pick,
      negative_states=(negative_pair["text_states"], negative_pair["image_states"][:, :patches]))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["positive"], positive, rtol=1e-5)
  np.testing.assert_allclose(metrics["negative"], negative, rtol=1e-5)
  # MVPTR's negatives score the other pair's own pass: a different number on the same draws.
  ctx.cfg.negatives = "pass"
  assert abs(float(wpg.wpg_loss(ctx, {"phrase_mask": jnp.asarray(phrase_mask)})[0]) - float(loss)) > 1e-4
  ctx.cfg.negatives = "typo"
  with pytest.raises(ValueError, match="negatives"):
    wpg.wpg_loss(ctx, {"phrase_mask": jnp.asarray(phrase_mask)})


def test_random_other_rows_are_uniform_over_the_others():
  draws = np.asarray(jax.vmap(lambda k: wpg.random_other_rows(k, 4))(jax.random.split(jax.random.key(0), 4000)))
  for b in range(4):
    counts = np.bincount(draws[:, b], minlength=4) / 4000
    assert counts[b] == 0
    np.testing.assert_allclose(np.delete(counts, b), 1 / 3, atol=0.03)
  with pytest.raises(ValueError, match="at least 2"):
    wpg.random_other_rows(jax.random.key(0), 1)


def test_wpg_gradient_reaches_both_sides():
  phrase_states, phrase_mask, patch_states = _wpg_inputs(4)
  picks = jnp.zeros(phrase_mask.shape, jnp.int32)

  def loss(text, image):
    return wpg.phrase_grounding_loss(text, jnp.asarray(phrase_mask), image, jnp.array([1, 2, 3, 4, 0]), picks,
                                     picks, margin=5.0)[0]

  grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(phrase_states), jnp.asarray(patch_states))
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)
  # Non-phrase positions get no gradient.
  assert float(jnp.abs(grads[0] * (1 - jnp.asarray(phrase_mask))[..., None]).sum()) == 0.0
