"""Tag-aided visual pretraining, tag-image contrast (VLMixer on image-only data, docs/method_spec.md §4.2 F:
"a tag-image matching/contrastive term"; the contrastive form is a vlpjax option [D]).

An image's tag sentence `[CLS] tags [SEP]` and its image sentence (`[CLS] patch tokens [SEP]`,
`models/mixer.py`) are encoded apart by the shared encoder and projected by the `cmcl` head; a
symmetric InfoNCE over the image batch pulls each image to its own tags, the other images' tags
being the negatives. It trains exactly the pathway zero-shot retrieval scores with (an image
sentence against a sentence), from image-only data: the tags are the image's object labels, no
caption is read.
"""
import jax.numpy as jnp

from vlpjax.objectives import cmc
from vlpjax.objectives import cmcl
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry


@context_lib.feature("tag_text")
def _tag_text(ctx):
  """Encoder states of the image stream's clean tag sentences."""
  image = cmc.stream(ctx.batch, cmc.IMAGE, ("tag_ids", "tag_mask"), ctx.name)
  return ctx.student.encode_text(image["tag_ids"], image["tag_mask"])


def same_tags(tag_ids, tag_mask):
  """bool [B, B]: images b and c have the same tag sequence (c = b included)."""
  ids = jnp.where(tag_mask > 0, tag_ids, -1)
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


@registry.register("tag_contrast", heads=("cmcl",))
def tag_contrast_loss(ctx, batch):
  """Symmetric InfoNCE between each image sentence and its tag sentence.

  Inputs (Bi images, E embedding width):
    z_i = project(CLS of the encoder over the image sentence), z_t = project(CLS over
    `[CLS] tags [SEP]`), [Bi, E] unit norm (`cmcl` head, its temperature);
    batch['image']['tag_ids'], ['tag_mask'].
  Another image with the very same tag sequence is no negative: its column is masked out
  (`same_tags`), for both directions.

  Formula: loss = 1/2 (NCE(z_i -> z_t) + NCE(z_t -> z_i)), NCE = `cmcl.masked_info_nce` with
  row b's keys restricted to b and the images whose tags differ from b's.

  Returns:
    (loss, {'loss', 'i2t_accuracy', 't2i_accuracy'}) (in-batch, over the unmasked columns).
  """
  image = cmc.stream(batch, cmc.IMAGE, ("tag_ids", "tag_mask"), "tag_contrast")
  z_i = ctx.student.project_image(ctx.image_sentence["states"][:, 0]).astype(jnp.float32)
  z_t = ctx.student.project_text(ctx.tag_text["states"][:, 0]).astype(jnp.float32)
  temp = ctx.student.temperature()
  num = z_i.shape[0]
  allowed = ~same_tags(image["tag_ids"], image["tag_mask"]) | jnp.eye(num, dtype=bool)
  losses, metrics = [], {}
  for name, queries, keys in (("i2t", z_i, z_t), ("t2i", z_t, z_i)):
    logits = jnp.where(allowed, queries @ keys.T / temp, cmcl._NEG)  # pylint: disable=protected-access
    log_probs = logits - jnp.max(logits, axis=-1, keepdims=True)
    log_probs = log_probs - jnp.log(jnp.sum(jnp.exp(log_probs), axis=-1, keepdims=True))
    losses.append(-jnp.mean(jnp.diagonal(log_probs)))
    metrics[f"{name}_accuracy"] = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(num))
  loss = 0.5 * (losses[0] + losses[1])
  return loss, dict(metrics, loss=loss)
