"""Visual-semantic contrastive loss (MVP's coarse-grained alignment, docs/method_spec.md §5.3).

CLIP-style symmetric InfoNCE between the global text and image embeddings of the uni-modal
encoders, over the global batch (a jitted global array: XLA gathers the features across
devices), with logits = cosine * exp(logit_scale); no queue, no teacher, no temperature clamp.
"""
import jax
import jax.numpy as jnp

from vlpjax.models import mvp
from vlpjax.objectives import context
from vlpjax.objectives import corrupted  # noqa: F401  (registers the corrupted_* features)
from vlpjax.objectives import registry


def contrastive_logits(text_feat: jax.Array, image_feat: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """t2i logits [B, B] = exp(s) * text_feat @ image_feat.T (rows: texts), float32."""
  scale = jnp.exp(logit_scale.astype(jnp.float32))
  return scale * (text_feat.astype(jnp.float32) @ image_feat.astype(jnp.float32).T)


def positive_targets(batch_size: int, image_ids: jax.Array | None = None) -> jax.Array:
  """[B, B] targets, rows summing to 1: the diagonal, or (with `image_ids`) every column of the
  same image id, uniformly (a second caption of the same image is not a negative)."""
  diagonal = jnp.eye(batch_size, dtype=jnp.float32)
  if image_ids is None:
    return diagonal
  same = (image_ids[:, None] == image_ids[None, :]).astype(jnp.float32)
  same = jnp.maximum(same, diagonal)
  return same / same.sum(axis=1, keepdims=True)


def symmetric_infonce(t2i_logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
  """Loss = 1/2 (mean_b CE(targets[b], t2i[b]) + mean_b CE(targets.T[b], t2i.T[b])).

  Args:
    t2i_logits: [B, B] text-to-image logits (row b: text b against every image).
    targets: [B, B] target distribution of each text row; the image rows use its transpose
      (symmetric for the diagonal and for image-id positives).

  Returns:
    (loss, {'t2i_accuracy', 'i2t_accuracy'}): accuracy = the argmax is a positive.
  """
  t2i = t2i_logits.astype(jnp.float32)
  i2t = t2i.T
  t2i_ce = -jnp.sum(targets * jax.nn.log_softmax(t2i, axis=-1), axis=-1)
  i2t_ce = -jnp.sum(targets.T * jax.nn.log_softmax(i2t, axis=-1), axis=-1)
  loss = 0.5 * (jnp.mean(t2i_ce) + jnp.mean(i2t_ce))

  def accuracy(logits, positives):
    best = jnp.argmax(logits, axis=-1)
    return jnp.mean(jnp.take_along_axis(positives, best[:, None], axis=1)[:, 0] > 0)

  return loss, {"t2i_accuracy": accuracy(t2i, targets), "i2t_accuracy": accuracy(i2t, targets.T)}


@context.feature("vsc_sims")
def vsc_sims(ctx):
  """The VSC logits of the step's uni-modal pass (`corrupted_text`, `corrupted_image` CLS):
  dict(t2i [B,B], i2t [B,B] (= t2i.T), text_feat, image_feat [B,E], logit_scale (raw s)).

  Also the similarity feature ITM's hardest negatives are mined from (`itm.sims='vsc_sims'`).
  """
  text_feat = ctx.student.apply(mvp.vsc_project_text, ctx.corrupted_text["states"][:, 0])
  image_feat = ctx.student.apply(mvp.vsc_project_image, ctx.corrupted_image["states"][:, 0])
  logit_scale = ctx.student.apply(mvp.vsc_logit_scale)
  t2i = contrastive_logits(text_feat, image_feat, logit_scale)
  return dict(t2i=t2i, i2t=t2i.T, text_feat=text_feat, image_feat=image_feat, logit_scale=logit_scale)


@registry.register("vsc", heads=("vsc",))
def vsc_loss(ctx, batch):
  """MVP's VSC: symmetric in-batch InfoNCE over the global batch.

  Inputs: ctx.vsc_sims (t2i [B, B] = exp(s) * g_t @ g_v.T with g_t, g_v the L2-normalised
  projections of the text / visual encoder CLS states of the step's pass); batch['image_id']
  [B] only with `id_positives`.
  Config: `id_positives` (default False, MVPTR: the diagonal is the only positive; True: every
  pair of the same image id, as ALBEF's retrieval fine-tuning).

  Formula: `symmetric_infonce(t2i, positive_targets(B, ids))`, float32.

  Returns:
    (loss, {'loss', 't2i_accuracy', 'i2t_accuracy', 'logit_scale' (= exp(s))}).
  """
  sims = ctx.vsc_sims
  image_ids = None
  if ctx.cfg.get("id_positives", False):
    registry.require_batch_keys(batch, ["image_id"], "vsc")
    image_ids = batch["image_id"]
  t2i = sims["t2i"]
  loss, metrics = symmetric_infonce(t2i, positive_targets(t2i.shape[0], image_ids))
  return loss, {"loss": loss, **metrics, "logit_scale": jnp.exp(sims["logit_scale"].astype(jnp.float32))}
