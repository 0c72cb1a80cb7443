"""Masked language modelling with momentum distillation (ALBEF, docs/method_spec.md §1.2)."""
import jax
import jax.numpy as jnp

from vlpjax.objectives import registry


@registry.register("mlm", heads=("mlm",), needs_teacher=lambda cfg: cfg.get("distill", True))
def mlm_loss(ctx, batch):
  """Cross-entropy on the masked text tokens, mixed with the teacher's soft predictions.

  Inputs (B batch, L text length, D width, V vocabulary):
    ctx.masked_fusion['text_states']: [B, L, D] student fused states on the corrupted ids (the
      context feature `cfg.fusion` names; MVP reads `corrupted_fusion`, its one cross-modal pass);
    ctx.student.mlm_logits: [B, L, D] -> [B, L, V];
    ctx.ema_masked_fusion['text_states']: [B, L, D] teacher fused states on the same corrupted ids and
      ctx.teacher.mlm_logits (read only with distillation on);
    ctx.alpha: scalar; batch['mlm_labels']: int [B, L], the original id at masked positions and
      -1 elsewhere.
  Config: `distill` (default True); `fusion` (default 'masked_fusion'), the context feature of
  the fused states.

  Formula, with M = {(b, l): label[b, l] >= 0}, p = log_softmax(student logits) and
  q = softmax(teacher logits):
    hard = mean_M -p[b, l, label[b, l]]
    soft = mean_M -sum_v q[b, l, v] p[b, l, v]
    loss = (1 - alpha) hard + alpha soft   (loss = hard without distillation).
  Means over an empty M are 0, so a batch without masked tokens gives loss 0, not NaN.

  Returns:
    (loss, {'loss', 'accuracy'}), accuracy = fraction of masked tokens whose argmax is the label.
  """
  registry.require_batch_keys(batch, ["mlm_labels"], "mlm")
  labels = batch["mlm_labels"]
  states = getattr(ctx, ctx.cfg.get("fusion", "masked_fusion"))["text_states"]
  if states.shape[:2] != labels.shape:
    raise ValueError(f"objective 'mlm': batch['mlm_labels'] has shape {labels.shape} but "
                     f"the fused text states have [B, L] = {states.shape[:2]}")
  log_probs = jax.nn.log_softmax(ctx.student.mlm_logits(states).astype(jnp.float32), axis=-1)
  masked = labels >= 0
  num_masked = jnp.maximum(jnp.sum(masked), 1).astype(jnp.float32)

  label_log_probs = jnp.take_along_axis(log_probs, jnp.where(masked, labels, 0)[..., None],
                                        axis=-1)[..., 0]
  loss = -jnp.sum(jnp.where(masked, label_log_probs, 0.0)) / num_masked
  if ctx.cfg.get("distill", True):
    teacher_logits = ctx.teacher.mlm_logits(ctx.ema_masked_fusion["text_states"])
    teacher_probs = jax.nn.softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    soft_ce = -jnp.sum(teacher_probs * log_probs, axis=-1)
    soft_loss = jnp.sum(jnp.where(masked, soft_ce, 0.0)) / num_masked
    alpha = jnp.asarray(ctx.alpha, jnp.float32)
    loss = (1 - alpha) * loss + alpha * soft_loss

  correct = masked & (jnp.argmax(log_probs, axis=-1) == labels)
  accuracy = jnp.sum(correct) / num_masked
  return loss, {"loss": loss, "accuracy": accuracy}
