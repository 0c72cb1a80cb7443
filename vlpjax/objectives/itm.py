"""ALBEF image-text matching with contrastive hard negatives (docs/method_spec.md §1.2, App. E 8-9)."""
import jax
import jax.numpy as jnp

from vlpjax.objectives import registry

SCOPES = ("local", "global")


def sample_hard_negatives(key: jax.Array, sims: jax.Array, image_ids: jax.Array,
                          num_groups: int) -> jax.Array:
  """Draws one hard negative column per row, with probability softmax over the allowed columns.

  The batch is split into `num_groups` contiguous groups of G = B // num_groups rows (one group
  per data-parallel shard for ALBEF's per-GPU sampling; `num_groups=1` samples over the whole
  batch). Column j is allowed for row b when it lies in b's group, j != b and
  image_ids[j] != image_ids[b] (a same-image caption is not a negative). Row b draws
  j ~ softmax(sims[b, allowed]) in float32, which equals ALBEF's multinomial over the softmax
  with the excluded entries zeroed, without its NaN failure modes (docs/method_spec.md App. H #16).

  A row whose in-group columns all share its image id has no true negative. It falls back to a
  uniform draw over the other rows of its group, which is then scored as a negative (label
  noise on a degenerate batch, instead of NaN or a crash as in ALBEF).

  Args:
    key: PRNG key.
    sims: [B, B] similarity logits; row b scores the candidates for row b.
    image_ids: int [B] image id of each row.
    num_groups: Python int; B must be a multiple, and each group needs at least 2 rows.

  Returns:
    int32 [B] column index of each row's negative; never b, never outside b's group.
  """
  batch_size = sims.shape[0]
  if sims.shape != (batch_size, batch_size):
    raise ValueError(f"hard-negative sims must be square [B, B]; got {sims.shape}")
  if batch_size % num_groups:
    raise ValueError(f"hard-negative sampling: batch size {batch_size} is not a multiple of "
                     f"num_groups={num_groups}")
  group_size = batch_size // num_groups
  if group_size < 2:
    raise ValueError(
        f"hard-negative sampling scope has {group_size} example (batch {batch_size} over "
        f"{num_groups} groups); ITM needs at least 2 examples per scope. Use a larger per-shard "
        "batch or the objective config scope='global'.")
  rows = jnp.arange(batch_size)
  group = rows // group_size
  in_group_other = (group[:, None] == group[None, :]) & (rows[:, None] != rows[None, :])
  allowed = in_group_other & (image_ids[:, None] != image_ids[None, :])
  has_negative = jnp.any(allowed, axis=1, keepdims=True)
  logits = jnp.where(allowed, sims.astype(jnp.float32), -jnp.inf)
  fallback = jnp.where(in_group_other, 0.0, -jnp.inf)
  logits = jnp.where(has_negative, logits, fallback)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _num_groups(ctx) -> int:
  scope = registry.choice(ctx.cfg, "scope", "local", SCOPES, "itm")
  return ctx.num_groups if scope == "local" else 1


def hard_negative_indices(ctx, batch) -> tuple[jax.Array, jax.Array]:
  """One negative image per text and one negative text per image, from the student ITC logits.

  Uses the in-batch block (first B columns) of the similarity feature `cfg.sims` (default
  `itc_sims`, a dict of i2t / t2i logits [B, B+Q]) under stop_gradient: the text-to-image row of
  text b picks its negative image, the image-to-text row of image b its negative text.
  Keys come from ctx.rng('itm'); the scope is cfg.scope ('local' = per data shard, default).

  Returns:
    (negative_image_idx [B], negative_text_idx [B]), int32.
  """
  registry.require_batch_keys(batch, ["image_id"], "itm")
  batch_size = batch["image_id"].shape[0]
  sims = getattr(ctx, ctx.cfg.get("sims", "itc_sims"))
  i2t = jax.lax.stop_gradient(sims["i2t"][:, :batch_size])
  t2i = jax.lax.stop_gradient(sims["t2i"][:, :batch_size])
  image_key, text_key = jax.random.split(ctx.rng("itm"))
  num_groups = _num_groups(ctx)
  negative_image_idx = sample_hard_negatives(image_key, t2i, batch["image_id"], num_groups)
  negative_text_idx = sample_hard_negatives(text_key, i2t, batch["image_id"], num_groups)
  return negative_image_idx, negative_text_idx


def itm_logits_and_labels(ctx, batch, negative_image_idx: jax.Array,
                          negative_text_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fuses the B positive and 2B negative pairs and scores their fused CLS with the ITM head.

  Pairs, in order: (text_b, image_b), (text_b, image_{negative_image_idx[b]}),
  (text_{negative_text_idx[b]}, image_b), for b = 0..B-1, fused in one call of
  ctx.student.fuse on ctx.text['states'] [B, L, D] (with batch['text_mask']) and
  ctx.image['states'] [B, N, Dv] (with ctx.image['mask'] [B, N] when the image has a padding mask).
  Gradients flow into the gathered states; only the choice of indices is fixed.

  Returns:
    logits f32 [3B, 2] = ctx.student.itm_logits(fused text_states[:, 0]);
    labels int32 [3B] = B ones followed by 2B zeros (1 = matching pair).
  """
  registry.require_batch_keys(batch, ["text_mask"], "itm")
  text_states = ctx.text["states"]
  image_states = ctx.image["states"]
  text_mask = batch["text_mask"]
  batch_size = text_states.shape[0]
  all_text = jnp.concatenate([text_states, text_states, text_states[negative_text_idx]])
  all_mask = jnp.concatenate([text_mask, text_mask, text_mask[negative_text_idx]])
  all_image = jnp.concatenate([image_states, image_states[negative_image_idx], image_states])
  image_mask = ctx.image.get("mask")  # extra image-side tokens' padding (ViCHA's mask_padding)
  if image_mask is not None:
    image_mask = jnp.concatenate([image_mask, image_mask[negative_image_idx], image_mask])
  fused = ctx.student.fuse(all_text, all_mask, all_image, image_mask)
  logits = ctx.student.itm_logits(fused["text_states"][:, 0]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones([batch_size], jnp.int32),
                            jnp.zeros([2 * batch_size], jnp.int32)])
  return logits, labels


def _needs_teacher(cfg) -> bool:
  # ALBEF's similarities (`itc_sims`) score students against the teacher's features.
  return cfg.get("sims", "itc_sims") == "itc_sims"


@registry.register("itm", heads=("itm",), needs_teacher=_needs_teacher)
def itm_loss(ctx, batch):
  """Image-text matching loss over B positives and 2B in-batch hard negatives (ALBEF).

  Inputs: ctx.itc_sims (i2t, t2i [B, B+Q]), ctx.text['states'] [B, L, D],
  ctx.image['states'] [B, N, Dv], ctx.student.fuse / itm_logits, ctx.rng('itm'),
  ctx.num_groups; batch['text_mask'] [B, L], batch['image_id'] [B].
  Config: `scope` 'local' (default; sample within each data shard, as ALBEF per GPU) or 'global';
  `sims` the context feature the negatives are drawn from (default 'itc_sims').

  Formula: negatives from `hard_negative_indices`, logits z [3B, 2] and labels y from
  `itm_logits_and_labels`; loss = mean_{k < 3B} -log softmax(z_k)[y_k], in float32.

  Returns:
    (loss, {'loss', 'accuracy'}), accuracy = fraction of the 3B pairs classified correctly.
  """
  negative_image_idx, negative_text_idx = hard_negative_indices(ctx, batch)
  logits, labels = itm_logits_and_labels(ctx, batch, negative_image_idx, negative_text_idx)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return loss, {"loss": loss, "accuracy": accuracy}
