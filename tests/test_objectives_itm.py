"""ITM objective and the hard-negative sampler against NumPy references."""
import dataclasses
import functools

import fake_context as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.objectives import itm

NUM_DRAWS = 20000


def reference_itm(ctx, params, batch, negative_image_idx, negative_text_idx):
  """Loops over the B positive and 2B negative pairs, fusing each pair on its own (float64).

  Returns (loss, accuracy, labels).
  """
  params = fc.to_numpy(params)
  text_states = fc.to_numpy(ctx.text["states"])
  image_states = fc.to_numpy(ctx.image["states"])
  text_mask = batch["text_mask"]
  batch_size = text_states.shape[0]
  pairs = ([(b, b, 1) for b in range(batch_size)] +
           [(b, negative_image_idx[b], 0) for b in range(batch_size)] +
           [(negative_text_idx[b], b, 0) for b in range(batch_size)])
  total, correct = 0.0, 0
  for text_row, image_row, label in pairs:
    fused = fc.fuse(np, params, text_states[text_row:text_row + 1],
                    text_mask[text_row:text_row + 1], image_states[image_row:image_row + 1])
    logits = fc.itm_logits(np, params, fused["text_states"][0, 0])
    log_norm = logits.max() + np.log(np.sum(np.exp(logits - logits.max())))
    total += -(logits[label] - log_norm)
    correct += int(np.argmax(logits)) == label
  return total / len(pairs), correct / len(pairs), np.array([p[2] for p in pairs])


def reference_sampling_probs(sims, image_ids, num_groups):
  """P[b, j] of the sampler: softmax over allowed columns, uniform fallback for empty rows."""
  batch_size = sims.shape[0]
  group_size = batch_size // num_groups
  probs = np.zeros((batch_size, batch_size))
  for b in range(batch_size):
    group = range(b // group_size * group_size, (b // group_size + 1) * group_size)
    allowed = [j for j in group if j != b and image_ids[j] != image_ids[b]]
    if allowed:
      weights = np.array([np.exp(sims[b, j] - sims[b].max()) for j in allowed])
      probs[b, allowed] = weights / weights.sum()
    else:
      others = [j for j in group if j != b]
      probs[b, others] = 1.0 / len(others)
  return probs


def _draw(sims, image_ids, num_groups, seed=0):
  """NUM_DRAWS independent samples: int [NUM_DRAWS, B]."""
  keys = jax.random.split(jax.random.key(seed), NUM_DRAWS)
  sample = functools.partial(itm.sample_hard_negatives, sims=jnp.asarray(sims),
                             image_ids=jnp.asarray(image_ids), num_groups=num_groups)
  return np.asarray(jax.jit(jax.vmap(lambda key: sample(key)))(keys))


def _frequencies(draws, batch_size):
  return np.stack([np.bincount(draws[:, b], minlength=batch_size) for b in range(batch_size)]
                  ) / draws.shape[0]


@pytest.mark.parametrize("num_groups", [1, 2])
def test_sampler_follows_the_masked_softmax(num_groups):
  rng = np.random.default_rng(0)
  sims = (2.0 * rng.standard_normal((6, 6))).astype(np.float32)
  image_ids = np.array([0, 1, 0, 2, 3, 3])
  draws = _draw(sims, image_ids, num_groups)
  expected = reference_sampling_probs(sims.astype(np.float64), image_ids, num_groups)
  frequencies = _frequencies(draws, 6)
  assert np.all(frequencies[expected == 0] == 0), "drew a diagonal, same-id or other-group column"
  np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_sampler_falls_back_to_uniform_when_a_row_has_no_negative():
  sims = np.arange(36, dtype=np.float32).reshape(6, 6)
  image_ids = np.array([4, 4, 4, 1, 2, 3])
  draws = _draw(sims, image_ids, num_groups=2, seed=1)
  expected = reference_sampling_probs(sims.astype(np.float64), image_ids, 2)
  np.testing.assert_allclose(expected[0], [0, 0.5, 0.5, 0, 0, 0])
  frequencies = _frequencies(draws, 6)
  assert np.all(frequencies[expected == 0] == 0)
  np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_sampler_is_finite_for_extreme_similarities():
  sims = np.array([[0, 1e30, -1e30], [3e38, 0, -3e38], [-1e30, 1e30, 0]], np.float32)
  draws = _draw(sims, np.arange(3), num_groups=1)
  assert np.all(draws != np.arange(3)[None, :])
  assert set(np.unique(draws[:, 0])) == {1}


def test_sampler_rejects_a_one_example_scope():
  with pytest.raises(ValueError, match="scope has 1 example"):
    itm.sample_hard_negatives(jax.random.key(0), jnp.zeros((4, 4)), jnp.arange(4), 4)
  with pytest.raises(ValueError, match="not a multiple"):
    itm.sample_hard_negatives(jax.random.key(0), jnp.zeros((6, 6)), jnp.arange(6), 4)


def _context(seed, num_groups=1, cfg=None, queue_size=8, num_distinct_images=None):
  params, teacher, inputs = fc.setup(seed, queue_size=queue_size,
                                     num_distinct_images=num_distinct_images)
  ctx = fc.build_context(params, teacher, inputs, cfg or {}, num_groups=num_groups, seed=seed)
  return ctx, params, teacher, inputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_and_loss_with_fixed_negatives_match_reference(seed):
  ctx, params, _, inputs = _context(seed)
  batch = inputs["batch"]
  rng = np.random.default_rng(seed)
  negative_image_idx = rng.integers(0, 6, size=6)
  negative_text_idx = rng.integers(0, 6, size=6)
  logits, labels = itm.itm_logits_and_labels(ctx, fc.jnp_batch(batch),
                                             jnp.asarray(negative_image_idx),
                                             jnp.asarray(negative_text_idx))
  expected_loss, _, expected_labels = reference_itm(ctx, params, batch, negative_image_idx,
                                                    negative_text_idx)
  assert logits.shape == (18, 2) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(labels, [1] * 6 + [0] * 12)
  np.testing.assert_array_equal(labels, expected_labels)
  log_probs = jax.nn.log_softmax(logits)
  loss = -jnp.mean(log_probs[jnp.arange(18), labels])
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


@pytest.mark.parametrize("scope,num_groups", [("local", 2), ("global", 2), ("local", 1)])
def test_itm_loss_matches_reference_on_its_sampled_negatives(scope, num_groups):
  ctx, params, _, inputs = _context(3, num_groups, {"scope": scope}, num_distinct_images=4)
  batch = fc.jnp_batch(inputs["batch"])
  loss, metrics = itm.itm_loss(ctx, batch)
  negative_image_idx, negative_text_idx = itm.hard_negative_indices(ctx, batch)
  expected_loss, expected_accuracy, _ = reference_itm(
      ctx, params, inputs["batch"], np.asarray(negative_image_idx), np.asarray(negative_text_idx))
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], expected_accuracy, atol=1e-6)


def test_negative_images_come_from_t2i_and_negative_texts_from_i2t():
  ctx, _, _, inputs = _context(9, queue_size=4)
  rows = np.arange(6)
  # One column per row dominates each direction, so the draws are certain.
  i2t = np.full((6, 10), -1e4, np.float32)
  i2t[rows, (rows + 1) % 6] = 0.0
  t2i = np.full((6, 10), -1e4, np.float32)
  t2i[rows, (rows + 2) % 6] = 0.0
  ctx = dataclasses.replace(ctx, itc_sims={"i2t": jnp.asarray(i2t), "t2i": jnp.asarray(t2i)})
  batch = {**fc.jnp_batch(inputs["batch"]), "image_id": jnp.arange(6)}
  negative_image_idx, negative_text_idx = itm.hard_negative_indices(ctx, batch)
  np.testing.assert_array_equal(negative_image_idx, (rows + 2) % 6)
  np.testing.assert_array_equal(negative_text_idx, (rows + 1) % 6)


def _negatives_over_many_keys(ctx, batch, num_keys=200):
  """(negative images, negative texts), each int [num_keys, B], one row per rng key."""

  def negatives(key):
    return itm.hard_negative_indices(dataclasses.replace(ctx, rng=lambda name: key), batch)

  keys = jax.random.split(jax.random.key(7), num_keys)
  return [np.asarray(x) for x in jax.jit(jax.vmap(negatives))(keys)]


def test_local_scope_stays_in_the_shard_and_global_scope_does_not():
  ctx, _, _, inputs = _context(4, num_groups=2, cfg={"scope": "local"})
  batch = fc.jnp_batch(inputs["batch"])
  rows = np.arange(6)
  image_ids = inputs["batch"]["image_id"]
  for negatives in _negatives_over_many_keys(ctx, batch):
    assert np.all(negatives // 3 == rows // 3)
    assert np.all(negatives != rows)
    assert np.all(image_ids[negatives] != image_ids)
  global_ctx = dataclasses.replace(ctx, cfg=ctx.cfg.copy_and_resolve_references())
  global_ctx.cfg.scope = "global"
  for negatives in _negatives_over_many_keys(global_ctx, batch):
    assert np.any(negatives // 3 != rows // 3)


def test_negatives_never_share_the_image_id():
  ctx, _, _, inputs = _context(5, num_distinct_images=3)
  batch = fc.jnp_batch(inputs["batch"])
  image_ids = inputs["batch"]["image_id"]
  has_negative = np.array([np.any(image_ids != i) for i in image_ids])
  for negatives in _negatives_over_many_keys(ctx, batch):
    assert np.all(image_ids[negatives][:, has_negative] != image_ids[has_negative])


def test_unknown_scope_is_a_config_error():
  ctx, _, _, inputs = _context(6, cfg={"scope": "per_host"})
  with pytest.raises(ValueError, match="'scope'.*per_host"):
    itm.itm_loss(ctx, fc.jnp_batch(inputs["batch"]))


def test_local_scope_of_one_example_per_shard_is_an_error():
  ctx, _, _, inputs = _context(6, num_groups=6)
  with pytest.raises(ValueError, match="scope has 1 example"):
    itm.itm_loss(ctx, fc.jnp_batch(inputs["batch"]))


def test_itm_jit_and_gradient_through_student():
  params, teacher, inputs = fc.setup(8, queue_size=8)
  batch = fc.jnp_batch(inputs["batch"])

  def loss_fn(p):
    return itm.itm_loss(fc.build_context(p, teacher, inputs, {}, num_groups=2), batch)[0]

  jax_params = jax.tree.map(jnp.asarray, params)
  np.testing.assert_allclose(jax.jit(loss_fn)(jax_params), loss_fn(jax_params), rtol=1e-5)
  grads = jax.jit(jax.grad(loss_fn))(jax_params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for name in ("itm_kernel", "fuse_image_kernel", "vision_kernel", "word_embedding"):
    assert float(jnp.abs(grads[name]).sum()) > 0, name
  # The sampled indices are fixed: no gradient reaches the ITC projections through sampling.
  assert float(jnp.abs(grads["image_itc_kernel"]).sum()) == 0


# ----------------------------------------------------------------------------- MVP's hardest negatives


def reference_hardest(sims, image_ids, num_groups):
  """Per row: the argmax over allowed columns; without one, the first other in-group column."""
  batch_size = sims.shape[0]
  group_size = batch_size // num_groups
  out = []
  for b in range(batch_size):
    group = range(b // group_size * group_size, (b // group_size + 1) * group_size)
    allowed = [j for j in group if j != b and image_ids[j] != image_ids[b]]
    out.append(max(allowed, key=lambda j: sims[b, j]) if allowed else [j for j in group if j != b][0])
  return np.array(out)


@pytest.mark.parametrize("num_groups", [1, 2])
def test_hardest_negatives_are_the_argmax_of_allowed_columns(num_groups):
  rng = np.random.default_rng(num_groups)
  sims = rng.standard_normal((8, 8)).astype(np.float32)
  sims[np.arange(8), np.arange(8)] = 10.0  # the diagonal (the positive) is never picked
  image_ids = np.array([0, 0, 1, 2, 3, 3, 3, 4])
  got = itm.hardest_negatives(jnp.asarray(sims), jnp.asarray(image_ids), num_groups)
  np.testing.assert_array_equal(got, reference_hardest(sims, image_ids, num_groups))
  # A row whose group holds only its own image falls back to another row of its group.
  got = itm.hardest_negatives(jnp.asarray(sims), jnp.asarray([7, 7, 7, 7, 1, 2, 3, 4]), 2)
  np.testing.assert_array_equal(got[:4], [1, 0, 0, 0])


def test_hardest_pairs_split_the_batch_in_half():
  negative_image = jnp.asarray([3, 2, 1, 0, 5, 4])
  negative_text = jnp.asarray([1, 0, 3, 2, 5, 4])
  seen = set()
  for seed in range(20):
    text_idx, image_idx = map(np.asarray, itm.hardest_pairs(jax.random.key(seed), negative_image, negative_text))
    hard_image = text_idx == np.arange(6)
    assert hard_image.sum() == 3
    np.testing.assert_array_equal(image_idx[hard_image], np.asarray(negative_image)[hard_image])
    np.testing.assert_array_equal(text_idx[~hard_image], np.asarray(negative_text)[~hard_image])
    np.testing.assert_array_equal(image_idx[~hard_image], np.arange(6)[~hard_image])
    seen.add(tuple(hard_image))
  assert len(seen) > 5  # the half is drawn, not fixed


def reference_hardest_itm(ctx, params, batch, text_idx, image_idx, positive_states=None):
  """B positives then the B negative pairs, each fused alone (float64); the positives' CLS from
  `positive_states` when given."""
  params = fc.to_numpy(params)
  text_states = fc.to_numpy(ctx.text["states"])
  image_states = fc.to_numpy(ctx.image["states"])
  text_mask = batch["text_mask"]
  batch_size = text_states.shape[0]
  total = 0.0
  for k in range(2 * batch_size):
    if k < batch_size and positive_states is not None:
      cls = fc.to_numpy(positive_states)[k, 0]
    else:
      t, i = (k, k) if k < batch_size else (text_idx[k - batch_size], image_idx[k - batch_size])
      cls = fc.fuse(np, params, text_states[t:t + 1], text_mask[t:t + 1], image_states[i:i + 1])["text_states"][0, 0]
    logits = fc.itm_logits(np, params, cls)
    label = 1 if k < batch_size else 0
    total += -(logits[label] - (logits.max() + np.log(np.sum(np.exp(logits - logits.max())))))
  return total / (2 * batch_size)


@pytest.mark.parametrize("positives", ["", "masked_fusion"])
def test_hardest_itm_loss_matches_reference(positives):
  ctx, params, _, inputs = _context(12, num_groups=2,
                                    cfg={"negatives": "hardest", "scope": "local", "positives": positives},
                                    num_distinct_images=4)
  batch = fc.jnp_batch(inputs["batch"])
  loss, metrics = itm.itm_loss(ctx, batch)
  batch_size = 6
  t2i = np.asarray(ctx.itc_sims["t2i"])[:, :batch_size]
  i2t = np.asarray(ctx.itc_sims["i2t"])[:, :batch_size]
  image_ids = inputs["batch"]["image_id"]
  negative_image = reference_hardest(t2i, image_ids, 2)
  negative_text = reference_hardest(i2t, image_ids, 2)
  text_idx, image_idx = map(np.asarray, itm.hardest_pairs(ctx.rng("itm"), jnp.asarray(negative_image),
                                                          jnp.asarray(negative_text)))
  expected = reference_hardest_itm(ctx, params, inputs["batch"], text_idx, image_idx,
                                   ctx.masked_fusion["text_states"] if positives else None)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  logits, labels = itm.hardest_itm_logits_and_labels(ctx, batch, jnp.asarray(text_idx), jnp.asarray(image_idx))
  assert logits.shape == (12, 2)
  np.testing.assert_array_equal(labels, [1] * 6 + [0] * 6)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


def test_unknown_negatives_is_a_config_error():
  ctx, _, _, inputs = _context(6, cfg={"negatives": "hard"})
  with pytest.raises(ValueError, match="'negatives'.*hard"):
    itm.itm_loss(ctx, fc.jnp_batch(inputs["batch"]))
