"""Image-text matching with in-batch hard negatives.

`negatives='sampled'` (default): ALBEF's contrastive hard negatives (docs/method_spec.md §1.2, App. E 8-9):
one negative image per text and one negative text per image, drawn from the softmax of the
similarities; B positives + 2B negatives.
`negatives='hardest'`: MVP's (docs/method_spec.md §5.3, App. A.5 5-6): the hardest in-batch image of each
text and text of each image (argmax of the similarities); a random half of the rows is paired
with its hard image, the other half with its hard text; B positives + B negatives.
"""
import jax
import jax.numpy as jnp

from vlpjax.objectives import registry

SCOPES = ("local", "global")
NEGATIVES = ("sampled", "hardest")


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
  logits = _allowed_logits(sims, image_ids, num_groups)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _allowed_logits(sims: jax.Array, image_ids: jax.Array, num_groups: int) -> jax.Array:
  """float32 [B, B]: sims on the allowed columns of each row, -inf elsewhere; a row without a
  true negative (every in-group column shares its image id) gets 0 on its other in-group
  columns instead (see `sample_hard_negatives`)."""
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
  return jnp.where(has_negative, logits, fallback)


def hardest_negatives(sims: jax.Array, image_ids: jax.Array, num_groups: int) -> jax.Array:
  """The hardest allowed column of each row: argmax of `sims` over the columns
  `sample_hard_negatives` may draw (same group, not the row, another image id; a row without a
  true negative takes the first other in-group row). MVPTR masks the diagonal only; here a
  same-image caption is never a negative, as everywhere in vlpjax.

  Returns:
    int32 [B]; never b, never outside b's group.
  """
  return jnp.argmax(_allowed_logits(sims, image_ids, num_groups), axis=-1).astype(jnp.int32)


def hardest_pairs(key: jax.Array, negative_image_idx: jax.Array,
                  negative_text_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MVP's split of the B negatives: a random half of the rows (B // 2 of a random permutation)
  pairs text b with its hard image, the others pair hard text with image b.

  Returns:
    (text_idx [B], image_idx [B]) int32: negative pair b = (text_idx[b], image_idx[b]).
  """
  batch_size = negative_image_idx.shape[0]
  order = jax.random.permutation(key, batch_size)
  rank = jnp.zeros((batch_size,), jnp.int32).at[order].set(jnp.arange(batch_size, dtype=jnp.int32))
  hard_image = rank < batch_size // 2
  rows = jnp.arange(batch_size, dtype=jnp.int32)
  return (jnp.where(hard_image, rows, negative_text_idx).astype(jnp.int32),
          jnp.where(hard_image, negative_image_idx, rows).astype(jnp.int32))


def _num_groups(ctx) -> int:
  scope = registry.choice(ctx.cfg, "scope", "local", SCOPES, "itm")
  return ctx.num_groups if scope == "local" else 1


def hard_negative_indices(ctx, batch) -> tuple[jax.Array, jax.Array]:
  """One negative image per text and one negative text per image, from the student similarities.

  Uses the in-batch block (first B columns) of the similarity feature `cfg.sims` (default
  `itc_sims`, a dict of i2t / t2i logits [B, B+Q]; MVP: `vsc_sims`) under stop_gradient: the
  text-to-image row of text b picks its negative image, the image-to-text row of image b its
  negative text, drawn (`negatives='sampled'`) or the argmax (`'hardest'`). Keys come from
  ctx.rng('itm'); the scope is cfg.scope ('local' = per data shard, default).

  Returns:
    (negative_image_idx [B], negative_text_idx [B]), int32.
  """
  registry.require_batch_keys(batch, ["image_id"], "itm")
  batch_size = batch["image_id"].shape[0]
  sims = getattr(ctx, ctx.cfg.get("sims", "itc_sims"))
  i2t = jax.lax.stop_gradient(sims["i2t"][:, :batch_size])
  t2i = jax.lax.stop_gradient(sims["t2i"][:, :batch_size])
  num_groups = _num_groups(ctx)
  if _negatives(ctx) == "hardest":
    return (hardest_negatives(t2i, batch["image_id"], num_groups),
            hardest_negatives(i2t, batch["image_id"], num_groups))
  image_key, text_key = jax.random.split(ctx.rng("itm"))
  negative_image_idx = sample_hard_negatives(image_key, t2i, batch["image_id"], num_groups)
  negative_text_idx = sample_hard_negatives(text_key, i2t, batch["image_id"], num_groups)
  return negative_image_idx, negative_text_idx


def _negatives(ctx) -> str:
  return registry.choice(ctx.cfg, "negatives", "sampled", NEGATIVES, "itm")


def _encodings(ctx) -> tuple[dict, dict]:
  """(text, image) encodings the pairs are fused from: the context features `cfg.text_encoding`
  (default 'text') and `cfg.image_encoding` (default 'image')."""
  return getattr(ctx, ctx.cfg.get("text_encoding", "text")), getattr(ctx, ctx.cfg.get("image_encoding", "image"))


def itm_logits_and_labels(ctx, batch, negative_image_idx: jax.Array,
                          negative_text_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fuses the B positive and 2B negative pairs and scores their fused CLS with the ITM head.

  Pairs, in order: (text_b, image_b), (text_b, image_{negative_image_idx[b]}),
  (text_{negative_text_idx[b]}, image_b), for b = 0..B-1, fused in one call of
  ctx.student.fuse on the text encoding's states [B, L, D] (default ctx.text; with
  batch['text_mask']) and the image encoding's [B, N, Dv] (default ctx.image; `_encodings`).
  Gradients flow into the gathered states; only the choice of indices is fixed.

  Returns:
    logits f32 [3B, 2] = ctx.student.itm_logits(fused text_states[:, 0]);
    labels int32 [3B] = B ones followed by 2B zeros (1 = matching pair).
  """
  registry.require_batch_keys(batch, ["text_mask"], "itm")
  text, image = _encodings(ctx)
  text_states = text["states"]
  image_states = image["states"]
  text_mask = batch["text_mask"]
  batch_size = text_states.shape[0]
  all_text = jnp.concatenate([text_states, text_states, text_states[negative_text_idx]])
  all_mask = jnp.concatenate([text_mask, text_mask, text_mask[negative_text_idx]])
  all_image = jnp.concatenate([image_states, image_states[negative_image_idx], image_states])
  image_mask = image.get("mask")  # extra image-side tokens' padding (ViCHA's mask_padding)
  if image_mask is not None:
    image_mask = jnp.concatenate([image_mask, image_mask[negative_image_idx], image_mask])
  fused = ctx.student.fuse(all_text, all_mask, all_image, image_mask)
  logits = ctx.student.itm_logits(fused["text_states"][:, 0]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones([batch_size], jnp.int32),
                            jnp.zeros([2 * batch_size], jnp.int32)])
  return logits, labels


def hardest_itm_logits_and_labels(ctx, batch, text_idx: jax.Array,
                                  image_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MVP's pairs: the B positives, then the negatives (text_idx[b], image_idx[b]) (`hardest_pairs`).

  The negatives are fused from the text / image encodings (`_encodings`; the image encoding's
  attention mask, e.g. of padded tags, is gathered with it). The positives' fused CLS comes
  from the context feature `cfg.positives` (e.g. 'corrupted_fusion', the pass MLM and WPG read,
  so the positive pairs are not fused twice), or, without it, from fusing them with the
  negatives in one call.

  Returns:
    logits f32 [2B, 2] (itm_logits of the fused CLS); labels int32 [2B] = B ones, B zeros.
  """
  registry.require_batch_keys(batch, ["text_mask"], "itm")
  text, image = _encodings(ctx)
  text_states, image_states = text["states"], image["states"]
  text_mask, image_mask = batch["text_mask"], image.get("mask")
  batch_size = text_states.shape[0]
  negative_text, negative_mask = text_states[text_idx], text_mask[text_idx]
  negative_image = image_states[image_idx]
  negative_image_mask = None if image_mask is None else image_mask[image_idx]
  positives = ctx.cfg.get("positives", "")
  if positives:
    positive_cls = getattr(ctx, positives)["text_states"][:, 0]
    negative_cls = ctx.student.fuse(negative_text, negative_mask, negative_image, negative_image_mask
                                    )["text_states"][:, 0]
    cls = jnp.concatenate([positive_cls, negative_cls])
  else:
    all_image_mask = None if image_mask is None else jnp.concatenate([image_mask, negative_image_mask])
    cls = ctx.student.fuse(jnp.concatenate([text_states, negative_text]),
                           jnp.concatenate([text_mask, negative_mask]),
                           jnp.concatenate([image_states, negative_image]), all_image_mask)["text_states"][:, 0]
  logits = ctx.student.itm_logits(cls).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones([batch_size], jnp.int32), jnp.zeros([batch_size], jnp.int32)])
  return logits, labels


def _needs_teacher(cfg) -> bool:
  # ALBEF's similarities (`itc_sims`) score students against the teacher's features.
  return cfg.get("sims", "itc_sims") == "itc_sims"


@registry.register("itm", heads=("itm",), needs_teacher=_needs_teacher)
def itm_loss(ctx, batch):
  """Image-text matching loss over B positives and in-batch hard negatives.

  Inputs: the similarity feature `cfg.sims` (default ctx.itc_sims: i2t, t2i [B, B+Q]), the
  text / image encodings (`cfg.text_encoding`, `cfg.image_encoding`; default ctx.text['states']
  [B, L, D], ctx.image['states'] [B, N, Dv]), ctx.student.fuse / itm_logits, ctx.rng('itm'),
  ctx.num_groups; batch['text_mask'] [B, L], batch['image_id'] [B].
  Config: `negatives` 'sampled' (default, ALBEF: 2B negatives drawn from the softmax of the
  similarities) or 'hardest' (MVP: the argmax; B negatives, half with a hard image, half with a
  hard text, `hardest_pairs`); `scope` 'local' (default; mine within each data shard, as ALBEF
  and MVPTR per GPU) or 'global'; `sims` the context feature the negatives come from (default
  'itc_sims'; MVP 'vsc_sims'); `text_encoding` / `image_encoding` the context features fused
  (default 'text' / 'image'; MVP 'corrupted_text' / 'corrupted_image'); `positives` ('hardest'
  only) a context feature holding the positive pairs' fusion (default '': fuse them here).

  Formula: negatives from `hard_negative_indices`; logits z [3B, 2] (sampled,
  `itm_logits_and_labels`) or [2B, 2] (hardest, `hardest_itm_logits_and_labels`) with labels y
  (1 = matching pair); loss = mean_k -log softmax(z_k)[y_k], in float32.

  Returns:
    (loss, {'loss', 'accuracy'}), accuracy = fraction of the pairs classified correctly.
  """
  negative_image_idx, negative_text_idx = hard_negative_indices(ctx, batch)
  if _negatives(ctx) == "hardest":
    text_idx, image_idx = hardest_pairs(ctx.rng("itm"), negative_image_idx, negative_text_idx)
    logits, labels = hardest_itm_logits_and_labels(ctx, batch, text_idx, image_idx)
  else:
    logits, labels = itm_logits_and_labels(ctx, batch, negative_image_idx, negative_text_idx)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return loss, {"loss": loss, "accuracy": accuracy}
