"""Tag-aided visual pretraining, tag-image matching (VLMixer on image-only data, docs/method_spec.md §4.2 F):
does `[CLS] tags [SEP]` describe the image? Negatives are the tags of other images."""
import jax
import jax.numpy as jnp

from vlpjax.objectives import cmc
from vlpjax.objectives import registry


def negative_tags(tag_ids: jax.Array, tag_mask: jax.Array, shift: int = 1):
  """The tags of image (b + shift) mod B for image b, and whether they differ from b's own.

  Returns (ids [B, T], mask [B, T], differs bool [B]): a negative whose tag ids equal the
  positive's (the same tag set in the same order) is no negative and is left out of the loss.
  """
  ids, mask = jnp.roll(tag_ids, -shift, axis=0), jnp.roll(tag_mask, -shift, axis=0)
  differs = jnp.any((ids != tag_ids) & ((mask > 0) | (tag_mask > 0)), axis=1)
  return ids, mask, differs


def match_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  """Weighted mean CE of 2-way logits [N, 2] with labels [N] and weights [N]; and accuracy."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  total = jnp.maximum(jnp.sum(weights), 1.0)
  loss = -jnp.sum(weights * picked) / total
  accuracy = jnp.sum(weights * (jnp.argmax(log_probs, axis=-1) == labels)) / total
  return loss, accuracy


@registry.register("tag_match", heads=("itm",))
def tag_match_loss(ctx, batch):
  """Tag-image matching on the image-only stream.

  Inputs (Bi images, T tag tokens):
    batch['image']['tag_ids'], ['tag_mask'] [Bi, T]: `[CLS] tags [SEP]` (clean);
    ctx.image_sentence: the encoder's states of each image sentence.
  Pairs: (tags_b, image_b) labelled 1, and (tags_{(b+1) mod Bi}, image_b) labelled 0 (the global
  batch is shuffled, so the neighbour is a random other image); a negative whose tags equal the
  positive's is dropped (`negative_tags`). Each pair: encoder over the tags, merged layers over
  [tags ; image sentence], the `itm` head on the first (CLS) state.

  Formula: loss = mean over the kept pairs of -log softmax(itm_logits)[label].

  Returns:
    (loss, {'loss', 'accuracy', 'negatives' (fraction of images with a kept negative)}).
  """
  image = cmc.stream(batch, cmc.IMAGE, ("tag_ids", "tag_mask"), "tag_match")
  sentence = ctx.image_sentence
  neg_ids, neg_mask, differs = negative_tags(image["tag_ids"], image["tag_mask"])
  ids = jnp.concatenate([image["tag_ids"], neg_ids])
  mask = jnp.concatenate([image["tag_mask"], neg_mask])
  tags = ctx.student.encode_text(ids, mask)
  image_states = jnp.concatenate([sentence["states"], sentence["states"]])
  image_mask = jnp.concatenate([sentence["mask"], sentence["mask"]])
  fused = ctx.student.fuse(tags["states"], mask, image_states, image_mask)
  logits = ctx.student.itm_logits(fused["text_states"][:, 0])
  num = image["tag_ids"].shape[0]
  labels = jnp.concatenate([jnp.ones((num,), jnp.int32), jnp.zeros((num,), jnp.int32)])
  weights = jnp.concatenate([jnp.ones((num,), jnp.float32), differs.astype(jnp.float32)])
  loss, accuracy = match_loss(logits, labels, weights)
  return loss, {"loss": loss, "accuracy": accuracy, "negatives": jnp.mean(differs.astype(jnp.float32))}
