"""Masked language modelling on CMC-mixed sentences (VLMixer, docs/method_spec.md §4.2 E), with an
optional concept-recovery term at the visual tokens."""
import jax
import jax.numpy as jnp

from vlpjax.objectives import cmc
from vlpjax.objectives import registry


def masked_cross_entropy(logits: jax.Array, labels: jax.Array):
  """(mean CE over labels >= 0, accuracy there); logits [..., V], labels [...] (-1 = ignored).
  0 when nothing is labelled."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels >= 0
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  loss = -jnp.sum(jnp.where(valid, picked, 0.0)) / count
  accuracy = jnp.sum(valid & (jnp.argmax(log_probs, axis=-1) == labels)) / count
  return loss, accuracy


def occurrence_means(states: jax.Array, mix_slot: jax.Array, mask: jax.Array, num_occurrences: int,
                     entry_tokens: int) -> jax.Array:
  """Mean of each occurrence's visual-token states: [B, Lm, D] -> [B, K, D] (0 where it has none)."""
  occurrence = jnp.where((mix_slot >= 0) & (mask > 0), mix_slot // entry_tokens, -1)
  one_hot = jax.nn.one_hot(occurrence, num_occurrences, dtype=jnp.float32)       # [B, Lm, K]
  total = jnp.einsum("blk,bld->bkd", one_hot, states.astype(jnp.float32))
  return total / jnp.maximum(jnp.sum(one_hot, axis=1), 1.0)[..., None]


@registry.register("mixed_mlm", heads=lambda cfg: ("mlm", "concept") if cfg.get("concept_weight", 0.0) else ("mlm",),
                   check=cmc.check_gallery_source)
def mixed_mlm_loss(ctx, batch):
  """MLM on the mixed sentences (+ concept recovery at the visual tokens).

  Inputs (Bt sentences, Lm mixed length, K occurrences, V vocabulary, C concepts):
    ctx.mixed_masked_fusion['text_states'] [Bt, Lm, D]: encoder + merged layers over the mixed
      sequence whose remaining words were masked 80/10/10 (`mix_mlm_ids`, `ops_mix`);
    batch['text']['mix_mlm_labels'] [Bt, Lm]: the original word at masked word positions, -1
      elsewhere (visual slots are never masked);
    for concept recovery: mix_slot [Bt, Lm], cmc_concept [Bt, K], and ctx.cmc_draws['empty'].
  Config: `concept_weight` (default 0 = off): weight of the concept-recovery CE.

  Formula: mlm = mean over masked positions of -log softmax(mlm_logits)[label];
  concept = mean over occurrences replaced by an entry of -log softmax(concept_logits(mean of the
  occurrence's visual-token states))[its concept]; loss = mlm + concept_weight * concept.

  Returns:
    (loss, {'loss', 'mlm', 'accuracy'} (+ 'concept', 'concept_accuracy')).
  """
  text = cmc.stream(batch, cmc.TEXT, ("mix_mlm_labels", "mix_slot", "cmc_concept", "cmc_replaced"), "mixed_mlm")
  fused = ctx.mixed_masked_fusion
  states = fused["text_states"]
  mlm, accuracy = masked_cross_entropy(ctx.student.mlm_logits(states), text["mix_mlm_labels"])
  metrics = {"mlm": mlm, "accuracy": accuracy}
  loss = mlm
  weight = float(ctx.cfg.get("concept_weight", 0.0))
  if weight:
    num_occurrences = text["cmc_concept"].shape[1]
    entry_tokens = ctx.model_config.entry_tokens
    pooled = occurrence_means(states, text["mix_slot"], fused["mask"], num_occurrences, entry_tokens)
    has_entry = text["cmc_replaced"] & ~ctx.cmc_draws["empty"] & (text["cmc_concept"] >= 0)
    labels = jnp.where(has_entry, text["cmc_concept"], -1)
    concept, concept_accuracy = masked_cross_entropy(ctx.student.concept_logits(pooled), labels)
    loss = loss + weight * concept
    metrics.update(concept=concept, concept_accuracy=concept_accuracy)
  metrics["loss"] = loss
  return loss, metrics
