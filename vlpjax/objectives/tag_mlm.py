"""Tag-aided visual pretraining, masked tags (VLMixer on image-only data, docs/method_spec.md §4.2 F):
[CLS] tags [SEP] beside the image sentence, the masked tag words predicted."""
from vlpjax.objectives import cmc
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import mixed_mlm
from vlpjax.objectives import registry


@context_lib.feature("tag_masked_fusion")
def _tag_masked_fusion(ctx):
  """Merged layers over [encoder(tag_mlm_ids) ; image sentence]: dict(text_states [Bi, T, D], ...)."""
  image = cmc.stream(ctx.batch, cmc.IMAGE, ("tag_mlm_ids", "tag_mask"), ctx.name)
  tags = ctx.student.encode_text(image["tag_mlm_ids"], image["tag_mask"])
  sentence = ctx.image_sentence
  return ctx.student.fuse(tags["states"], image["tag_mask"], sentence["states"], sentence["mask"])


@registry.register("tag_mlm", heads=("mlm",))
def tag_mlm_loss(ctx, batch):
  """Masked tag modelling on the image-only stream.

  Inputs (Bi images, T tag tokens, V vocabulary):
    ctx.tag_masked_fusion['text_states'] [Bi, T, D]: the merged layers over [the encoder's states
      of `[CLS] tags [SEP]` with 15% of the tag tokens masked 80/10/10 ; the encoder's states of
      the image sentence];
    batch['image']['tag_mlm_labels'] [Bi, T]: the original tag token where masked, -1 elsewhere.

  Formula: loss = mean over masked tag tokens of -log softmax(mlm_logits)[label] (0 when none).

  Returns:
    (loss, {'loss', 'accuracy'}).
  """
  image = cmc.stream(batch, cmc.IMAGE, ("tag_mlm_labels",), "tag_mlm")
  logits = ctx.student.mlm_logits(ctx.tag_masked_fusion["text_states"])
  loss, accuracy = mixed_mlm.masked_cross_entropy(logits, image["tag_mlm_labels"])
  return loss, {"loss": loss, "accuracy": accuracy}
