"""Synthetic batches of the unpaired formats (`text_only`, `image_only`; VLMixer) for benchmarks and
tests: the keys, shapes and dtypes the input pipeline gives (`input_pipeline/unpaired.py`,
`ops_mix.py`), random contents made on device.

text_only: sentences of random length with K one-token grounded occurrences at tokens 2, 4, ...,
each replaced with probability 1/2; the mixed layout follows `ops_mix.cmc_layout`'s rule.
image_only: random pixels, M random boxes (the last object of each image absent), random tags.
"""
import jax
import jax.numpy as jnp

from vlpjax import synthetic


def _text_sizes(config, cfg, batch):
  length = int(cfg.get("max_len", 25))
  spans = int(cfg.get("max_spans", 4))
  p = int(cfg.get("entry_tokens", 4))
  return batch, length, spans, p, length + spans * (p - 1)


def text_shapes(config, cfg, batch: int) -> dict:
  b, length, k, _, mixed = _text_sizes(config, cfg, batch)
  i32 = jnp.int32
  shapes = {key: (b, length) for key in ("text_ids", "text_mask")}
  shapes.update({key: (b, mixed) for key in ("mix_ids", "mix_mask", "mix_positions", "mix_types", "mix_slot",
                                             "mix_mlm_ids", "mix_mlm_labels")})
  shapes.update({key: (b, k) for key in ("span_start", "span_end", "span_concept", "cmc_concept")})
  out = {key: jax.ShapeDtypeStruct(shape, i32) for key, shape in shapes.items()}
  out.update(cmc_replaced=jax.ShapeDtypeStruct((b, k), jnp.bool_), cmc_draw=jax.ShapeDtypeStruct((b, k), jnp.float32),
             cmc_valid=jax.ShapeDtypeStruct((b,), jnp.bool_), image_id=jax.ShapeDtypeStruct((b,), i32))
  return out


def make_text(rng, step, shapes, config, cfg) -> dict:
  b, length, k, p, mixed = _text_sizes(config, cfg, shapes["text_ids"].shape[0])
  vocab = int(config.model.text.vocab_size)
  num_concepts = max(int(config.model.get("num_concepts", 1)), 1)
  keys = jax.random.split(rng, 6)
  lengths = jax.random.randint(keys[0], (b, 1), max(2, length // 2), length + 1)
  text_mask = (jnp.arange(length)[None, :] < lengths).astype(jnp.int32)
  text_ids = jnp.where(text_mask > 0, jax.random.randint(keys[1], (b, length), 5, vocab), 0).at[:, 0].set(2)
  start = jnp.broadcast_to(2 + 2 * jnp.arange(k), (b, k))
  exists = start < lengths
  concept = jnp.where(exists, jax.random.randint(keys[2], (b, k), 0, num_concepts), -1)
  replaced = exists & (jax.random.uniform(keys[3], (b, k)) < 0.5)
  # One-token spans: a replaced token becomes P slots, every other token one.
  token = jnp.arange(length)
  first = jnp.any((token[None, None, :] == start[..., None]) & replaced[..., None], axis=1)  # [b, L]
  occurrence = jnp.argmax((token[None, None, :] == start[..., None]), axis=1)               # [b, L]
  count = jnp.where(first, p, 1)
  out_start = jnp.cumsum(count, axis=1) - count
  rows = jnp.arange(b)[:, None]
  base = lambda value: jnp.full((b, mixed), value, jnp.int32)
  offsets = jnp.arange(p)
  cols = out_start[..., None] + jnp.where(first[..., None], offsets, 0)                       # [b, L, P]
  keep = first[..., None] | (offsets == 0)
  cols = jnp.where(keep, cols, mixed)  # dropped by the scatter
  rows3 = jnp.broadcast_to(rows[..., None], cols.shape)

  def put(target, values):
    return target.at[rows3, cols].set(jnp.broadcast_to(values, cols.shape).astype(jnp.int32), mode="drop")

  visual = first[..., None]
  mix_ids = put(base(0), jnp.where(visual, 0, text_ids[..., None]))
  mix_mask = put(base(0), jnp.where(visual, 1, text_mask[..., None]))
  mix_positions = put(base(0), token[None, :, None])
  mix_types = put(base(0), visual.astype(jnp.int32))
  mix_slot = put(base(-1), jnp.where(visual, occurrence[..., None] * p + offsets, -1))
  selected = (jax.random.uniform(keys[4], (b, mixed)) < 0.15) & (mix_mask > 0) & (mix_types == 0)
  selected = selected.at[:, 0].set(False)
  return dict(text_ids=text_ids, text_mask=text_mask, mix_ids=mix_ids, mix_mask=mix_mask,
              mix_positions=mix_positions, mix_types=mix_types, mix_slot=mix_slot,
              mix_mlm_ids=jnp.where(selected, 4, mix_ids), mix_mlm_labels=jnp.where(selected, mix_ids, -1),
              span_start=jnp.where(exists, start, -1), span_end=jnp.where(exists, start + 1, -1),
              span_concept=concept, cmc_concept=concept, cmc_replaced=replaced,
              cmc_draw=jax.random.uniform(keys[5], (b, k)), cmc_valid=jnp.any(replaced, axis=1),
              image_id=(step * b + jnp.arange(b)).astype(jnp.int32))


def image_shapes(config, cfg, batch: int) -> dict:
  size = int(config.model.vision.image_size)
  m, t = int(cfg.get("max_objects", 8)), int(cfg.get("max_tags", 16))
  i32 = jnp.int32
  out = dict(image=jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
             image_id=jax.ShapeDtypeStruct((batch,), i32),
             object_boxes=jax.ShapeDtypeStruct((batch, m, 4), jnp.float32),
             object_concepts=jax.ShapeDtypeStruct((batch, m), i32))
  out.update({key: jax.ShapeDtypeStruct((batch, t), i32) for key in ("tag_ids", "tag_mask", "tag_mlm_ids",
                                                                       "tag_mlm_labels")})
  return out


def make_image(rng, step, shapes, config, cfg) -> dict:
  b, m, _ = shapes["object_boxes"].shape
  t = shapes["tag_ids"].shape[1]
  vocab = int(config.model.text.vocab_size)
  num_concepts = max(int(config.model.get("num_concepts", 1)), 1)
  keys = jax.random.split(rng, 6)
  corner = jax.random.uniform(keys[0], (b, m, 2), maxval=0.7)
  side = jax.random.uniform(keys[1], (b, m, 2), minval=0.1, maxval=0.3)
  boxes = jnp.concatenate([corner, corner + side], axis=-1)
  present = jnp.arange(m) < m - 1
  concepts = jnp.where(present, jax.random.randint(keys[2], (b, m), 0, num_concepts), -1)
  tag_mask = (jnp.arange(t)[None, :] < jnp.minimum(2 * m + 1, t)).astype(jnp.int32) * jnp.ones((b, 1), jnp.int32)
  tag_ids = jnp.where(tag_mask > 0, jax.random.randint(keys[3], (b, t), 5, vocab), 0).at[:, 0].set(2)
  selected = (jax.random.uniform(keys[4], (b, t)) < 0.15) & (tag_mask > 0)
  return dict(image=jax.random.normal(keys[5], shapes["image"].shape, jnp.float32),
              image_id=(step * b + jnp.arange(b)).astype(jnp.int32),
              object_boxes=jnp.where(present[None, :, None], boxes, 0.0), object_concepts=concepts,
              tag_ids=tag_ids, tag_mask=tag_mask, tag_mlm_ids=jnp.where(selected, 4, tag_ids),
              tag_mlm_labels=jnp.where(selected, tag_ids, -1))


synthetic.register_format("text_only", shapes=text_shapes, make=make_text)
synthetic.register_format("image_only", shapes=image_shapes, make=make_image)
