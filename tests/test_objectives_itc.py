"""ITC objective against a NumPy loop reference, plus the objective registry."""
import dataclasses

import fake_context as fc
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlpjax import objectives
from vlpjax.objectives import itc, registry


def reference_itc(ctx, image_ids, distill: bool, id_positives: bool):
  """ALBEF ITC with MoD, written as loops over rows and columns in float64.

  Returns (loss, i2t accuracy, t2i accuracy).
  """
  image_feat, text_feat = fc.to_numpy(ctx.image_feat), fc.to_numpy(ctx.text_feat)
  ema_image, ema_text = fc.to_numpy(ctx.ema_image_feat), fc.to_numpy(ctx.ema_text_feat)
  queues = fc.to_numpy(ctx.objective_state["itc"])
  temp = float(ctx.temp)
  alpha = float(ctx.alpha) if distill else 0.0
  batch_size = image_feat.shape[0]
  text_keys = np.concatenate([ema_text, queues["text"]])
  image_keys = np.concatenate([ema_image, queues["image"]])
  column_ids = list(image_ids) + list(queues["idx"])
  num_columns = len(column_ids)

  total_loss, correct = 0.0, {"i2t": 0, "t2i": 0}
  for b in range(batch_size):
    positives = np.zeros(num_columns)
    for j in range(num_columns):
      if j == b or (id_positives and column_ids[j] == image_ids[b]):
        positives[j] = 1.0
    positives /= positives.sum()
    for direction, query, ema_query, keys in (("i2t", image_feat[b], ema_image[b], text_keys),
                                              ("t2i", text_feat[b], ema_text[b], image_keys)):
      student = np.array([np.dot(query, keys[j]) / temp for j in range(num_columns)])
      teacher = np.array([np.dot(ema_query, keys[j]) / temp for j in range(num_columns)])
      teacher_probs = np.exp(teacher - teacher.max())
      teacher_probs /= teacher_probs.sum()
      targets = alpha * teacher_probs + (1 - alpha) * positives
      log_probs = student - student.max() - np.log(np.sum(np.exp(student - student.max())))
      total_loss += 0.5 * -np.sum(targets * log_probs)
      correct[direction] += positives[int(np.argmax(student[:batch_size]))] > 0
  return (total_loss / batch_size, correct["i2t"] / batch_size, correct["t2i"] / batch_size)


def _context(seed, queue_size, alpha, cfg, num_distinct_images=None):
  params, teacher, inputs = fc.setup(seed, queue_size=queue_size,
                                     num_distinct_images=num_distinct_images)
  ctx = fc.build_context(params, teacher, inputs, cfg, alpha=alpha)
  return ctx, inputs["batch"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("id_positives", [False, True])
@pytest.mark.parametrize("queue_size", [0, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_matches_reference(alpha, queue_size, id_positives, seed):
  ctx, batch = _context(seed, queue_size, alpha, {"id_positives": id_positives},
                        num_distinct_images=3)
  loss, metrics = itc.itc_loss(ctx, fc.jnp_batch(batch))
  expected_loss, i2t_acc, t2i_acc = reference_itc(ctx, batch["image_id"], True, id_positives)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["i2t_accuracy"], i2t_acc, atol=1e-6)
  np.testing.assert_allclose(metrics["t2i_accuracy"], t2i_acc, atol=1e-6)
  np.testing.assert_allclose(metrics["temp"], 0.07, rtol=1e-6)


def test_id_positives_split_mass_over_same_image_columns():
  image_ids = jnp.array([5, 7, 5])
  queue_ids = jnp.array([-1, 7, 5, 9])
  targets = itc.positive_targets(3, queue_ids, image_ids)
  expected = np.array([[1, 0, 1, 0, 0, 1, 0],
                       [0, 1, 0, 0, 1, 0, 0],
                       [1, 0, 1, 0, 0, 1, 0]], np.float64)
  expected /= expected.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  np.testing.assert_array_equal(itc.positive_targets(3, queue_ids), np.eye(3, 7))


def test_distill_off_means_alpha_zero():
  ctx, batch = _context(3, 8, 0.4, {"distill": False})
  loss, _ = itc.itc_loss(ctx, fc.jnp_batch(batch))
  expected_loss, _, _ = reference_itc(ctx, batch["image_id"], False, False)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  with_distill, _ = itc.itc_loss(dataclasses.replace(ctx, cfg=ml_collections.ConfigDict()),
                                 fc.jnp_batch(batch))
  assert abs(float(with_distill) - float(loss)) > 1e-4


def test_itc_jit_and_gradient_through_student():
  params, teacher, inputs = fc.setup(4, queue_size=8)
  batch = fc.jnp_batch(inputs["batch"])

  def loss_fn(p):
    return itc.itc_loss(fc.build_context(p, teacher, inputs, {}), batch)[0]

  jax_params = jax.tree.map(jnp.asarray, params)
  np.testing.assert_allclose(jax.jit(loss_fn)(jax_params), loss_fn(jax_params), rtol=1e-5)
  grads = jax.jit(jax.grad(loss_fn))(jax_params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["image_itc_kernel"]).sum()) > 0
  assert float(jnp.abs(grads["text_itc_kernel"]).sum()) > 0


def test_itc_computes_in_float32_from_bfloat16_inputs():
  ctx, batch = _context(5, 8, 0.4, {})
  low = dataclasses.replace(
      ctx, itc_sims=jax.tree.map(lambda x: x.astype(jnp.bfloat16), ctx.itc_sims),
      ema_image_feat=ctx.ema_image_feat.astype(jnp.bfloat16),
      ema_text_feat=ctx.ema_text_feat.astype(jnp.bfloat16))
  loss, _ = itc.itc_loss(low, fc.jnp_batch(batch))
  full, _ = itc.itc_loss(ctx, fc.jnp_batch(batch))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, full, rtol=0.05)


def test_itc_rejects_sims_that_do_not_match_the_queue():
  ctx, batch = _context(6, 8, 0.4, {})
  bad = dataclasses.replace(ctx, itc_sims={k: v[:, :-1] for k, v in ctx.itc_sims.items()})
  with pytest.raises(ValueError, match=r"itc_sims\['i2t'\]"):
    itc.itc_loss(bad, fc.jnp_batch(batch))


def test_id_positives_needs_image_id():
  ctx, batch = _context(7, 0, 0.4, {"id_positives": True})
  del batch["image_id"]
  with pytest.raises(KeyError, match="image_id"):
    itc.itc_loss(ctx, fc.jnp_batch(batch))


def test_registry_lists_and_gets_objectives():
  assert {"itc", "itm", "mlm", "mrm", "mim"} <= set(objectives.names())
  assert objectives.get("itc") is itc.itc_loss
  with pytest.raises(KeyError, match="unknown objective 'itcc'.*itc, itm"):
    objectives.get("itcc")


def test_registry_refuses_a_second_function_under_a_taken_name():
  with pytest.raises(ValueError, match="'itc' is registered twice"):
    registry.register("itc")(lambda ctx, batch: (0.0, {}))
  assert registry.get("itc") is itc.itc_loss
