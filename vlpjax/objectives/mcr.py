"""Masked concept recovering (MVP, docs/method_spec.md §5.3): the masked object tags predicted from the
visual encoder with an MLM head tied to the word rows of the shared embedding table.

MVPTR also corrupts the phrase tokens of the text (forced [MASK] when a word of the phrase is
masked, the leakage rule of `input_pipeline.phrases.corrupt_phrases`) but its loader sets their
labels to -1, so no phrase is predicted (docs/method_spec.md App. H 12). `phrase_loss=True` adds one: the
corrupted phrases predicted from the text encoder over the phrase rows of the table (uni-modal
like the tag part; a vlpjax addition).
"""
import jax
import jax.numpy as jnp

from vlpjax.models import mvp
from vlpjax.objectives import corrupted  # noqa: F401  (registers the corrupted_* features)
from vlpjax.objectives import registry


def masked_prediction_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean cross-entropy over the labelled positions.

  Args:
    logits: [..., V]; labels: int [...], the class at predicted positions, -1 elsewhere.

  Returns:
    (loss, accuracy, count): mean over M = {labels >= 0} of -log softmax(logits)[label] (0
    when M is empty), the fraction of M whose argmax is the label, and |M| (float32).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  selected = labels >= 0
  count = jnp.sum(selected).astype(jnp.float32)
  picked = jnp.take_along_axis(log_probs, jnp.where(selected, labels, 0)[..., None], axis=-1)[..., 0]
  denominator = jnp.maximum(count, 1.0)
  loss = -jnp.sum(jnp.where(selected, picked, 0.0)) / denominator
  accuracy = jnp.sum(selected & (jnp.argmax(log_probs, axis=-1) == labels)) / denominator
  return loss, accuracy, count


def _check(cfg, config) -> None:
  tokens = (config.model.get("image_tokens") or {})
  if (tokens.get("kind") if hasattr(tokens, "get") else None) != "mvp_tags":
    raise ValueError("objective mcr predicts masked object tags: set config.model.image_tokens.kind='mvp_tags' "
                     "(and tokenize the tags into concept_ids, concept_mlm_ids, concept_mlm_labels)")
  if cfg.get("phrase_loss", False) and int(config.model.get("phrase_vocab_size", 0) or 0) <= 0:
    raise ValueError("config.objectives.mcr.phrase_loss needs phrase rows: config.model.phrase_vocab_size > 0")


@registry.register("mcr", heads=("mcr",), check=_check)
def mcr_loss(ctx, batch):
  """Masked tag recovery (+ the optional phrase recovery).

  Inputs (B batch, T tag tokens, L text length):
    ctx.corrupted_image['states'] [B, 1+P+T, Dv]: the visual encoder over [CLS, patches, masked
      tags] (the tags are its last T tokens);
    batch['concept_mlm_labels'] int [B, T]: the original tag id where the tag was masked, -1
      elsewhere;
    ctx.student.apply(mvp.mcr_logits, states) -> [B, T, V_words].
    With `phrase_loss`: ctx.corrupted_text['states'] [B, L, D], batch['phrase_labels'] int
      [B, L] (the original phrase id, >= V_words, at corrupted phrase positions, -1 elsewhere)
      and ctx.student.apply(mvp.phrase_logits, states) -> [B, L, V_phrases].
  Config: `phrase_loss` (default False, MVPTR).

  Formula: loss = CE_M(tags) (+ CE_M(phrases)), each `masked_prediction_loss`.

  Returns:
    (loss, {'loss', 'tag_accuracy', 'tags_masked'} (+ 'phrase_loss', 'phrase_accuracy')).
  """
  registry.require_batch_keys(batch, ["concept_mlm_labels"], "mcr")
  labels = batch["concept_mlm_labels"]
  states = ctx.corrupted_image["states"]
  num_tags = labels.shape[1]
  if states.shape[1] < num_tags:
    raise ValueError(f"objective 'mcr': the visual encoder gave {states.shape[1]} tokens, fewer than the "
                     f"{num_tags} tags of batch['concept_mlm_labels']")
  logits = ctx.student.apply(mvp.mcr_logits, states[:, -num_tags:])
  loss, accuracy, count = masked_prediction_loss(logits, labels)
  metrics = {"tag_accuracy": accuracy, "tags_masked": count}
  if ctx.cfg.get("phrase_loss", False):
    registry.require_batch_keys(batch, ["phrase_labels"], "mcr")
    word_vocab = ctx.model_config.text.vocab_size
    phrase_labels = jnp.where(batch["phrase_labels"] >= 0, batch["phrase_labels"] - word_vocab, -1)
    phrase_out = ctx.student.apply(mvp.phrase_logits, ctx.corrupted_text["states"])
    phrase_loss, phrase_accuracy, _ = masked_prediction_loss(phrase_out, phrase_labels)
    loss = loss + phrase_loss
    metrics.update(phrase_loss=phrase_loss, phrase_accuracy=phrase_accuracy)
  return loss, {"loss": loss, **metrics}
