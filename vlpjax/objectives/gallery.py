"""The CMC patch gallery's bank (VLMixer), kept as the state of this objective.

The bank holds, per concept, the S most recent gallery entries of the image-only stream (a ring
buffer): their pooled patch features [C, S, P, Dv] (stop-gradient outputs of the online ViT), cell
boxes [C, S, P, 4] and source image ids [C, S]. After every `refresh_every`-th step the step's
image batch is written into it (at most S entries per concept per write, in the batch's order).
`vlpjax/objectives/cmc.py` draws from it when the step's own image batch has no entry of a
concept (`config.model.gallery_source`).

The objective's loss is 0: it exists to own, checkpoint and update the bank, and it logs how
full the bank is and where the step's CMC occurrences found their entries.
"""
import jax
import jax.numpy as jnp

from vlpjax.objectives import cmc
from vlpjax.objectives import registry


def init_bank(cfg, model_config, rng):
  """An empty bank: zeros, image ids -1, counts and write pointers 0."""
  del rng
  slots = int(cfg.get("slots", 8))
  num_concepts = int(getattr(model_config, "num_concepts", 0))
  if num_concepts < 1 or slots < 1:
    raise ValueError(f"objective 'gallery' needs config.model.num_concepts > 0 and slots > 0 (got "
                     f"{num_concepts}, {slots}); is config.model.kind 'vlmixer'?")
  p = model_config.entry_tokens
  return dict(features=jnp.zeros((num_concepts, slots, p, model_config.vision.width), jnp.float32),
              boxes=jnp.zeros((num_concepts, slots, p, 4), jnp.float32),
              image_id=jnp.full((num_concepts, slots), -1, jnp.int32),
              count=jnp.zeros((num_concepts,), jnp.int32),
              ptr=jnp.zeros((num_concepts,), jnp.int32))


def write_bank(bank: dict, features, boxes, concepts, image_id) -> dict:
  """The bank after writing a batch of entries (see the module docstring).

  Args:
    bank: init_bank's dict.
    features [E, P, Dv], boxes [E, P, 4], concepts int32 [E] (-1 = no entry), image_id int32 [E].

  Entry e of concept c with rank r among that concept's entries in the batch (batch order) is
  written to slot (ptr[c] + r) mod S when r < S; then ptr[c] += min(n_c, S) (mod S) and
  count[c] = min(count[c] + n_c, S).
  """
  num_concepts, slots = bank["image_id"].shape
  order, first, count = cmc.concept_index(concepts, num_concepts)
  position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  key = jnp.where(concepts >= 0, concepts, num_concepts)
  rank = position - first[key]
  write = (concepts >= 0) & (concepts < num_concepts) & (rank < slots)
  c = jnp.where(write, concepts, num_concepts)  # out of range: dropped by the scatter
  slot = (bank["ptr"][jnp.clip(concepts, 0, num_concepts - 1)] + rank) % slots
  n = count[:num_concepts]
  return dict(
      features=bank["features"].at[c, slot].set(features.astype(bank["features"].dtype), mode="drop"),
      boxes=bank["boxes"].at[c, slot].set(boxes.astype(jnp.float32), mode="drop"),
      image_id=bank["image_id"].at[c, slot].set(image_id.astype(jnp.int32), mode="drop"),
      count=jnp.minimum(bank["count"] + n, slots).astype(jnp.int32),
      ptr=((bank["ptr"] + jnp.minimum(n, slots)) % slots).astype(jnp.int32))


def update_bank(ctx, batch, bank):
  """After the step: the step's image-batch entries (student, no gradient) into the bank."""
  del batch
  entries = ctx.mixer_image
  flat = lambda x: jax.lax.stop_gradient(x.reshape((-1,) + x.shape[2:]))
  new = write_bank(bank, flat(entries["features"]), flat(entries["boxes"]), flat(entries["concepts"]),
                   flat(entries["image_id"]))
  every = int(ctx.cfg.get("refresh_every", 1))
  if every <= 1:
    return new
  due = ctx.step % every == 0
  return jax.tree.map(lambda a, b: jnp.where(due, a, b), new, bank)


def check_gallery(cfg, config) -> None:
  if int(cfg.get("slots", 8)) < 1:
    raise ValueError(f"config.objectives.gallery.slots must be >= 1, got {cfg.get('slots')}")
  if int(cfg.get("refresh_every", 1)) < 1:
    raise ValueError(f"config.objectives.gallery.refresh_every must be >= 1, got {cfg.get('refresh_every')}")
  if config.model.get("kind") != "vlmixer":
    raise ValueError("objective 'gallery' needs config.model.kind = 'vlmixer'")


@registry.register("gallery", init_state=init_bank, update_state=update_bank, check=check_gallery)
def gallery_loss(ctx, batch):
  """Loss 0; metrics on the bank (before this step's write) and on this step's draws.

  Config: `slots` (S, default 8), `refresh_every` (default 1), weight (any; the loss is 0).

  Returns:
    (0, {'filled': fraction of concepts with an entry, 'slots_used': mean count / S,
    'from_batch', 'from_bank', 'empty': fractions of the replaced occurrences}).
  """
  bank = ctx.state
  metrics = {"filled": jnp.mean(bank["count"] > 0).astype(jnp.float32),
             "slots_used": jnp.mean(bank["count"] / bank["image_id"].shape[1]).astype(jnp.float32)}
  if cmc.TEXT in batch:
    draws = ctx.cmc_draws
    replaced = jnp.maximum(jnp.sum(draws["use_batch"] | draws["use_bank"] | draws["empty"]), 1)
    for name, key in (("from_batch", "use_batch"), ("from_bank", "use_bank"), ("empty", "empty")):
      metrics[name] = (jnp.sum(draws[key]) / replaced).astype(jnp.float32)
  return jnp.zeros((), jnp.float32), metrics
