"""Masked autoencoding of image pixels (ViCHA's uni-modal MAE, docs/method_spec.md §2.2, App. A.2 step 6).

The online ViT encodes only the visible patches (`batch['mae_keep_idx']`, drawn per example by
the input op `shuffle_keep_patches(ratio, grid, prefix='mae')`), without visual-concept tokens;
the `mae` head's decoder predicts every patch's pixels; the loss is the mean squared error over
the masked patches of the per-patch normalised pixels of the image the model sees.

Target. ViCHA patchifies the very tensor its ViT receives, i.e. the augmented image after CLIP's
per-channel normalisation (not the raw pixels), and normalises each patch with its mean and its
*unbiased* variance (torch `.var`, divisor p*p*3 - 1), eps 1e-6 (`norm_pix_loss`). The same here.
Patch vectors are ordered (pixel row, pixel column, channel), as ViCHA's `patchify`.
"""
import jax
import jax.numpy as jnp

from vlpjax.models import mae as mae_head
from vlpjax.objectives import registry

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H//p)*(W//p), p*p*C], patches row-major, each (row, col, channel);
  border pixels beyond whole patches are dropped (as the ViT's strided convolution does)."""
  batch, height, width, channels = images.shape
  rows, cols = height // patch_size, width // patch_size
  x = images[:, :rows * patch_size, :cols * patch_size]
  x = x.reshape(batch, rows, patch_size, cols, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def normalize_patches(patches: jax.Array, eps: float = NORM_PIX_EPS) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis, var with divisor n - 1 (torch `.var`)."""
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.sum((patches - mean) ** 2, axis=-1, keepdims=True) / (patches.shape[-1] - 1)
  return (patches - mean) / jnp.sqrt(var + eps)


def masked_mse(predictions: jax.Array, targets: jax.Array, masked: jax.Array) -> jax.Array:
  """sum_{b,n} masked[b,n] * mean_d (pred - target)^2 / sum masked (0 when nothing is masked)."""
  per_patch = jnp.mean((predictions.astype(jnp.float32) - targets) ** 2, axis=-1)
  weights = masked.astype(jnp.float32)
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@registry.register("mae", heads=("mae",))
def mae_loss(ctx, batch):
  """MSE of the decoder's pixel predictions on the masked patches.

  Inputs (B batch, N patches, K visible): batch['image'] [B, H, W, 3] (as the model sees it),
  batch['mae_keep_idx'] int [B, K] (visible patches, shuffle order), batch['mae_restore_idx']
  int [B, N] (unshuffles [visible ; masked]); ctx.student (the `mae` head).
  Config: `norm_pix` (default True).

  Formula: P = mae_predict(image, keep, restore) [B, N, p*p*3]; T = normalize_patches(
  patchify(image)) (or patchify(image) without norm_pix); masked = restore >= K (the patches
  after the K visible ones in shuffle order); loss = masked_mse(P, T, masked).

  Returns:
    (loss, {'loss'}).
  """
  registry.require_batch_keys(batch, ["image", "mae_keep_idx", "mae_restore_idx"], "mae")
  images, keep, restore = batch["image"], batch["mae_keep_idx"], batch["mae_restore_idx"]
  vision = ctx.model_config.vision
  if restore.shape[1] != vision.num_patches or keep.shape[1] >= restore.shape[1]:
    raise ValueError(f"objective 'mae': batch['mae_restore_idx'] has {restore.shape[1]} patches and "
                     f"batch['mae_keep_idx'] {keep.shape[1]} visible; the model has {vision.num_patches} "
                     "patches (check the grid of shuffle_keep_patches in config.input.pp)")
  predictions = ctx.student.apply(mae_head.mae_predict, images, keep, restore)
  targets = patchify(images.astype(jnp.float32), vision.patch_size)
  if ctx.cfg.get("norm_pix", True):
    targets = normalize_patches(targets)
  loss = masked_mse(predictions, jax.lax.stop_gradient(targets), restore >= keep.shape[1])
  return loss, {"loss": loss}
