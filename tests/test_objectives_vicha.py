"""ViCHA's objectives against slow NumPy references: hitc (values, labels with and without the rank
bug, the gradient of detached keys, 8 devices = 1 device) and mae (patchify, norm_pix, masked MSE,
and the objective on a real tiny model)."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlpjax import config_lib
from vlpjax.models import mae as mae_head, vlp
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import hitc, mae


def _unit(rng, *shape):
  x = rng.standard_normal(shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference_hitc(image, text, temp, weights, labels):
  """sum_l w_l mean_b 1/2 (CE(i2t_b, label_b) + CE(t2i_b, label_b)), loops, float64."""
  image, text = image.astype(np.float64), text.astype(np.float64)
  levels, batch = image.shape[:2]
  total = 0.0
  for l in range(levels):
    level = 0.0
    for b in range(batch):
      for query, keys in ((image[l, b], text[l]), (text[l, b], image[l])):
        logits = np.array([np.dot(query, keys[c]) / temp for c in range(batch)])
        log_z = logits.max() + np.log(np.sum(np.exp(logits - logits.max())))
        level += 0.5 * (log_z - logits[labels[b]])
    total += weights[l] * level / batch
  return total


def reference_query_gradient(image, text, temp, weights, labels):
  """d loss / d image with the text keys held constant (ViCHA's gradient-free gathered keys):
  only the i2t rows reach an image feature: 1/2 w_l / B * sum_c (softmax_c - onehot_c) text_c / temp."""
  image, text = image.astype(np.float64), text.astype(np.float64)
  levels, batch = image.shape[:2]
  grad = np.zeros_like(image)
  for l in range(levels):
    for b in range(batch):
      logits = text[l] @ image[l, b] / temp
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      probs[labels[b]] -= 1
      grad[l, b] = 0.5 * weights[l] / batch * (probs @ text[l]) / temp
  return grad


def _ctx(image, text, temp, cfg, num_groups=1):
  return types.SimpleNamespace(hitc_feats=(image, text), temp=jnp.float32(temp), num_groups=num_groups,
                               cfg=ml_collections.ConfigDict(cfg))


@pytest.mark.parametrize("parity,num_groups", [(False, 1), (False, 4), (True, 4), (True, 1)])
def test_hitc_matches_numpy(parity, num_groups):
  rng = np.random.default_rng(num_groups + 10 * parity)
  image, text = _unit(rng, 3, 8, 5), _unit(rng, 3, 8, 5)
  weights = (1.0, 0.5, 2.0)
  cfg = dict(level_weights=weights, rank_bug_parity=parity)
  loss, metrics = hitc.hitc_loss(_ctx(image, text, 0.07, cfg, num_groups), {})
  # Global offsets, or (parity) row g * b + i of shard g labelled with column i.
  labels = np.arange(8) % (8 // num_groups) if parity else np.arange(8)
  np.testing.assert_allclose(float(loss), reference_hitc(image, text, 0.07, weights, labels), rtol=1e-5)
  for l in range(3):
    np.testing.assert_allclose(float(metrics[f"level{l}_loss"]),
                               reference_hitc(image[l:l + 1], text[l:l + 1], 0.07, (1.0,), labels), rtol=1e-5)
  if parity and num_groups > 1:  # the released labels differ from the right ones on shards > 0
    assert abs(float(loss) - reference_hitc(image, text, 0.07, weights, np.arange(8))) > 1e-3


def test_hitc_keys_carry_no_gradient_unless_asked():
  rng = np.random.default_rng(3)
  image, text = _unit(rng, 2, 6, 4), _unit(rng, 2, 6, 4)
  weights = (1.0, 0.3)
  labels = np.arange(6)

  def loss(image, key_gradient):
    return hitc.hitc_loss(_ctx(image, text, 0.1, dict(level_weights=weights, key_gradient=key_gradient)), {})[0]

  grad = np.asarray(jax.grad(loss)(image, False))
  np.testing.assert_allclose(grad, reference_query_gradient(image, text, 0.1, weights, labels), rtol=1e-4,
                             atol=1e-6)
  full = np.asarray(jax.grad(loss)(image, True))  # the keys' share (t2i rows) is added
  assert np.max(np.abs(full - grad)) > 1e-3


def test_hitc_on_8_devices_equals_one_device():
  """The global batch split over 8 simulated devices: the same loss, and the same gradient, as on
  one device (global-offset labels); with the parity flag the loss is ViCHA's per-shard one."""
  devices = jax.devices()
  assert len(devices) >= 8
  rng = np.random.default_rng(7)
  image, text = _unit(rng, 2, 16, 6), _unit(rng, 2, 16, 6)
  mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
  sharded = NamedSharding(mesh, P(None, "data"))

  def run(image, text, parity):
    def loss(image):
      cfg = dict(level_weights=(1.0, 0.7), rank_bug_parity=parity)
      return hitc.hitc_loss(_ctx(image, text, 0.07, cfg, num_groups=8), {})[0]
    return jax.value_and_grad(loss)(image)

  for parity in (False, True):
    fn = jax.jit(lambda i, t, parity=parity: run(i, t, parity))
    image_8, text_8 = jax.device_put(image, sharded), jax.device_put(text, sharded)
    assert len(image_8.addressable_shards) == 8 and image_8.addressable_shards[0].data.shape == (2, 2, 6)
    on_8 = fn(image_8, text_8)
    on_1 = fn(jax.device_put(image, devices[0]), jax.device_put(text, devices[0]))
    np.testing.assert_allclose(float(on_8[0]), float(on_1[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(on_8[1]), np.asarray(on_1[1]), rtol=1e-5, atol=1e-7)
    labels = np.arange(16) % 2 if parity else np.arange(16)
    np.testing.assert_allclose(float(on_8[0]), reference_hitc(image, text, 0.07, (1.0, 0.7), labels), rtol=1e-5)


# ----------------------------------------------------------------------------- mae


def reference_patchify(images_nhwc, p):
  """ViCHA's patchify on the NCHW tensor: reshape (n, 3, h, p, w, p), 'nchpwq->nhwpqc'."""
  x = images_nhwc.transpose(0, 3, 1, 2)
  n, c, height, width = x.shape
  h, w = height // p, width // p
  x = x.reshape(n, c, h, p, w, p)
  return np.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def reference_norm_pix(patches):
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, ddof=1, keepdims=True)  # torch's .var is unbiased
  return (patches - mean) / np.sqrt(var + 1e-6)


def reference_masked_mse(pred, target, mask):
  total, count = 0.0, 0
  for b in range(pred.shape[0]):
    for n in range(pred.shape[1]):
      if mask[b, n]:
        total += np.mean((pred[b, n] - target[b, n]) ** 2)
        count += 1
  return total / count


def test_patchify_normalize_and_masked_mse_match_numpy():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 12, 12, 3)).astype(np.float32)
  patches = np.asarray(mae.patchify(jnp.asarray(images), 4))
  np.testing.assert_array_equal(patches, reference_patchify(images, 4))
  np.testing.assert_allclose(np.asarray(mae.normalize_patches(jnp.asarray(patches))),
                             reference_norm_pix(patches.astype(np.float64)), rtol=1e-5, atol=1e-6)
  pred = rng.standard_normal(patches.shape).astype(np.float32)
  mask = rng.random(patches.shape[:2]) < 0.6
  np.testing.assert_allclose(float(mae.masked_mse(jnp.asarray(pred), jnp.asarray(patches), jnp.asarray(mask))),
                             reference_masked_mse(pred, patches, mask), rtol=1e-5)
  assert float(mae.masked_mse(jnp.asarray(pred), jnp.asarray(patches), jnp.zeros(mask.shape, bool))) == 0.0


def test_mae_objective_on_the_tiny_model_matches_numpy():
  """The objective's wiring: the decoder's predictions of the masked patches (restore >= K)
  against the norm_pix targets of the CLIP-normalised image the model sees."""
  config = config_lib.load_config("configs/vicha.py:tiny")
  model = vlp.build_model(config.model)
  params = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                      *vlp.init_inputs(model.config))["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  rng = np.random.default_rng(1)
  n, size = model.config.vision.num_patches, model.config.vision.image_size
  images = rng.standard_normal((3, size, size, 3)).astype(np.float32)
  shuffle = np.argsort(rng.random((3, n)), axis=1).astype(np.int32)
  keep, restore = shuffle[:, :n // 4], np.argsort(shuffle, axis=1).astype(np.int32)
  batch = dict(image=images, mae_keep_idx=keep, mae_restore_idx=restore)
  ctx = context_lib.Context(model=model, params=params, ema_params=None, objective_state={}, batch=batch,
                            rng=jax.random.PRNGKey(2), step=0, alpha=0.0, num_groups=1,
                            cfg=ml_collections.ConfigDict(dict(norm_pix=True)), name="mae")
  loss, _ = mae.mae_loss(ctx, batch)
  pred = np.asarray(model.apply({"params": params}, images, keep, restore, method=mae_head.mae_predict),
                    np.float64)
  target = reference_norm_pix(reference_patchify(images.astype(np.float64), model.config.vision.patch_size))
  masked = np.zeros((3, n), bool)
  for b in range(3):
    masked[b, np.setdiff1d(np.arange(n), keep[b])] = True
  np.testing.assert_allclose(float(loss), reference_masked_mse(pred, target, masked), rtol=1e-5)
