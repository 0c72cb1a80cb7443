"""MAMO masked image modelling: predict the teacher's clean patch features (docs/method_spec.md §3.2)."""
import jax

from vlpjax.objectives import registry
from vlpjax.objectives.mrm import (TARGET_NORMS, masked_sum_and_count, normalize_target,
                                   regression_loss, safe_divide)

LOSSES = ("cosine", "mse")


@registry.register("mim", heads=("mim",), needs_teacher=True)
def mim_loss(ctx, batch):
  """Regression of the masked patches onto the teacher image encoder's clean patch features.

  Inputs (B batch, N image tokens incl. CLS, D fusion width, Dv vision width):
    ctx.masked_fusion['image_states'] [B, N, D]: student fused states on the masked pair (needs the
      `merged` fusion; `cross` returns None);
    ctx.student.mim_predict: [B, N-1, D] -> [B, N-1, Dv];
    ctx.ema_image['states'] [B, N, Dv]: teacher image encoding of the clean image;
    batch['patch_mask'] bool [B, N-1], True = masked patch (image token n+1 is patch n).
  Config: `loss` ('cosine' default | 'mse'), `target_norm` ('none' default | 'layernorm').

  Formula, with P = mim_predict(image_states[:, 1:]), V' = sg(norm(ema image states[:, 1:])) and
  M the masked patches:
    loss = (1 / |M|) sum_{(b, n) in M} regression_loss(P[b, n], V'[b, n])
  where regression_loss is 1 - cos (cosine) or the feature mean of squared errors (mse);
  0 when nothing is masked.

  Returns:
    (loss, {'loss'}).
  """
  cfg = ctx.cfg
  registry.require_batch_keys(batch, ["patch_mask"], "mim")
  kind = registry.choice(cfg, "loss", "cosine", LOSSES, "mim")
  target_norm = registry.choice(cfg, "target_norm", "none", TARGET_NORMS, "mim")
  image_states = ctx.masked_fusion.get("image_states")
  if image_states is None:
    raise ValueError("objective 'mim' needs fused image states (ctx.masked_fusion['image_states']); "
                     "use the 'merged' fusion (the 'cross' fusion outputs text states only)")
  patch_mask = batch["patch_mask"]
  predictions = ctx.student.mim_predict(image_states[:, 1:])
  targets = jax.lax.stop_gradient(normalize_target(ctx.ema_image["states"][:, 1:], target_norm))
  if patch_mask.shape != predictions.shape[:2] or predictions.shape != targets.shape:
    raise ValueError(
        f"objective 'mim': batch['patch_mask'] {patch_mask.shape}, predictions "
        f"{predictions.shape} and teacher patches {targets.shape} must agree on [B, N-1(, Dv)]")
  per_patch = regression_loss(predictions, targets, kind)
  total, count = masked_sum_and_count(per_patch, patch_mask.astype(bool))
  loss = safe_divide(total, count)
  return loss, {"loss": loss}
