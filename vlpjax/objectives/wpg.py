"""Weakly-supervised phrase grounding (MVP's fine-grained alignment, docs/method_spec.md §5.3).

For a pair (T, I), the cross-modal encoder's outputs at the phrase positions of T and at the
patch positions of I are L2-normalised; each phrase keeps one of its top-k (k = 3) patch
cosines, drawn uniformly at random, and the mean over the phrases is s(T, I). The negative is
s(T, I') for the patches of one random other image I' of the batch, as they came out of that
image's own pair (MVPTR reuses the positive pass, it fuses nothing new). Loss: the hinge
max(0, s(T, I') + margin - s(T, I)), averaged over the examples with at least one phrase.

`negatives='fused'` ([D], not in MVPTR): s(T, I') is scored on a cross-modal pass of the pair
(T, I') itself, one more fusion of B pairs. With MVPTR's negative the phrases and patches of a
positive come from one joint pass, those of the negative from two different ones, so the hinge
can be met by states that merely mark their pair; fused negatives close that shortcut and leave
only the phrase-patch match (docs/methods/mvp.md, Demo).
"""
import jax
import jax.numpy as jnp

from vlpjax.models import layers
from vlpjax.objectives import corrupted  # noqa: F401  (registers the corrupted_* features)
from vlpjax.objectives import registry

NEGATIVES = ("pass", "fused")


def sentence_scores(phrase_states: jax.Array, phrase_mask: jax.Array, patch_states: jax.Array,
                    pick: jax.Array, top_k: int) -> jax.Array:
  """s(T_b, I_b) [B]: per phrase one of its top-k patch cosines (index `pick`), mean over phrases.

  Args:
    phrase_states: [B, L, D] text-side outputs (only the `phrase_mask` positions count).
    phrase_mask: [B, L] 1 / True at phrase positions.
    patch_states: [B, N, D] image-side outputs of the image each row is scored against.
    pick: int [B, L] in [0, top_k): which of the top-k similarities (descending) each phrase keeps.

  Returns:
    float32 [B]; 0 for a row without phrases.
  """
  phrases = layers.l2_normalize(phrase_states)
  patches = layers.l2_normalize(patch_states)
  sims = jnp.einsum("bld,bnd->bln", phrases, patches)
  top = jax.lax.top_k(sims, top_k)[0]                                   # [B, L, k], descending
  chosen = jnp.take_along_axis(top, pick[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = phrase_mask.astype(jnp.float32)
  return jnp.sum(chosen * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def phrase_grounding_loss(phrase_states: jax.Array, phrase_mask: jax.Array, patch_states: jax.Array,
                          negative_index: jax.Array, positive_pick: jax.Array, negative_pick: jax.Array, *,
                          margin: float = 0.2, top_k: int = 3,
                          negative_states: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict]:
  """The WPG hinge.

  Args:
    phrase_states: [B, L, D]; phrase_mask: [B, L]; patch_states: [B, N, D] (row b: image b as
      fused with text b).
    negative_index: int [B], the other image each row is contrasted with (never b).
    positive_pick, negative_pick: int [B, L] in [0, top_k), the draws of `sentence_scores`.
    negative_states: None (MVPTR): s(T_b, I_neg(b)) scores row b's phrase states against
      patch_states[negative_index[b]]; or (phrases [B, L, D], patches [B, N, D]) of the pairs
      (T_b, I_neg(b)) fused together (`negatives='fused'`), scored row by row.

  Returns:
    (loss, {'positive', 'negative', 'with_phrases'}): loss = sum_b h_b [n_b > 0] / max(1, #{b:
    n_b > 0}) with h_b = max(0, s(T_b, I_{neg(b)}) + margin - s(T_b, I_b)) and n_b the phrases
    of row b; 'positive' / 'negative' the mean scores over those rows; 'with_phrases' their
    fraction.
  """
  positive = sentence_scores(phrase_states, phrase_mask, patch_states, positive_pick, top_k)
  if negative_states is None:
    negative = sentence_scores(phrase_states, phrase_mask, patch_states[negative_index], negative_pick, top_k)
  else:
    negative = sentence_scores(negative_states[0], phrase_mask, negative_states[1], negative_pick, top_k)
  has_phrases = jnp.any(phrase_mask.astype(bool), axis=1).astype(jnp.float32)
  rows = jnp.maximum(jnp.sum(has_phrases), 1.0)
  hinge = jnp.maximum(0.0, negative + margin - positive)
  loss = jnp.sum(hinge * has_phrases) / rows
  return loss, {"positive": jnp.sum(positive * has_phrases) / rows,
                "negative": jnp.sum(negative * has_phrases) / rows,
                "with_phrases": jnp.mean(has_phrases)}


def random_other_rows(key: jax.Array, batch_size: int) -> jax.Array:
  """int32 [B]: for each row b, a uniformly drawn other row (b + U{1..B-1}) mod B."""
  if batch_size < 2:
    raise ValueError("objective 'wpg' contrasts each pair with another image of the batch; it needs a "
                     f"batch of at least 2, got {batch_size}")
  shift = jax.random.randint(key, (batch_size,), 1, batch_size)
  return ((jnp.arange(batch_size) + shift) % batch_size).astype(jnp.int32)


def _check(cfg, config) -> None:
  if config.model.get("fusion", "cross") != "merged":
    raise ValueError("objective wpg grounds phrases to the cross-modal outputs at the patches: it needs "
                     f"config.model.fusion='merged', got {config.model.get('fusion')!r}")
  top_k = int(cfg.get("top_k", 3))
  grid = int(config.model.vision.image_size) // int(config.model.vision.patch_size)
  if not 1 <= top_k <= grid * grid:
    raise ValueError(f"config.objectives.wpg.top_k={top_k} must be in [1, {grid * grid}] (the patches)")
  registry.choice(cfg, "negatives", "pass", NEGATIVES, "wpg")


def fused_negatives(ctx, negative_index: jax.Array, num_patches: int) -> tuple[jax.Array, jax.Array]:
  """(phrase-side text states [B, L, D], patch states [B, P, D]) of one cross-modal pass over the
  pairs (T_b, I_neg(b)): the corrupted text encoding of row b with the corrupted image encoding
  (and its tag mask) of row negative_index[b]."""
  text, image = ctx.corrupted_text, ctx.corrupted_image
  image_mask = image.get("mask")
  fused = ctx.student.fuse(text["states"], ctx.batch["text_mask"], image["states"][negative_index],
                           None if image_mask is None else image_mask[negative_index])
  return fused["text_states"], fused["image_states"][:, :num_patches]


@registry.register("wpg", check=_check)
def wpg_loss(ctx, batch):
  """MVP's weakly-supervised phrase grounding on the step's cross-modal pass.

  Inputs: ctx.corrupted_fusion (text_states [B, L, D]; image_states [B, P(+T), D], whose first
  P = ctx.model_config.vision.num_patches rows are the patches); batch['phrase_mask'] [B, L]
  (1 at the phrase tokens of `[CLS] words phrases [SEP]`); ctx.rng('wpg'); with
  `negatives='fused'` also ctx.corrupted_text / corrupted_image, ctx.student.fuse and
  batch['text_mask'] (`fused_negatives`).
  Config: `margin` (0.2), `top_k` (3), `negatives` 'pass' (MVPTR: the negative image's patches
  from its own pair's pass) or 'fused' ([D]: a pass over the negative pair; module docstring).

  Formula: `phrase_grounding_loss` with negative rows `random_other_rows` and picks uniform in
  [0, top_k) per phrase, drawn independently for the positive and the negative score.

  Returns:
    (loss, {'loss', 'positive', 'negative', 'with_phrases'}).
  """
  registry.require_batch_keys(batch, ["phrase_mask"], "wpg")
  fused = ctx.corrupted_fusion
  text_states = fused["text_states"]
  if fused.get("image_states") is None:
    raise ValueError("objective 'wpg' needs the fusion's image-side outputs (config.model.fusion='merged')")
  num_patches = ctx.model_config.vision.num_patches
  patches = fused["image_states"][:, :num_patches]
  phrase_mask = batch["phrase_mask"]
  if phrase_mask.shape != text_states.shape[:2]:
    raise ValueError(f"objective 'wpg': batch['phrase_mask'] has shape {phrase_mask.shape}, the text "
                     f"{text_states.shape[:2]}")
  top_k = int(ctx.cfg.get("top_k", 3))
  negative_key, positive_pick_key, negative_pick_key = jax.random.split(ctx.rng("wpg"), 3)
  batch_size = text_states.shape[0]
  negative_index = random_other_rows(negative_key, batch_size)
  positive_pick = jax.random.randint(positive_pick_key, phrase_mask.shape, 0, top_k)
  negative_pick = jax.random.randint(negative_pick_key, phrase_mask.shape, 0, top_k)
  negative_states = None
  if registry.choice(ctx.cfg, "negatives", "pass", NEGATIVES, "wpg") == "fused":
    negative_states = fused_negatives(ctx, negative_index, num_patches)
  loss, metrics = phrase_grounding_loss(text_states, phrase_mask, patches, negative_index, positive_pick,
                                        negative_pick, margin=float(ctx.cfg.get("margin", 0.2)), top_k=top_k,
                                        negative_states=negative_states)
  return loss, {"loss": loss, **metrics}
