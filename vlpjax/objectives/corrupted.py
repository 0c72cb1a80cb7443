"""Context features of the single forward pass over the inputs as the pipeline corrupted them.

MVPTR computes all of its pre-training losses from one forward pass (docs/method_spec.md App. A.5): the
text encoder reads the masked words and corrupted phrases, the visual encoder the image with the
masked tags, and the cross-modal encoder their outputs. VSC, MCR, ITM (its positive pass and
the encodings its negatives reuse), MLM and WPG all read these features, so a step encodes each
modality once:

  corrupted_text    encode_text(batch['mlm_ids'], batch['text_mask']); ctx.text (the clean
                    `text_ids`) when the batch has no `mlm_ids` (fine-tuning, evaluation)
  corrupted_image   encode_image(batch['image'], concept_ids=batch['concept_mlm_ids'],
                    concept_mask=batch['concept_mask']); ctx.image (clean tags, or none) when
                    the batch has no `concept_mlm_ids`
  corrupted_fusion  fuse(corrupted_text, text_mask, corrupted_image, its mask): dict(text_states
                    [B,L,D], image_states [B,N,D], ...)
"""
from vlpjax.objectives import context


@context.feature("corrupted_text")
def corrupted_text(ctx):
  """dict(states [B,L,D], ...) of the corrupted text (the clean text without `mlm_ids`)."""
  if "mlm_ids" not in ctx.batch:
    return ctx.text
  return ctx.student.encode_text(ctx.batch["mlm_ids"], ctx.batch["text_mask"])


@context.feature("corrupted_image")
def corrupted_image(ctx):
  """dict(states [B,N,Dv], mask, ...) of the image with the corrupted tags (clean without them)."""
  batch = ctx.batch
  if "concept_mlm_ids" not in batch:
    return ctx.image
  return ctx.student.encode_image(batch["image"], concept_ids=batch["concept_mlm_ids"],
                                  concept_mask=batch["concept_mask"])


@context.feature("corrupted_fusion")
def corrupted_fusion(ctx):
  """The cross-modal pass of the corrupted pair (MVPTR's positive pass)."""
  image = ctx.corrupted_image
  return ctx.student.fuse(ctx.corrupted_text["states"], ctx.batch["text_mask"], image["states"],
                          image.get("mask"))
