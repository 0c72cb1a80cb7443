"""ALBEF image-text contrastive loss with momentum distillation (docs/method_spec.md §1.2).

The objective owns its feature queue (`queue_size` > 0 in its config): image and text rows of
the teacher's features and their image ids, written one global batch at a time after each step.
"""
import jax
import jax.numpy as jnp

from vlpjax.models import layers
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry


def init_queue(cfg, model_config, rng: jax.Array) -> dict | None:
  """ALBEF initialises the feature queues with random unit vectors; ids start empty (-1).

  Returns None without a queue (`queue_size` 0): nothing to keep or checkpoint.
  """
  queue_size = int(cfg.get("queue_size", 0))
  if queue_size == 0:
    return None
  image_rng, text_rng = jax.random.split(rng)
  dim = model_config.embed_dim
  return dict(
      image=layers.l2_normalize(jax.random.normal(image_rng, (queue_size, dim))),
      text=layers.l2_normalize(jax.random.normal(text_rng, (queue_size, dim))),
      idx=jnp.full((queue_size,), -1, jnp.int32),
      ptr=jnp.zeros((), jnp.int32))


def enqueue(queue: dict, image_feat: jax.Array, text_feat: jax.Array, image_id: jax.Array) -> dict:
  """Writes the batch rows at `ptr` (queue size is a multiple of the global batch)."""
  ptr = queue["ptr"]
  size = queue["image"].shape[0]
  return dict(
      image=jax.lax.dynamic_update_slice(queue["image"], image_feat.astype(queue["image"].dtype), (ptr, 0)),
      text=jax.lax.dynamic_update_slice(queue["text"], text_feat.astype(queue["text"].dtype), (ptr, 0)),
      idx=jax.lax.dynamic_update_slice(queue["idx"], image_id.astype(jnp.int32), (ptr,)),
      ptr=(ptr + image_feat.shape[0]) % size)


def update_queue(ctx, batch, queue):
  """After the step: the teacher's ITC features of the global batch and their image ids."""
  if queue is None:
    return None
  return enqueue(queue, ctx.ema_image_feat, ctx.ema_text_feat, batch["image_id"])


def check_queue(cfg, config) -> None:
  queue_size = int(cfg.get("queue_size", 0))
  global_batch = int(config.batch_size)
  if queue_size and queue_size % global_batch:
    raise ValueError(f"config.objectives.itc.queue_size={queue_size} must be a multiple of the global batch "
                     f"config.batch_size={global_batch} (queue rows are written one batch at a time)")


def queue_of(ctx) -> dict:
  """The ITC queue (empty [0, E] arrays without one)."""
  queue = ctx.objective_state.get("itc")
  if queue is None:
    dim = ctx.model_config.embed_dim
    return dict(image=jnp.zeros((0, dim), jnp.float32), text=jnp.zeros((0, dim), jnp.float32),
                idx=jnp.zeros((0,), jnp.int32))
  return queue


@context_lib.feature("itc_sims")
def itc_sims(ctx):
  """Student features against [teacher batch features ; ITC queue], divided by the temperature.

  i2t = image_feat @ [ema_text_feat ; queue.text].T / temp  -> [B, B+Q]; t2i likewise.
  """
  queue = queue_of(ctx)
  text_keys = jnp.concatenate([ctx.ema_text_feat, queue["text"]], axis=0)
  image_keys = jnp.concatenate([ctx.ema_image_feat, queue["image"]], axis=0)
  temp = ctx.temp
  return dict(i2t=ctx.image_feat @ text_keys.T / temp, t2i=ctx.text_feat @ image_keys.T / temp)


def positive_targets(batch_size: int, queue_ids: jax.Array,
                     image_ids: jax.Array | None = None) -> jax.Array:
  """Ground-truth target distribution over the key columns [batch ; queue].

  Args:
    batch_size: B.
    queue_ids: int [Q], image id of each queue row; -1 marks a row without an id.
    image_ids: None (pre-training): the positive of row b is column b only. Otherwise int [B],
      the non-negative image id of each batch pair (retrieval fine-tune): every column whose
      image id equals row b's is a positive, so queue rows without an id never are.

  Returns:
    f32 [B, B+Q], each row sums to 1: 1/|P_b| on the positives P_b of row b, 0 elsewhere.
    The diagonal is always a positive, so no row is empty.
  """
  diagonal = jnp.eye(batch_size, batch_size + queue_ids.shape[0], dtype=bool)
  if image_ids is None:
    return diagonal.astype(jnp.float32)
  column_ids = jnp.concatenate([image_ids, queue_ids])
  positives = ((image_ids[:, None] == column_ids[None, :]) | diagonal).astype(jnp.float32)
  return positives / positives.sum(axis=1, keepdims=True)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-sum_j targets[b, j] * log_softmax(logits)[b, j] per row: [B, K], [B, K] -> [B]."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def in_batch_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Fraction of rows whose best in-batch column (first B of [B, B+Q]) is a positive."""
  batch_size = logits.shape[0]
  best = jnp.argmax(logits[:, :batch_size], axis=-1)
  return jnp.mean(jnp.take_along_axis(targets, best[:, None], axis=1)[:, 0] > 0)


@registry.register("itc", heads=("itc",), needs_teacher=True, init_state=init_queue,
                   update_state=update_queue, check=check_queue)
def itc_loss(ctx, batch):
  """Image-text contrastive loss with momentum-distilled soft targets (ALBEF MoD).

  Inputs (B = global batch, Q = queue rows, E = embedding width):
    ctx.itc_sims['i2t'], ['t2i']: [B, B+Q] student logits: student image (text) features
      against the keys [teacher batch text (image) features ; text (image) queue], over temp.
    ctx.ema_image_feat, ctx.ema_text_feat: [B, E] teacher features; the objective's queue
      `ctx.state` (image, text [Q, E], idx [Q] image ids; None = no queue); ctx.temp, ctx.alpha.
    batch['image_id']: int [B], read only when `id_positives` is set.
  Config: `distill` (default True; False means alpha = 0), `id_positives` (default False),
  `queue_size` (default 0 = no queue; a multiple of the global batch).

  Formula, per direction d in {i2t, t2i} with student logits s_d and teacher logits
  s'_i2t = ema_image_feat @ [ema_text_feat ; text_queue].T / temp (t2i likewise):
    y_d = alpha * softmax(s'_d) + (1 - alpha) * positives        (positive_targets)
    loss = mean_b 1/2 (CE(y_i2t[b], s_i2t[b]) + CE(y_t2i[b], s_t2i[b])),
  CE(y, s) = -sum_j y_j log softmax(s)_j. All in float32.

  Returns:
    (loss, {'loss', 'i2t_accuracy', 't2i_accuracy', 'temp'}); accuracies are over the
    in-batch columns.
  """
  cfg = ctx.cfg
  i2t_logits = ctx.itc_sims["i2t"].astype(jnp.float32)
  t2i_logits = ctx.itc_sims["t2i"].astype(jnp.float32)
  batch_size = i2t_logits.shape[0]
  queue = queue_of(ctx)
  queue_ids = queue["idx"]
  num_columns = batch_size + queue_ids.shape[0]
  for name, logits in (("i2t", i2t_logits), ("t2i", t2i_logits)):
    if logits.shape != (batch_size, num_columns):
      raise ValueError(f"objective 'itc': ctx.itc_sims[{name!r}] has shape {logits.shape}; "
                       f"expected [B, B+Q] = {(batch_size, num_columns)}")

  image_ids = None
  if cfg.get("id_positives", False):
    registry.require_batch_keys(batch, ["image_id"], "itc")
    image_ids = batch["image_id"]
  positives = positive_targets(batch_size, queue_ids, image_ids)

  if cfg.get("distill", True):
    alpha = jnp.asarray(ctx.alpha, jnp.float32)
    temp = jnp.asarray(ctx.temp, jnp.float32)
    ema_image = ctx.ema_image_feat.astype(jnp.float32)
    ema_text = ctx.ema_text_feat.astype(jnp.float32)
    text_keys = jnp.concatenate([ema_text, queue["text"].astype(jnp.float32)])
    image_keys = jnp.concatenate([ema_image, queue["image"].astype(jnp.float32)])
    teacher_i2t = jax.lax.stop_gradient(ema_image @ text_keys.T / temp)
    teacher_t2i = jax.lax.stop_gradient(ema_text @ image_keys.T / temp)
    i2t_targets = alpha * jax.nn.softmax(teacher_i2t, axis=-1) + (1 - alpha) * positives
    t2i_targets = alpha * jax.nn.softmax(teacher_t2i, axis=-1) + (1 - alpha) * positives
  else:
    i2t_targets = t2i_targets = positives

  loss = jnp.mean(0.5 * (soft_cross_entropy(i2t_logits, i2t_targets) +
                         soft_cross_entropy(t2i_logits, t2i_targets)))
  metrics = {
      "loss": loss,
      "i2t_accuracy": in_batch_accuracy(i2t_logits, positives),
      "t2i_accuracy": in_batch_accuracy(t2i_logits, positives),
      "temp": jnp.asarray(ctx.temp, jnp.float32),
  }
  return loss, metrics
