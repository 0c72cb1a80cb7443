"""MAMO masked representation modelling: regress the teacher's fused states (docs/method_spec.md §3.2).

Also holds the target normalisation and per-position regression losses that `mim` reuses.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from vlpjax.objectives import registry

TARGET_NORMS = ("layernorm", "none")
LOSSES = ("mse", "smooth_l1", "cosine")
# Matches the ViT LayerNorm epsilon; the targets only need a scale-free, finite normalisation.
LAYER_NORM_EPS = 1e-6
# Keeps cosine finite (and its gradient defined) for an all-zero vector, as PyTorch's 1e-8.
COSINE_EPS = 1e-8


def layer_norm_no_affine(x: jax.Array) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last (feature) axis, in float32; no scale or bias."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)


def normalize_target(x: jax.Array, target_norm: str) -> jax.Array:
  """'layernorm': layer_norm_no_affine(x); 'none': x; both float32."""
  if target_norm == "layernorm":
    return layer_norm_no_affine(x)
  return x.astype(jnp.float32)


def top_k_layer_average(layer_states: Sequence[jax.Array], top_k: int,
                        target_norm: str) -> jax.Array:
  """Mean of the last `top_k` layers, each normalised first (data2vec-style targets).

  Args:
    layer_states: per-layer [B, T, D] states, last layer last.
    top_k: how many of the last layers to average, 1 <= top_k <= len(layer_states).
    target_norm: 'layernorm' or 'none', applied to each layer before averaging.

  Returns:
    f32 [B, T, D] = (1 / top_k) * sum_{k > K - top_k} norm(layer_states[k]).
  """
  if not 1 <= top_k <= len(layer_states):
    raise ValueError(f"objective 'mrm': config field 'top_k' is {top_k}; the teacher has "
                     f"{len(layer_states)} fusion layers")
  chosen = layer_states[len(layer_states) - top_k:]
  return sum(normalize_target(states, target_norm) for states in chosen) / top_k


def regression_loss(predictions: jax.Array, targets: jax.Array, kind: str,
                    beta: float = 1.0) -> jax.Array:
  """Per-position regression loss over the feature axis: [..., D], [..., D] -> [...], float32.

  kind 'mse':       mean_d (p_d - t_d)^2
  kind 'smooth_l1': mean_d h(p_d - t_d), h(e) = e^2 / (2 beta) if |e| < beta else |e| - beta/2
                    (PyTorch's SmoothL1Loss; beta = 0 is the L1 loss)
  kind 'cosine':    1 - <p, t> / (max(|p|, eps) max(|t|, eps))
  Averaging these over masked positions reproduces PyTorch's elementwise 'mean' reduction.
  """
  predictions = predictions.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean(jnp.square(predictions - targets), axis=-1)
  if kind == "smooth_l1":
    if beta < 0:
      raise ValueError(f"smooth_l1 needs config field 'beta' >= 0; got {beta}")
    error = jnp.abs(predictions - targets)
    if beta == 0:
      return jnp.mean(error, axis=-1)
    return jnp.mean(jnp.where(error < beta, 0.5 * jnp.square(error) / beta, error - 0.5 * beta),
                    axis=-1)
  if kind == "cosine":

    def unit(v):
      return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(v), -1, keepdims=True),
                                           COSINE_EPS**2))

    return 1.0 - jnp.sum(unit(predictions) * unit(targets), axis=-1)
  raise ValueError(f"unknown regression loss {kind!r}; expected one of {LOSSES}")


def masked_sum_and_count(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of values where mask, number of True entries), both f32 scalars.

  `where` rather than multiplication, so a non-finite value at an unmasked position cannot leak.
  """
  return jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(mask).astype(jnp.float32)


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, and 0 when count is 0 (nothing masked)."""
  return total / jnp.maximum(count, 1.0)


@registry.register("mrm", heads=("mrm",), needs_teacher=True)
def mrm_loss(ctx, batch):
  """Masked representation modelling: predict the teacher's clean fused states at masked positions.

  Inputs (B batch, L text length, N image tokens incl. CLS, D fusion width):
    ctx.masked_fusion['text_states'] [B, L, D], ctx.masked_fusion['image_states'] [B, N, D] or None: student
      fused states on the masked pair; ctx.student.mrm_predict: [B, T, D] -> [B, T, D];
    ctx.ema_clean_fusion['layer_text_states'] / ['layer_image_states']: per-layer [B, L, D] /
      [B, N, D] teacher fused states on the clean pair;
    batch['mlm_labels'] int [B, L] (>= 0 at masked text tokens);
    batch['patch_mask'] bool [B, N-1] (optional; True = masked patch; image token n+1 is patch n).
  The image part is used when the batch has `patch_mask` and the fusion returns image states
  (`merged`); otherwise (e.g. `cross` fusion) the loss covers the masked text tokens only.
  Config: `top_k` (3), `target_norm` ('layernorm' | 'none'), `loss` ('mse' | 'smooth_l1' |
  'cosine'), `beta` (1.0, smooth_l1 only).

  Formula, with H = student states [text ; image patches], P = mrm_predict,
  T = sg(top_k_layer_average(teacher layers)) and M = masked text tokens U masked patches:
    loss = (1 / |M|) sum_{m in M} regression_loss(P(H)_m, T_m)
  (0 when M is empty). The text and image parts are also averaged separately for the metrics.

  Returns:
    (loss, {'loss', 'text_loss', 'image_loss'}); image_loss is 0 without an image part.
  """
  cfg = ctx.cfg
  registry.require_batch_keys(batch, ["mlm_labels"], "mrm")
  top_k = cfg.get("top_k", 3)
  target_norm = registry.choice(cfg, "target_norm", "layernorm", TARGET_NORMS, "mrm")
  kind = registry.choice(cfg, "loss", "mse", LOSSES, "mrm")
  beta = cfg.get("beta", 1.0)

  text_states = ctx.masked_fusion["text_states"]
  text_positions = batch["mlm_labels"] >= 0
  if text_positions.shape != text_states.shape[:2]:
    raise ValueError(f"objective 'mrm': batch['mlm_labels'] has shape {text_positions.shape} "
                     f"but ctx.masked_fusion['text_states'] has [B, L] = {text_states.shape[:2]}")
  image_states = ctx.masked_fusion.get("image_states")
  use_image = image_states is not None and "patch_mask" in batch
  text_length = text_states.shape[1]

  text_target = top_k_layer_average(ctx.ema_clean_fusion["layer_text_states"], top_k, target_norm)
  if use_image:
    patch_mask = batch["patch_mask"]
    if patch_mask.shape != (image_states.shape[0], image_states.shape[1] - 1):
      raise ValueError(f"objective 'mrm': batch['patch_mask'] has shape {patch_mask.shape}; "
                       f"expected [B, N-1] = {(image_states.shape[0], image_states.shape[1] - 1)}")
    image_target = top_k_layer_average(ctx.ema_clean_fusion["layer_image_states"], top_k,
                                       target_norm)[:, 1:]
    student_states = jnp.concatenate([text_states, image_states[:, 1:]], axis=1)
    targets = jnp.concatenate([text_target, image_target], axis=1)
  else:
    student_states, targets = text_states, text_target

  predictions = ctx.student.mrm_predict(student_states)
  per_position = regression_loss(predictions, jax.lax.stop_gradient(targets), kind, beta)
  text_sum, text_count = masked_sum_and_count(per_position[:, :text_length], text_positions)
  if use_image:
    image_sum, image_count = masked_sum_and_count(per_position[:, text_length:],
                                                  patch_mask.astype(bool))
  else:
    image_sum = image_count = jnp.zeros([], jnp.float32)

  loss = safe_divide(text_sum + image_sum, text_count + image_count)
  metrics = {
      "loss": loss,
      "text_loss": safe_divide(text_sum, text_count),
      "image_loss": safe_divide(image_sum, image_count),
  }
  return loss, metrics
