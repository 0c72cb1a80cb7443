"""Cross-modal CutMix on the accelerator: gallery draws and the encodings of mixed sequences, as
context features shared by VLMixer's objectives (`cmcl`, `mixed_mlm`, `gallery`, `tag_mlm`,
`tag_match`). The host decided which grounded occurrences are replaced and laid out the mixed
sequences (`input_pipeline/ops_mix.py`); here each replaced occurrence gets the visual tokens of
a gallery entry of its concept.

The step's batch has two streams (`config.input.streams`, `vlpjax.data`): batch['text'] (the
text-only stream: text_ids, text_mask, mix_*, cmc_*, mix_mlm_*) and batch['image'] (the
image-only stream: image, image_id, object_boxes, object_concepts, tag_*). Bt / Bi = their
global batches, K occurrences per sentence, P visual tokens per entry, M objects per image,
E = Bi * M entries of the step's image batch, C concepts, S bank slots per concept.

Gallery entries (docs/method_spec.md §4.2 A, [D]): an object of the image-only stream becomes an entry
of its concept: its box split into the model's entry grid (P cells), each cell the mean of the
ViT patch states whose centres fall in it, plus the cell's box. Where an occurrence's entry comes
from is `config.model.gallery_source`:
  batch_then_bank (default)  an entry of the step's own image batch, encoded by the online ViT
                             (so the mixing losses train the ViT too), drawn uniformly among
                             that concept's entries; when the batch has none, one of the bank's
                             stored entries (the `gallery` objective's state: stop-gradient
                             online features of earlier image batches, S per concept, refreshed
                             every `refresh_every` steps);
  batch                      the step's image batch only;
  bank                       the bank only.
An occurrence with no entry available (a concept absent from the batch before the bank holds
it) keeps its P slots but they are masked out of attention: the view simply drops the word.
The draw is `cmc_draw` (uniform [0, 1), from the host's (seed, step) batch seed): entry
floor(u * n) of the n candidates, in the image batch's order.
"""
import jax
import jax.numpy as jnp

from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry

TEXT, IMAGE = "text", "image"
SOURCES = ("batch_then_bank", "batch", "bank")
TEXT_KEYS = ("text_ids", "text_mask", "mix_ids", "mix_mask", "mix_positions", "mix_types", "mix_slot",
             "cmc_concept", "cmc_replaced", "cmc_draw", "cmc_valid")
IMAGE_KEYS = ("image", "object_boxes", "object_concepts")


def stream(batch, name: str, keys=(), objective: str = "") -> dict:
  """batch[name] (a stream of a several-stream step), checked to hold `keys`."""
  if name not in batch or not hasattr(batch[name], "keys"):
    raise KeyError(f"objective {objective!r} reads the {name!r} input stream (config.input.streams.{name}); "
                   f"the batch has {sorted(batch)}")
  registry.require_batch_keys(batch[name], keys, f"{objective} (stream {name!r})")
  return batch[name]


# ----------------------------------------------------------------------------- draws (pure)


def concept_index(concepts: jax.Array, num_concepts: int):
  """Sorts entries by concept: (order [E], first [C + 1], count [C + 1]); invalid (< 0) last."""
  key = jnp.where(concepts >= 0, concepts, num_concepts)
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  values = jnp.arange(num_concepts + 1)
  first = jnp.searchsorted(sorted_key, values, side="left")
  count = jnp.searchsorted(sorted_key, values, side="right") - first
  return order, first, count


def draw_entries(concept, replaced, draw, entry_concepts, bank_count, *, num_concepts: int, source: str):
  """Which entry each replaced occurrence takes (see the module docstring).

  Args:
    concept, replaced, draw: [Bt, K] int32 / bool / float32 (cmc_concept, cmc_replaced, cmc_draw).
    entry_concepts: int32 [E], concept of each entry of the step's image batch (-1 = none).
    bank_count: int32 [C] filled bank slots per concept (zeros without a bank).
    num_concepts: C. source: one of SOURCES.

  Returns:
    dict(use_batch, use_bank, empty bool [Bt, K]; batch_index int32 [Bt, K] into the E entries;
    bank_slot int32 [Bt, K]; concept int32 [Bt, K] clipped to [0, C)).
  """
  if source not in SOURCES:
    raise ValueError(f"config.model.gallery_source must be one of {SOURCES}, got {source!r}")
  c = jnp.clip(concept, 0, num_concepts - 1)
  replaced = replaced & (concept >= 0) & (concept < num_concepts)
  order, first, count = concept_index(entry_concepts, num_concepts)
  n_batch = count[c]
  pick = first[c] + jnp.minimum(jnp.floor(draw * n_batch).astype(jnp.int32), jnp.maximum(n_batch - 1, 0))
  batch_index = order[jnp.clip(pick, 0, entry_concepts.shape[0] - 1)]
  n_bank = bank_count[c]
  bank_slot = jnp.minimum(jnp.floor(draw * n_bank).astype(jnp.int32), jnp.maximum(n_bank - 1, 0))
  has_batch, has_bank = n_batch > 0, n_bank > 0
  if source == "batch":
    use_batch, use_bank = has_batch, jnp.zeros_like(has_batch)
  elif source == "bank":
    use_batch, use_bank = jnp.zeros_like(has_bank), has_bank
  else:
    use_batch, use_bank = has_batch, ~has_batch & has_bank
  use_batch, use_bank = use_batch & replaced, use_bank & replaced
  return dict(use_batch=use_batch, use_bank=use_bank, empty=replaced & ~use_batch & ~use_bank,
              batch_index=batch_index.astype(jnp.int32), bank_slot=bank_slot, concept=c.astype(jnp.int32))


def gather_entries(draws: dict, entries: dict, bank: dict | None):
  """The drawn entries' features [Bt, K, P, Dv], cell boxes [Bt, K, P, 4] and image ids [Bt, K]
  (-1 where none); in-batch entries keep their gradient, bank entries have none."""
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  features = flat(entries["features"])[draws["batch_index"]]
  boxes = flat(entries["boxes"])[draws["batch_index"]]
  image_id = flat(entries["image_id"])[draws["batch_index"]]
  use_batch = draws["use_batch"]
  if bank is not None:
    c, s = draws["concept"], draws["bank_slot"]
    use_bank = draws["use_bank"]
    features = jnp.where(use_bank[..., None, None], bank["features"][c, s].astype(features.dtype), features)
    boxes = jnp.where(use_bank[..., None, None], bank["boxes"][c, s], boxes)
    image_id = jnp.where(use_bank, bank["image_id"][c, s], image_id)
    use_batch = use_batch | use_bank
  image_id = jnp.where(use_batch, image_id, -1)
  return features, boxes, image_id


def scatter_visual(visual: jax.Array, mix_slot: jax.Array) -> jax.Array:
  """Per-occurrence visual tokens [B, K, P, D] placed at the mixed sequence's slots [B, Lm]
  (zeros at word positions): [B, Lm, D]."""
  b, k, p, d = visual.shape
  flat = visual.reshape(b, k * p, d)
  taken = jnp.take_along_axis(flat, jnp.clip(mix_slot, 0, k * p - 1)[..., None], axis=1)
  return jnp.where((mix_slot >= 0)[..., None], taken, 0)


def mixed_mask(mix_mask: jax.Array, mix_slot: jax.Array, empty: jax.Array, entry_tokens: int) -> jax.Array:
  """`mix_mask` with the slots of occurrences that got no entry masked out."""
  occurrence = jnp.clip(mix_slot // entry_tokens, 0, empty.shape[1] - 1)
  dropped = (mix_slot >= 0) & jnp.take_along_axis(empty, occurrence, axis=1)
  return jnp.where(dropped, 0, mix_mask).astype(jnp.int32)


# ----------------------------------------------------------------------------- features


def _side(ctx, side: str):
  return ctx.student if side == "student" else ctx.teacher


def image_entries(ctx, side: str) -> dict:
  """Patch states of the image stream and its objects' entries (one ViT pass per side)."""
  images = stream(ctx.batch, IMAGE, IMAGE_KEYS, ctx.name)
  fns = _side(ctx, side)
  patches = fns.patch_states(images["image"])
  features, boxes = fns.pool_entries(patches, images["object_boxes"])
  image_id = images.get("image_id", jnp.full(images["object_concepts"].shape[:1], -1, jnp.int32))
  return dict(patches=patches, features=features, boxes=boxes, concepts=images["object_concepts"],
              image_id=jnp.broadcast_to(image_id[:, None], images["object_concepts"].shape).astype(jnp.int32))


@context_lib.feature("mixer_image")
def _mixer_image(ctx):
  """Student ViT patch states [Bi, N, Dv] of the image stream and its entries (`image_entries`)."""
  return image_entries(ctx, "student")


@context_lib.feature("ema_mixer_image")
def _ema_mixer_image(ctx):
  return image_entries(ctx, "teacher")


def gallery_state(ctx) -> dict | None:
  return ctx.objective_state.get("gallery")


def check_gallery_source(cfg, config) -> None:
  """Config check of the objectives that read the CMC draws (before any compute): a gallery source
  other than 'batch' reads the bank that the `gallery` objective keeps."""
  del cfg
  source = config.model.get("gallery_source", "batch")
  if source != "batch" and "gallery" not in config.objectives:
    raise ValueError(f"config.model.gallery_source={source!r} reads the gallery bank: add the 'gallery' "
                     "objective (config.objectives.gallery) or use gallery_source='batch'")


@context_lib.feature("cmc_draws")
def _cmc_draws(ctx):
  """`draw_entries` of the text stream's replaced occurrences (no gradient, shared by both sides)."""
  text = stream(ctx.batch, TEXT, TEXT_KEYS, ctx.name)
  model_config = ctx.model_config
  bank = gallery_state(ctx)
  source = model_config.gallery_source
  if source != "batch" and bank is None:
    raise ValueError(f"config.model.gallery_source={source!r} reads the gallery bank: add the 'gallery' "
                     "objective (config.objectives.gallery) or use gallery_source='batch'")
  bank_count = bank["count"] if bank is not None else jnp.zeros((model_config.num_concepts,), jnp.int32)
  return draw_entries(text["cmc_concept"], text["cmc_replaced"], text["cmc_draw"],
                      ctx.mixer_image["concepts"].reshape(-1), bank_count,
                      num_concepts=model_config.num_concepts, source=source)


def mixed_inputs(ctx, side: str) -> dict:
  """The visual tokens [Bt, Lm, D], attention mask [Bt, Lm] and entry image ids [Bt, K] of the
  text stream's mixed sequences, with `side`'s (student / teacher) encoder."""
  text = stream(ctx.batch, TEXT, TEXT_KEYS, ctx.name)
  entries = ctx.mixer_image if side == "student" else ctx.ema_mixer_image
  draws = ctx.cmc_draws
  features, boxes, image_id = gather_entries(draws, entries, gallery_state(ctx))
  visual = _side(ctx, side).visual_tokens(features, boxes)
  return dict(visual=scatter_visual(visual, text["mix_slot"]),
              mask=mixed_mask(text["mix_mask"], text["mix_slot"], draws["empty"], features.shape[2]),
              entry_image_id=image_id)


@context_lib.feature("mixed_inputs")
def _mixed_inputs(ctx):
  return mixed_inputs(ctx, "student")


def encode_mixed(ctx, side: str, ids_key: str) -> dict:
  text = stream(ctx.batch, TEXT, TEXT_KEYS + (ids_key,), ctx.name)
  inputs = ctx.mixed_inputs if side == "student" else mixed_inputs(ctx, "teacher")
  out = _side(ctx, side).encode_mixed(text[ids_key], inputs["mask"], text["mix_types"], text["mix_positions"],
                                      inputs["visual"])
  out["mask"] = inputs["mask"]
  return out


@context_lib.feature("mixed_clean")
def _mixed_clean(ctx):
  """Student encoder states of the mixed sequences (clean words): dict(states [Bt, Lm, D], mask)."""
  return encode_mixed(ctx, "student", "mix_ids")


@context_lib.feature("ema_mixed_clean")
def _ema_mixed_clean(ctx):
  return encode_mixed(ctx, "teacher", "mix_ids")


@context_lib.feature("mixed_masked_fusion")
def _mixed_masked_fusion(ctx):
  """Student encoder + merged layers over the MLM-masked mixed sequences: dict(text_states
  [Bt, Lm, D], mask)."""
  encoded = encode_mixed(ctx, "student", "mix_mlm_ids")
  fused = ctx.student.fuse_sequence(encoded["states"], encoded["mask"])
  return dict(fused, mask=encoded["mask"])


@context_lib.feature("orig_text")
def _orig_text(ctx):
  """Student encoder states of the text stream's original sentences."""
  text = stream(ctx.batch, TEXT, ("text_ids", "text_mask"), ctx.name)
  return ctx.student.encode_text(text["text_ids"], text["text_mask"])


@context_lib.feature("ema_orig_text")
def _ema_orig_text(ctx):
  text = stream(ctx.batch, TEXT, ("text_ids", "text_mask"), ctx.name)
  return ctx.teacher.encode_text(text["text_ids"], text["text_mask"])


@context_lib.feature("image_sentence")
def _image_sentence(ctx):
  """Student encoder states of the image stream's images as image sentences: dict(states
  [Bi, 2 + T, D], mask)."""
  x, mask = ctx.student.image_sentence(ctx.mixer_image["patches"])
  return dict(ctx.student.encode_embedded(x, mask), mask=mask)
