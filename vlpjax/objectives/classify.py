"""Classification fine-tuning objectives: SNLI-VE / NLVR2 with momentum distillation (`cls`) and
NLVR2's text-assignment pre-step (`nlvr_ta`). docs/method_spec.md §1.4, Appendix G.

The models are `vlpjax/models/classify.py`'s `VEModel` (method `cls_logits`) and `NLVRModel`
(methods `nlvr_logits`, `fuse_pair`, `ta_classify`), called through `ctx.student.apply` /
`ctx.teacher.apply`.
"""
import jax
import jax.numpy as jnp

from vlpjax.models import concepts
from vlpjax.objectives import registry

HEADS = ("auto", "ve", "nlvr")
PARTNER_FEATURES = ("ema", "student")
# ALBEF's `model_pretrain_nlvr.py` divides the image-image similarities by a fixed 0.07.
TA_TEMPERATURE = 0.07
TA_NUM_CLASSES = 3


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  """-sum_c target_probs[b, c] * log_softmax(logits)[b, c] -> [B] (float32)."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def hard_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log_softmax(logits)[b, labels[b]] -> [B] (float32)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def distilled_cross_entropy(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array | None,
                            alpha: jax.Array) -> tuple[jax.Array, dict]:
  """ALBEF's classification loss with momentum distillation (Appendix G).

  L = (1 - alpha) * mean_b CE(logits_b, labels_b)
      + alpha * mean_b [-sum_c softmax(teacher_logits_b)_c * log_softmax(logits_b)_c]
  With `teacher_logits=None` the loss is the plain mean CE (alpha ignored).

  Args:
    logits: [B, C] student logits; labels: int [B]; teacher_logits: [B, C] (no gradient) or None;
    alpha: scalar distillation weight.

  Returns:
    (loss f32[], {'ce', 'distill' (only with a teacher), 'accuracy'}).
  """
  ce = jnp.mean(hard_cross_entropy(logits, labels))
  metrics = {"ce": ce, "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}
  if teacher_logits is None:
    return ce, metrics
  teacher_probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  distill = jnp.mean(soft_cross_entropy(logits, teacher_probs))
  metrics["distill"] = distill
  return (1.0 - alpha) * ce + alpha * distill, metrics


def _head(ctx, batch) -> str:
  head = registry.choice(ctx.cfg, "head", "auto", HEADS, "cls")
  if head != "auto":
    return head
  if "image0" in batch and "image1" in batch:
    return "nlvr"
  if "image" in batch:
    return "ve"
  raise KeyError(f"objective 'cls' needs batch keys image0/image1 (NLVR2) or image (SNLI-VE); "
                 f"the batch has {sorted(batch)}")


def _logits(model_fns, head: str, batch) -> jax.Array:
  # With the batch's concept strings (ViCHA's image-side tokens), when it has them.
  kwargs = dict(deterministic=model_fns.deterministic, **concepts.batch_concepts(batch, pair=head == "nlvr"))
  if head == "nlvr":
    return model_fns.apply("nlvr_logits", batch["image0"], batch["image1"], batch["text_ids"],
                           batch["text_mask"], **kwargs)
  return model_fns.apply("cls_logits", batch["image"], batch["text_ids"], batch["text_mask"], **kwargs)


@registry.register("cls", needs_teacher=lambda cfg: cfg.get("distill", True))
def cls_loss(ctx, batch):
  """Classification CE with momentum distillation for the SNLI-VE (`ve`) and NLVR2 (`nlvr`) models.

  Inputs: batch['text_ids'], batch['text_mask'] [B, L], batch['label'] int [B], and
  batch['image'] [B,H,W,3] (ve) or batch['image0'], batch['image1'] (nlvr);
  ctx.student / ctx.teacher `cls_logits` (ve) or `nlvr_logits` (nlvr); ctx.alpha.
  Config: `head` 'auto' (default: nlvr when the batch has image0/image1, else ve) | 've' | 'nlvr';
  `distill` (default True): with False the teacher is not run and the loss is the plain CE.

  Formula (`distilled_cross_entropy`): L = (1-α)·CE(z, y) + α·CE(z, softmax(z')), z the student
  and z' the EMA teacher logits [B, C], means over the batch.

  Returns:
    (loss, {'loss', 'ce', 'distill' (with distill), 'accuracy'}).
  """
  head = _head(ctx, batch)
  image_keys = ["image0", "image1"] if head == "nlvr" else ["image"]
  registry.require_batch_keys(batch, image_keys + ["text_ids", "text_mask", "label"], "cls")
  logits = _logits(ctx.student, head, batch)
  teacher_logits = _logits(ctx.teacher, head, batch) if ctx.cfg.get("distill", True) else None
  loss, metrics = distilled_cross_entropy(logits, batch["label"], teacher_logits, ctx.alpha)
  return loss, {"loss": loss, **metrics}


# ----------------------------------------------------------------------------- NLVR2 text assignment


def sample_partners(key: jax.Array, sims: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two distinct partner images per row, drawn without replacement, never the row itself.

  first[b] ~ softmax_j(sims[b, j]) over j != b; second[b] ~ the same softmax renormalised over
  j not in {b, first[b]} (torch.multinomial(softmax with a zeroed diagonal, 2), as ALBEF draws
  the two images of a label-2 example). Gumbel top-2 in float32.

  Args:
    key: PRNG key; sims: [B, B] similarity logits, B >= 3.

  Returns:
    (first, second), int32 [B] each.
  """
  batch_size = sims.shape[0]
  if sims.shape != (batch_size, batch_size) or batch_size < 3:
    raise ValueError(f"nlvr_ta: partner sampling needs square sims [B, B] with B >= 3 (two other images per "
                     f"caption); got {sims.shape}")
  logits = jnp.where(jnp.eye(batch_size, dtype=bool), -jnp.inf, sims.astype(jnp.float32))
  perturbed = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
  top2 = jax.lax.top_k(perturbed, 2)[1].astype(jnp.int32)
  return top2[:, 0], top2[:, 1]


def text_assignment_slots(labels: jax.Array, first: jax.Array,
                          second: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The images of the two slots of each caption, given its label and its partner draws.

  label 0: (own, first); label 1: (first, own); label 2: (first, second); own = the row index.

  Args:
    labels: int [B] in {0, 1, 2}; first, second: int [B] from `sample_partners`.

  Returns:
    (slot0, slot1): int32 [B] batch indices of the image in slot 0 / slot 1.
  """
  own = jnp.arange(labels.shape[0], dtype=jnp.int32)
  slot0 = jnp.where(labels == 0, own, first)
  slot1 = jnp.where(labels == 0, first, jnp.where(labels == 1, own, second))
  return slot0.astype(jnp.int32), slot1.astype(jnp.int32)


def draw_text_assignment(key: jax.Array, sims: jax.Array) -> dict:
  """ALBEF's text-assignment examples for a batch of B captions with their own images.

  Each caption gets label 0, 1 or 2 with probability 1/3 each (ALBEF: own image with probability
  2/3, in slot 0 or 1 with probability 1/2; both slots other images with probability 1/3), and
  its slots from `text_assignment_slots` with the partners of `sample_partners(sims)`.

  Returns:
    dict(labels, slot0, slot1), int32 [B].
  """
  label_key, partner_key = jax.random.split(key)
  labels = jax.random.randint(label_key, (sims.shape[0],), 0, TA_NUM_CLASSES, jnp.int32)
  first, second = sample_partners(partner_key, sims)
  slot0, slot1 = text_assignment_slots(labels, first, second)
  return dict(labels=labels, slot0=slot0, slot1=slot1)


def partner_similarities(ctx) -> jax.Array:
  """Image-image ITC similarities [B, B] / cfg.temperature (default 0.07), without gradient.

  cfg.partner_features: 'ema' (default; ctx.ema_image_feat) or 'student' (ctx.image_feat under
  stop_gradient, as ALBEF's TA model, which has no momentum copy).
  """
  which = registry.choice(ctx.cfg, "partner_features", "ema", PARTNER_FEATURES, "nlvr_ta")
  feats = ctx.ema_image_feat if which == "ema" else ctx.image_feat
  feats = jax.lax.stop_gradient(feats).astype(jnp.float32)
  return feats @ feats.T / float(ctx.cfg.get("temperature", TA_TEMPERATURE))


def text_assignment_logits(ctx, batch, slot0: jax.Array, slot1: jax.Array) -> jax.Array:
  """TA logits [B, 3]: caption b fused with the student image states of rows slot0[b], slot1[b].

  ctx.image['states'] [B, N, Dv] and ctx.text['states'] [B, L, D] (student, encoded once) go
  through ctx.student.apply('fuse_pair', ...) and ('ta_classify', CLS). Gradients flow into the
  gathered states; only the indices are fixed.
  """
  image_states = ctx.image["states"]
  states = ctx.student.apply("fuse_pair", ctx.text["states"], batch["text_mask"], image_states[slot0],
                             image_states[slot1], deterministic=ctx.student.deterministic)
  return ctx.student.apply("ta_classify", states[:, 0]).astype(jnp.float32)


@registry.register("nlvr_ta", heads=("itc",),
                   needs_teacher=lambda cfg: cfg.get("partner_features", "ema") == "ema")
def nlvr_ta_loss(ctx, batch):
  """NLVR2's text-assignment pre-step on caption batches (ALBEF `model_pretrain_nlvr.py`).

  Inputs: batch['image'] [B,H,W,3], batch['text_ids'], batch['text_mask'] [B, L]; ctx.image,
  ctx.text (student states), ctx.ema_image_feat or ctx.image_feat (partner sampling),
  ctx.rng('nlvr_ta'); the model must be `NLVRModel` (fuse_pair, ta_classify).
  Config: `partner_features` 'ema' (default) | 'student'; `temperature` (default 0.07).

  Formula: (labels, slot0, slot1) = draw_text_assignment(rng, partner_similarities(ctx)) over the
  global batch; z = TA logits [B, 3] of (caption b, image slot0[b], image slot1[b]);
  loss = mean_b -log softmax(z_b)[labels_b].

  Returns:
    (loss, {'loss', 'accuracy'}).
  """
  registry.require_batch_keys(batch, ["image", "text_ids", "text_mask"], "nlvr_ta")
  assignment = draw_text_assignment(ctx.rng("nlvr_ta"), partner_similarities(ctx))
  logits = text_assignment_logits(ctx, batch, assignment["slot0"], assignment["slot1"])
  loss = jnp.mean(hard_cross_entropy(logits, assignment["labels"]))
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == assignment["labels"])
  return loss, {"loss": loss, "accuracy": accuracy}
