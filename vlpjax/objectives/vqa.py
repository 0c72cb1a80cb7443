"""VQA objectives: ALBEF's weighted answer likelihood (`vqa`) and VinVL's soft-score BCE (`vqa_cls`).

Both read the question fused with the image from the student's cached towers (`ctx.image`,
`ctx.text`, then `ctx.student.fuse`) and the task model's methods through `ctx.student.apply`
(`vlpjax/models/vqa.py`).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from vlpjax.objectives import registry


def answer_nll(logits: jax.Array, answer_ids: jax.Array, answer_mask: jax.Array,
               teacher_logits: Optional[jax.Array] = None, alpha=0.0) -> jax.Array:
  """Per-row sequence NLL of the answer tokens after `[CLS]` (teacher forcing), in float32.

  Args:
    logits: [N, La, V]; logits[n, t] predict token t + 1 of row n.
    answer_ids: int [N, La], `[CLS] answer tokens [SEP]` then padding.
    answer_mask: {0,1} [N, La]; targets are the positions t >= 1 with answer_mask[n, t] = 1.
    teacher_logits: optional [N, La, V] (momentum distillation targets), same alignment.
    alpha: distillation weight (scalar).

  Formula, with p = log_softmax(logits[n, t - 1]), q = softmax(teacher_logits[n, t - 1]) and
  T_n = {t >= 1 : answer_mask[n, t] = 1}:
    hard_n = -sum_{t in T_n} p[answer_ids[n, t]]
    soft_n = -sum_{t in T_n} sum_v q[v] p[v]
    nll_n = (1 - alpha) hard_n + alpha soft_n   (hard_n without a teacher).
  A row without targets (padding) gives 0.

  Returns:
    float32 [N].
  """
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [N, La-1, V]
  targets = answer_ids[:, 1:]
  target_mask = answer_mask[:, 1:].astype(bool)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  nll = -jnp.sum(jnp.where(target_mask, target_log_probs, 0.0), axis=1)
  if teacher_logits is None:
    return nll
  teacher_probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits[:, :-1]).astype(jnp.float32), axis=-1)
  soft_ce = -jnp.sum(teacher_probs * log_probs, axis=-1)  # [N, La-1]
  soft = jnp.sum(jnp.where(target_mask, soft_ce, 0.0), axis=1)
  alpha = jnp.asarray(alpha, jnp.float32)
  return (1 - alpha) * nll + alpha * soft


def _check_answers(batch, name: str):
  registry.require_batch_keys(batch, ["text_mask", "answer_ids", "answer_mask", "answer_weight"], name)
  ids, mask, weight = batch["answer_ids"], batch["answer_mask"], batch["answer_weight"]
  if ids.ndim != 3 or mask.shape != ids.shape or weight.shape != ids.shape[:2]:
    raise ValueError(f"objective {name!r}: expected batch['answer_ids'] / ['answer_mask'] [B, A, La] and "
                     f"batch['answer_weight'] [B, A]; got {ids.shape}, {mask.shape}, {weight.shape}")
  if ids.shape[0] != batch["text_mask"].shape[0]:
    raise ValueError(f"objective {name!r}: batch['answer_ids'] has {ids.shape[0]} rows but "
                     f"batch['text_mask'] has {batch['text_mask'].shape[0]}")


@registry.register("vqa", needs_teacher=lambda cfg: cfg.get("distill", True))
def vqa_loss(ctx, batch):
  """ALBEF's VQA loss: answer-weighted sequence NLL of the answer decoder, with momentum distillation.

  Inputs (B questions, A answer slots, La answer length, Lq question length):
    ctx.image['states'], ctx.text['states'] (the question, `text_ids`), ctx.student.fuse ->
      question states [B, Lq, D]; the teacher's from ctx.ema_image / ctx.ema_text / ctx.teacher;
    ctx.student.apply('answer_logits', ids [B*A, La], mask, q_states [B*A, Lq, D], q_mask) ->
      [B*A, La, V]; the question of answer row (b, a) is b;
    batch['answer_ids'], batch['answer_mask'] int [B, A, La]; batch['answer_weight'] f32 [B, A]
      (ALBEF: the fraction of annotators who gave the answer; 0 on empty slots);
    ctx.alpha: the distillation weight.
  Config: `distill` (default True). ALBEF's model_vqa.py builds the teacher targets but never
  passes alpha to its decoder (whose default is 0), so its released runs train without them;
  `distill=False` reproduces that.

  Formula: loss = sum_{b,a} answer_weight[b, a] * nll_{b,a} / B, nll from `answer_nll` with the
  teacher's logits (alpha = ctx.alpha) when distilling.

  Returns:
    (loss, {'loss', 'nll', 'token_accuracy'}): nll = the same weighted sum without distillation;
    token_accuracy = argmax hits over the target tokens of rows with a positive weight.
  """
  _check_answers(batch, "vqa")
  text_mask = batch["text_mask"]
  answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]
  batch_size, num_slots, answer_len = answer_ids.shape
  row_ids = answer_ids.reshape(batch_size * num_slots, answer_len)
  row_mask = answer_mask.reshape(batch_size * num_slots, answer_len)
  row_question = jnp.repeat(jnp.arange(batch_size), num_slots)  # [B*A]
  row_q_mask = text_mask[row_question]

  q_states = ctx.student.fuse(ctx.text["states"], text_mask, ctx.image["states"], ctx.image.get("mask"))["text_states"]
  logits = ctx.student.apply("answer_logits", row_ids, row_mask, q_states[row_question], row_q_mask,
                             deterministic=ctx.student.deterministic)
  teacher_logits = None
  distill = bool(ctx.cfg.get("distill", True))
  if distill:
    teacher_states = ctx.teacher.fuse(ctx.ema_text["states"], text_mask, ctx.ema_image["states"],
                                      ctx.ema_image.get("mask"))["text_states"]
    teacher_logits = ctx.teacher.apply("answer_logits", row_ids, row_mask, teacher_states[row_question],
                                       row_q_mask, deterministic=True)
  weight = batch["answer_weight"].astype(jnp.float32).reshape(-1)
  hard = answer_nll(logits, row_ids, row_mask)
  row_loss = answer_nll(logits, row_ids, row_mask, teacher_logits, ctx.alpha) if distill else hard
  loss = jnp.sum(weight * row_loss) / batch_size
  nll = jnp.sum(weight * hard) / batch_size

  counted = row_mask[:, 1:].astype(bool) & (weight > 0)[:, None]
  hits = counted & (jnp.argmax(logits[:, :-1], axis=-1) == row_ids[:, 1:])
  token_accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(counted), 1)
  return loss, {"loss": loss, "nll": nll, "token_accuracy": token_accuracy}


def soft_score_bce(logits: jax.Array, scores: jax.Array) -> jax.Array:
  """VinVL's `instance_bce_with_logits`: sum over answers of the binary CE, mean over questions.

  Args:
    logits: [B, C]; scores: [B, C] soft targets in [0, 1].

  Formula: loss = (1 / B) sum_{b,c} -(y log sigmoid(x) + (1 - y) log sigmoid(-x)), computed
  stably as max(x, 0) - x y + log(1 + exp(-|x|)), in float32.
  """
  x = logits.astype(jnp.float32)
  y = scores.astype(jnp.float32)
  per_answer = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.sum(per_answer) / x.shape[0]


@registry.register("vqa_cls")
def vqa_cls_loss(ctx, batch):
  """VQA as multi-label classification over a fixed answer vocabulary (VinVL / MVP).

  Inputs: ctx.image['states'], ctx.text['states'], ctx.student.fuse -> the fused question [CLS]
  [B, D]; ctx.student.apply('vqa_logits', cls) -> [B, C]; batch['answer_scores'] f32 [B, C],
  the VQA soft score min(1, count / 3) of each answer of the vocabulary (0 for the others).

  Formula: loss = `soft_score_bce(logits, answer_scores)`.

  Returns:
    (loss, {'loss', 'score'}), score = mean_b answer_scores[b, argmax_c logits[b, c]] (the
    training-time VQA score).
  """
  registry.require_batch_keys(batch, ["text_mask", "answer_scores"], "vqa_cls")
  scores = batch["answer_scores"]
  fused = ctx.student.fuse(ctx.text["states"], batch["text_mask"], ctx.image["states"],
                           ctx.image.get("mask"))["text_states"]
  logits = ctx.student.apply("vqa_logits", fused[:, 0])
  if scores.shape != logits.shape:
    raise ValueError(f"objective 'vqa_cls': batch['answer_scores'] has shape {scores.shape} but the "
                     f"head gives [B, num_answers] = {logits.shape}; check config.model.num_answers")
  loss = soft_score_bce(logits, scores)
  best = jnp.argmax(logits, axis=-1)
  score = jnp.mean(jnp.take_along_axis(scores.astype(jnp.float32), best[:, None], axis=1))
  return loss, {"loss": loss, "score": score}
