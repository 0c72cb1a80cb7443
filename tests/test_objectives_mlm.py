"""MLM objective (with momentum distillation) against a NumPy loop reference."""
import dataclasses

import fake_context as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.objectives import mlm


def _log_softmax(logits):
  shifted = logits - logits.max()
  return shifted - np.log(np.sum(np.exp(shifted)))


def reference_mlm(ctx, params, teacher_params, labels, distill: bool):
  """Loops over the masked tokens in float64. Returns (loss, accuracy)."""
  params, teacher_params = fc.to_numpy(params), fc.to_numpy(teacher_params)
  states = fc.to_numpy(ctx.masked_fusion["text_states"])
  teacher_states = fc.to_numpy(ctx.ema_masked_fusion["text_states"])
  alpha = float(ctx.alpha)
  hard, soft, correct, count = 0.0, 0.0, 0, 0
  for b in range(labels.shape[0]):
    for position in range(labels.shape[1]):
      label = labels[b, position]
      if label < 0:
        continue
      log_probs = _log_softmax(fc.mlm_logits(np, params, states[b, position]))
      teacher_probs = np.exp(_log_softmax(
          fc.mlm_logits(np, teacher_params, teacher_states[b, position])))
      hard += -log_probs[label]
      soft += -np.sum(teacher_probs * log_probs)
      correct += int(np.argmax(log_probs)) == label
      count += 1
  if count == 0:
    return 0.0, 0.0
  loss = (1 - alpha) * hard / count + alpha * soft / count if distill else hard / count
  return loss, correct / count


def _context(seed, alpha=0.4, cfg=None, fusion="merged", **input_kwargs):
  params, teacher, inputs = fc.setup(seed, **input_kwargs)
  ctx = fc.build_context(params, teacher, inputs, cfg or {}, alpha=alpha, fusion=fusion)
  return ctx, params, teacher, inputs["batch"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("distill", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_matches_reference(alpha, distill, seed):
  ctx, params, teacher, batch = _context(seed, alpha, {"distill": distill})
  loss, metrics = mlm.mlm_loss(ctx, fc.jnp_batch(batch))
  expected_loss, expected_accuracy = reference_mlm(ctx, params, teacher, batch["mlm_labels"],
                                                   distill)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], expected_accuracy, atol=1e-6)


def test_mlm_works_with_cross_fusion():
  ctx, params, teacher, batch = _context(2, fusion="cross")
  loss, _ = mlm.mlm_loss(ctx, fc.jnp_batch(batch))
  np.testing.assert_allclose(
      loss, reference_mlm(ctx, params, teacher, batch["mlm_labels"], True)[0], rtol=1e-5)


def test_unmasked_positions_do_not_change_the_loss():
  ctx, _, _, batch = _context(3)
  unmasked = jnp.asarray(batch["mlm_labels"] < 0)[..., None]
  noise = 5.0 * jax.random.normal(jax.random.key(0), ctx.masked_fusion["text_states"].shape)

  def perturb(states):
    return jnp.where(unmasked, states + noise, states)

  changed = dataclasses.replace(
      ctx, masked_fusion={**ctx.masked_fusion, "text_states": perturb(ctx.masked_fusion["text_states"])},
      ema_masked_fusion={"text_states": perturb(ctx.ema_masked_fusion["text_states"])})
  original, _ = mlm.mlm_loss(ctx, fc.jnp_batch(batch))
  perturbed, _ = mlm.mlm_loss(changed, fc.jnp_batch(batch))
  np.testing.assert_allclose(perturbed, original, rtol=1e-6)
  masked_change = dataclasses.replace(
      ctx, masked_fusion={**ctx.masked_fusion, "text_states": ctx.masked_fusion["text_states"] + noise})
  assert abs(float(mlm.mlm_loss(masked_change, fc.jnp_batch(batch))[0]) - float(original)) > 1e-3


def test_no_masked_tokens_gives_zero_loss_and_finite_gradients():
  params, teacher, inputs = fc.setup(4, mask_prob=0.0)
  assert np.all(inputs["batch"]["mlm_labels"] < 0)
  batch = fc.jnp_batch(inputs["batch"])

  def loss_fn(p):
    return mlm.mlm_loss(fc.build_context(p, teacher, inputs, {}), batch)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      jax.tree.map(jnp.asarray, params))
  assert float(loss) == 0.0 and float(metrics["accuracy"]) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_mlm_jit_and_gradient_through_student():
  params, teacher, inputs = fc.setup(5)
  batch = fc.jnp_batch(inputs["batch"])

  def loss_fn(p):
    return mlm.mlm_loss(fc.build_context(p, teacher, inputs, {}), batch)[0]

  jax_params = jax.tree.map(jnp.asarray, params)
  np.testing.assert_allclose(jax.jit(loss_fn)(jax_params), loss_fn(jax_params), rtol=1e-5)
  grads = jax.jit(jax.grad(loss_fn))(jax_params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for name in ("mlm_kernel", "word_embedding", "fuse_image_kernel"):
    assert float(jnp.abs(grads[name]).sum()) > 0, name


def test_mlm_computes_in_float32_from_bfloat16_states():
  ctx, _, _, batch = _context(6)
  low = dataclasses.replace(
      ctx, masked_fusion={**ctx.masked_fusion, "text_states": ctx.masked_fusion["text_states"].astype(jnp.bfloat16)})
  loss, _ = mlm.mlm_loss(low, fc.jnp_batch(batch))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, mlm.mlm_loss(ctx, fc.jnp_batch(batch))[0], rtol=0.05)


def test_mlm_input_errors_name_the_field():
  ctx, _, _, batch = _context(7)
  with pytest.raises(KeyError, match="mlm_labels"):
    mlm.mlm_loss(ctx, {k: v for k, v in fc.jnp_batch(batch).items() if k != "mlm_labels"})
  short = {**fc.jnp_batch(batch), "mlm_labels": jnp.asarray(batch["mlm_labels"])[:, :-1]}
  with pytest.raises(ValueError, match=r"batch\['mlm_labels'\]"):
    mlm.mlm_loss(ctx, short)
