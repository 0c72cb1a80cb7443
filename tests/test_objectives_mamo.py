"""MAMO objectives MRM and MIM against NumPy loop references."""
import dataclasses

import fake_context as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.objectives import mim, mrm


def reference_layer_norm(vector):
  mean = sum(vector) / len(vector)
  var = sum((v - mean)**2 for v in vector) / len(vector)
  return (vector - mean) / np.sqrt(var + 1e-6)


def reference_regression(prediction, target, kind, beta=1.0):
  """Loss of one position, looping over features."""
  if kind == "mse":
    return np.mean([(p - t)**2 for p, t in zip(prediction, target)])
  if kind == "smooth_l1":
    errors = [abs(p - t) for p, t in zip(prediction, target)]
    return np.mean([0.5 * e**2 / beta if e < beta else e - 0.5 * beta for e in errors])
  assert kind == "cosine"
  norms = max(np.sqrt(np.sum(prediction**2)), 1e-8) * max(np.sqrt(np.sum(target**2)), 1e-8)
  return 1.0 - np.dot(prediction, target) / norms


def reference_mrm(ctx, params, batch, top_k=3, target_norm="layernorm", kind="mse", beta=1.0):
  """Returns (pooled loss, text loss, image loss), looping over masked positions in float64."""
  params = fc.to_numpy(params)
  masked = fc.to_numpy(ctx.masked_fusion)
  clean = fc.to_numpy(ctx.ema_clean_fusion)
  normalize = reference_layer_norm if target_norm == "layernorm" else (lambda v: v)

  def target(layers, b, token):
    return sum(normalize(layer[b, token]) for layer in layers[-top_k:]) / top_k

  def position_loss(states, layers, b, token):
    prediction = fc.mrm_predict(np, params, states[b, token])
    return reference_regression(prediction, target(layers, b, token), kind, beta)

  text_losses, image_losses = [], []
  labels = batch["mlm_labels"]
  for b in range(labels.shape[0]):
    for token in range(labels.shape[1]):
      if labels[b, token] >= 0:
        text_losses.append(position_loss(masked["text_states"], clean["layer_text_states"],
                                         b, token))
  if masked["image_states"] is not None and "patch_mask" in batch:
    patch_mask = batch["patch_mask"]
    for b in range(patch_mask.shape[0]):
      for patch in range(patch_mask.shape[1]):
        if patch_mask[b, patch]:
          image_losses.append(position_loss(masked["image_states"],
                                            clean["layer_image_states"], b, patch + 1))

  def mean(values):
    return sum(values) / len(values) if values else 0.0

  return mean(text_losses + image_losses), mean(text_losses), mean(image_losses)


def reference_mim(ctx, params, batch, kind="cosine", target_norm="none"):
  params = fc.to_numpy(params)
  image_states = fc.to_numpy(ctx.masked_fusion["image_states"])
  teacher_states = fc.to_numpy(ctx.ema_image["states"])
  patch_mask = batch["patch_mask"]
  losses = []
  for b in range(patch_mask.shape[0]):
    for patch in range(patch_mask.shape[1]):
      if patch_mask[b, patch]:
        prediction = fc.mim_predict(np, params, image_states[b, patch + 1])
        target = teacher_states[b, patch + 1]
        if target_norm == "layernorm":
          target = reference_layer_norm(target)
        losses.append(reference_regression(prediction, target, kind))
  return sum(losses) / len(losses) if losses else 0.0


def _context(seed, cfg=None, fusion="merged", **input_kwargs):
  params, teacher, inputs = fc.setup(seed, **input_kwargs)
  ctx = fc.build_context(params, teacher, inputs, cfg or {}, fusion=fusion)
  return ctx, params, teacher, inputs


def _assert_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# --- MRM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_norm", ["layernorm", "none"])
@pytest.mark.parametrize("kind,beta", [("mse", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 0.3),
                                       ("cosine", 1.0)])
def test_mrm_matches_reference(kind, beta, target_norm):
  cfg = {"loss": kind, "beta": beta, "target_norm": target_norm}
  for seed in (0, 1):
    ctx, params, _, inputs = _context(seed, cfg)
    loss, metrics = mrm.mrm_loss(ctx, fc.jnp_batch(inputs["batch"]))
    expected = reference_mrm(ctx, params, inputs["batch"], 3, target_norm, kind, beta)
    assert loss.dtype == jnp.float32
    _assert_close(loss, expected[0])
    _assert_close([metrics["loss"], metrics["text_loss"], metrics["image_loss"]], expected)
    assert float(metrics["image_loss"]) > 0


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_mrm_top_k_layers(top_k):
  ctx, params, _, inputs = _context(2, {"top_k": top_k})
  loss, _ = mrm.mrm_loss(ctx, fc.jnp_batch(inputs["batch"]))
  _assert_close(loss, reference_mrm(ctx, params, inputs["batch"], top_k)[0])


def test_mrm_is_text_only_without_fused_image_states_or_patch_mask():
  ctx, params, _, inputs = _context(3, fusion="cross")
  batch = inputs["batch"]
  loss, metrics = mrm.mrm_loss(ctx, fc.jnp_batch(batch))
  expected = reference_mrm(ctx, params, batch)
  _assert_close(loss, expected[0])
  _assert_close(loss, metrics["text_loss"])
  assert float(metrics["image_loss"]) == 0.0

  merged_ctx, params, _, inputs = _context(3)
  no_patches = {k: v for k, v in inputs["batch"].items() if k != "patch_mask"}
  loss, metrics = mrm.mrm_loss(merged_ctx, fc.jnp_batch(no_patches))
  _assert_close(loss, reference_mrm(merged_ctx, params, no_patches)[0])
  assert float(metrics["image_loss"]) == 0.0


def _perturb_unmasked(states, masked, seed):
  """Adds large noise to states[b, t] where masked[b, t] is False."""
  noise = 5.0 * jax.random.normal(jax.random.key(seed), states.shape)
  return jnp.where(jnp.asarray(masked)[..., None], states, states + noise)


def test_mrm_ignores_unmasked_positions():
  ctx, _, _, inputs = _context(4)
  batch = inputs["batch"]
  text_masked = batch["mlm_labels"] >= 0
  # Image token 0 is CLS and never a target.
  image_masked = np.concatenate([np.zeros_like(batch["patch_mask"][:, :1]),
                                 batch["patch_mask"]], axis=1)
  changed = dataclasses.replace(
      ctx,
      masked_fusion={"text_states": _perturb_unmasked(ctx.masked_fusion["text_states"], text_masked, 0),
              "image_states": _perturb_unmasked(ctx.masked_fusion["image_states"], image_masked, 1)},
      ema_clean_fusion={
          "layer_text_states": [_perturb_unmasked(s, text_masked, 2 + k)
                                for k, s in enumerate(ctx.ema_clean_fusion["layer_text_states"])],
          "layer_image_states": [_perturb_unmasked(s, image_masked, 9 + k)
                                 for k, s in enumerate(ctx.ema_clean_fusion["layer_image_states"])],
      })
  original = mrm.mrm_loss(ctx, fc.jnp_batch(batch))[1]
  perturbed = mrm.mrm_loss(changed, fc.jnp_batch(batch))[1]
  for name in ("loss", "text_loss", "image_loss"):
    np.testing.assert_allclose(perturbed[name], original[name], rtol=1e-6)
  everywhere = dataclasses.replace(
      ctx, masked_fusion={**ctx.masked_fusion, "image_states": ctx.masked_fusion["image_states"] + 1.0})
  assert abs(float(mrm.mrm_loss(everywhere, fc.jnp_batch(batch))[0]) -
             float(original["loss"])) > 1e-3


def test_mrm_and_mim_with_nothing_masked_give_zero_and_finite_gradients():
  params, teacher, inputs = fc.setup(5, mask_prob=0.0, patch_mask_prob=0.0)
  batch = fc.jnp_batch(inputs["batch"])
  assert not np.any(inputs["batch"]["patch_mask"]) and np.all(inputs["batch"]["mlm_labels"] < 0)

  def total(p):
    ctx = fc.build_context(p, teacher, inputs, {})
    return mrm.mrm_loss(ctx, batch)[0] + mim.mim_loss(ctx, batch)[0]

  value, grads = jax.jit(jax.value_and_grad(total))(jax.tree.map(jnp.asarray, params))
  assert float(value) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("objective,head", [(mrm.mrm_loss, "mrm_kernel"),
                                            (mim.mim_loss, "mim_kernel")])
def test_jit_and_gradient_through_student(objective, head):
  params, teacher, inputs = fc.setup(6)
  batch = fc.jnp_batch(inputs["batch"])

  def loss_fn(p):
    return objective(fc.build_context(p, teacher, inputs, {}), batch)[0]

  jax_params = jax.tree.map(jnp.asarray, params)
  np.testing.assert_allclose(jax.jit(loss_fn)(jax_params), loss_fn(jax_params), rtol=1e-5)
  grads = jax.jit(jax.grad(loss_fn))(jax_params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for name in (head, "patch_mask_embedding", "fuse_image_kernel"):
    assert float(jnp.abs(grads[name]).sum()) > 0, name
  # Targets come from the teacher under stop_gradient only.
  assert float(jnp.abs(grads["layer_kernels"]).sum()) == 0


def test_mrm_computes_in_float32_from_bfloat16_states():
  ctx, _, _, inputs = _context(7)
  low = dataclasses.replace(ctx, masked_fusion=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                            ctx.masked_fusion))
  loss, _ = mrm.mrm_loss(low, fc.jnp_batch(inputs["batch"]))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, mrm.mrm_loss(ctx, fc.jnp_batch(inputs["batch"]))[0],
                             rtol=0.05)


def test_mrm_config_and_input_errors_name_the_field():
  ctx, _, _, inputs = _context(8, {"top_k": 5})
  batch = fc.jnp_batch(inputs["batch"])
  with pytest.raises(ValueError, match="'top_k' is 5.*4 fusion layers"):
    mrm.mrm_loss(ctx, batch)
  for cfg, field in (({"loss": "l2"}, "'loss'"), ({"target_norm": "rms"}, "'target_norm'")):
    ctx, _, _, _ = _context(8, cfg)
    with pytest.raises(ValueError, match=field):
      mrm.mrm_loss(ctx, batch)
  ctx, _, _, _ = _context(8)
  with pytest.raises(ValueError, match=r"batch\['patch_mask'\]"):
    mrm.mrm_loss(ctx, {**batch, "patch_mask": batch["patch_mask"][:, 1:]})
  with pytest.raises(KeyError, match="mlm_labels"):
    mrm.mrm_loss(ctx, {k: v for k, v in batch.items() if k != "mlm_labels"})


def test_regression_losses_on_hand_values():
  prediction = jnp.array([[0.0, 2.0], [1.0, 0.0]])
  target = jnp.array([[0.5, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(mrm.regression_loss(prediction, target, "mse"), [2.125, 0.5])
  # Errors 0.5 (quadratic side) and 2.0 (linear side) with beta 1: (0.125 + 1.5) / 2.
  np.testing.assert_allclose(mrm.regression_loss(prediction, target, "smooth_l1"),
                             [0.8125, 0.25])
  np.testing.assert_allclose(mrm.regression_loss(prediction, target, "smooth_l1", beta=0.0),
                             [1.25, 0.5])
  # An all-zero target has no direction: cos = 0, loss 1, and no NaN.
  np.testing.assert_allclose(mrm.regression_loss(prediction, target, "cosine"), [1.0, 1.0])


# --- MIM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_norm", ["none", "layernorm"])
@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_mim_matches_reference(kind, target_norm):
  for seed in (0, 1):
    ctx, params, _, inputs = _context(seed, {"loss": kind, "target_norm": target_norm})
    loss, metrics = mim.mim_loss(ctx, fc.jnp_batch(inputs["batch"]))
    expected = reference_mim(ctx, params, inputs["batch"], kind, target_norm)
    assert loss.dtype == jnp.float32
    _assert_close(loss, expected)
    _assert_close(metrics["loss"], expected)


def test_mim_ignores_unmasked_patches():
  ctx, _, _, inputs = _context(9)
  batch = inputs["batch"]
  image_masked = np.concatenate([np.zeros_like(batch["patch_mask"][:, :1]),
                                 batch["patch_mask"]], axis=1)
  changed = dataclasses.replace(
      ctx,
      masked_fusion={**ctx.masked_fusion,
              "image_states": _perturb_unmasked(ctx.masked_fusion["image_states"], image_masked, 0)},
      ema_image={"states": _perturb_unmasked(ctx.ema_image["states"], image_masked, 1)})
  original, _ = mim.mim_loss(ctx, fc.jnp_batch(batch))
  np.testing.assert_allclose(mim.mim_loss(changed, fc.jnp_batch(batch))[0], original, rtol=1e-6)
  everywhere = dataclasses.replace(ctx, ema_image={"states": ctx.ema_image["states"] * -1.0})
  assert abs(float(mim.mim_loss(everywhere, fc.jnp_batch(batch))[0]) - float(original)) > 1e-3


def test_mim_input_errors_name_the_field():
  ctx, _, _, inputs = _context(10, fusion="cross")
  batch = fc.jnp_batch(inputs["batch"])
  with pytest.raises(ValueError, match="merged"):
    mim.mim_loss(ctx, batch)
  ctx, _, _, _ = _context(10)
  with pytest.raises(KeyError, match="patch_mask"):
    mim.mim_loss(ctx, {k: v for k, v in batch.items() if k != "patch_mask"})
  with pytest.raises(ValueError, match=r"batch\['patch_mask'\]"):
    mim.mim_loss(ctx, {**batch, "patch_mask": batch["patch_mask"][:, 1:]})
  ctx, _, _, _ = _context(10, {"loss": "smooth_l1"})
  with pytest.raises(ValueError, match="'loss'"):
    mim.mim_loss(ctx, batch)
