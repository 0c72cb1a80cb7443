"""Unpaired-data ops (VLMixer): grounded words as token spans, cross-modal CutMix (CMC) as a
batch operation, and object tags of an image-only example.

Registered ops (TF only; randomness from `example['_seed']` with a fixed salt per op):

    ground_words(grounding, demo_config, data_dir, max_words, max_spans, max_len, key='caption')
        per example, after clean_caption and tokenize
    cmc(p, entry_tokens, min_replaced=0, max_spans=None)          per batch
    object_tags(concept_vocab, demo_config, data_dir, max_objects, label_field, shuffle=True)
        per example, on an image-only example

Cross-modal CutMix (docs/method_spec.md §4.2 C) is decided here, on the host: for each grounded
occurrence k of a sentence, independently with probability `p`, its token span is replaced by
`entry_tokens` (P) visual-token slots, which the model fills on the accelerator with a gallery
entry of the occurrence's concept (`vlpjax/objectives/cmc.py`). The mixed sequence keeps every
other token and its position; the P slots all take the position of the span's first token and
modality type 1. Its length is fixed, Lm = L + K (P - 1), which holds any outcome (a span has
at least one token), padded at the end. Batch fields written (B sentences, K occurrences):

  mix_ids    int32 [B, Lm]  word ids; the pad id at visual slots and padding
  mix_mask   int32 [B, Lm]  1 on words and visual slots
  mix_positions int32 [B, Lm]  position index: a word keeps its index in `text_ids`; a visual
                             slot takes its span's first token index
  mix_types  int32 [B, Lm]  0 word, 1 visual
  mix_slot   int32 [B, Lm]  k * P + p for visual slot p of occurrence k, -1 elsewhere
  cmc_concept int32 [B, K]  concept of occurrence k (-1 = no occurrence)
  cmc_replaced bool [B, K]  occurrence k is replaced in this step's view
  cmc_draw   float32 [B, K]  a uniform [0, 1) draw that picks the gallery entry (on device)
  cmc_valid  bool [B]       at least one occurrence is replaced (else the view equals the
                            sentence, and the contrast leaves it out)

Then `mask_tokens(prob, key='mix')` masks 15% of the remaining word tokens (visual slots carry
the pad id, which is never masked): mix_mlm_ids, mix_mlm_labels.
"""
import zlib

import tensorflow as tf

from input_pipeline import grounding
from input_pipeline import registry
from input_pipeline.ops_image import example_seed

_SALT_CMC = zlib.crc32(b"cmc") & 0x7FFFFFFF
_SALT_TAGS = zlib.crc32(b"object_tags") & 0x7FFFFFFF


def _demo_or(path: str, demo_config: str, data_dir: str, name: str) -> str:
  """`path`, or the demo's annotation file `name` when it is ''."""
  if path:
    return path
  return grounding.demo_annotations(data_dir or None, demo_config)[name]


# ----------------------------------------------------------------------------- grounded words


def spans_from_string(value: tf.Tensor) -> tf.Tensor:
  """"s,e,c;s,e,c" -> int32 [n, 3] ('' -> [0, 3])."""

  def parse():
    parts = tf.strings.split(tf.strings.split(value, ";"), ",")
    return tf.reshape(tf.strings.to_number(parts.flat_values, tf.int32), [-1, 3])

  return tf.cond(tf.equal(value, ""), lambda: tf.zeros([0, 3], tf.int32), parse)


def token_spans(words: tf.Tensor, spans: tf.Tensor, token_counts: tf.Tensor, *, max_spans: int,
                max_len: int, offset: int = 1):
  """Word spans -> token spans of the `[CLS] tokens` sequence (`grounded_words` rule).

  Args:
    words: string [W] (only its length is read).
    spans: int32 [n, 3] (start_word, end_word, concept), end exclusive, sorted by start.
    token_counts: int32 [W], tokens of each word.
    max_spans: K, spans kept (the first K by start).
    max_len: text length; spans reaching past it (truncated) are dropped.
    offset: index of the first word's first token (1 after [CLS]).

  Returns:
    (start, end, concept) int32 [K] each, -1 where there is no span.
  """
  del words
  starts = tf.concat([[0], tf.cumsum(token_counts)], axis=0) + offset  # [W + 1]
  num_words = tf.shape(token_counts)[0]
  inside = tf.logical_and(spans[:, 0] >= 0, spans[:, 1] <= num_words)
  spans = tf.boolean_mask(spans, inside)
  token_start = tf.gather(starts, spans[:, 0])
  token_end = tf.gather(starts, spans[:, 1])
  keep = tf.logical_and(token_end <= max_len, token_end > token_start)
  out = tf.stack([tf.boolean_mask(token_start, keep), tf.boolean_mask(token_end, keep),
                  tf.boolean_mask(spans[:, 2], keep)], axis=1)[:max_spans]
  out = tf.pad(out, [[0, max_spans - tf.shape(out)[0]], [0, 0]], constant_values=-1)
  out.set_shape([max_spans, 3])
  return out[:, 0], out[:, 1], out[:, 2]


@registry.register("ground_words")
def ground_words(grounding_path: str = "", *, demo_config: str = "default", data_dir: str = "",
                 max_words: int = 30, max_spans: int = 4, max_len: int = 25,
                 kind: str = "sentencepiece", model: str | None = None, key: str = "caption"):
  """The grounded words of the cleaned caption `example[key]` as token spans.

  `grounding_path`: comma-separated `grounded_words annotate` outputs ('' = the demo's annotations
  for `demo_config`, built on first use); looked up by the cleaned caption, which must be
  `clean_caption(max_words)`'s output (`grounding.grounding_table`). Run after `tokenize(max_len)`
  with the same tokenizer (`kind`, `model`). Writes span_start, span_end, span_concept int32 [K].
  """
  from input_pipeline import ops_text  # pylint: disable=import-outside-toplevel
  if grounding_path:
    paths = tuple(p.strip() for p in grounding_path.split(",") if p.strip())
  else:
    demo = grounding.demo_annotations(data_dir or None, demo_config)
    paths = (demo["train"], demo["test"])
  table = grounding.grounding_table(paths, int(max_words))
  tokenizer = ops_text.load_tokenizer(kind, model)

  def fn(example):
    text = example[key]
    words = tf.strings.split(text, " ")
    counts = tf.cast(tokenizer.token_ids(words).row_lengths(), tf.int32)
    spans = spans_from_string(table.lookup(text))
    start, end, concept = token_spans(words, spans, counts, max_spans=max_spans, max_len=max_len)
    return {**example, "span_start": start, "span_end": end, "span_concept": concept}

  return fn


# ----------------------------------------------------------------------------- CMC


def cmc_layout(text_ids, text_mask, span_start, span_end, replace, *, entry_tokens: int, pad_id: int):
  """The mixed sequence of a batch (see the module docstring), given which occurrences to replace.

  Args:
    text_ids, text_mask: int32 [B, L].
    span_start, span_end: int32 [B, K] token spans (end exclusive, non-overlapping; -1 = none).
    replace: bool [B, K].
    entry_tokens: P.
    pad_id: the id written at visual slots and padding.

  Returns:
    dict(mix_ids, mix_mask, mix_positions, mix_types, mix_slot), int32 [B, L + K (P - 1)].
  """
  p = entry_tokens
  batch, length = tf.shape(text_ids)[0], tf.shape(text_ids)[1]
  num_spans = tf.shape(span_start)[1]
  out_len = length + num_spans * (p - 1)
  token = tf.range(length)[None, None, :]                                      # [1, 1, L]
  in_span = ((token >= span_start[..., None]) & (token < span_end[..., None])
             & replace[..., None])                                              # [B, K, L]
  covered = tf.reduce_any(in_span, axis=1)                                     # [B, L]
  first = tf.reduce_any((token == span_start[..., None]) & replace[..., None], axis=1)
  count = tf.where(covered, tf.where(first, p, 0), 1)
  out_start = tf.cumsum(count, axis=1, exclusive=True)                          # [B, L]
  rows = tf.broadcast_to(tf.range(batch)[:, None], [batch, length])
  positions = tf.broadcast_to(tf.range(length)[None, :], [batch, length])

  word = tf.where(~covered)                                                    # [n, 2]
  word_index = tf.stack([tf.gather_nd(rows, word), tf.gather_nd(out_start, word)], axis=1)
  # Visual slots: occurrence k's P slots start at its first token's output index.
  occurrence = tf.where(replace)                                               # [m, 2] (b, k)
  occ_start = tf.gather_nd(span_start, occurrence)                             # token index
  occ_out = tf.gather_nd(out_start, tf.stack([occurrence[:, 0], tf.cast(occ_start, tf.int64)], 1))
  slot = tf.range(p)[None, :]
  vis_rows = tf.broadcast_to(tf.cast(occurrence[:, :1], tf.int32), [tf.shape(occurrence)[0], p])
  vis_cols = occ_out[:, None] + slot
  vis_index = tf.reshape(tf.stack([vis_rows, vis_cols], axis=-1), [-1, 2])
  vis_slot = tf.reshape(tf.cast(occurrence[:, 1:], tf.int32) * p + slot, [-1])
  vis_position = tf.reshape(tf.broadcast_to(occ_start[:, None], tf.shape(vis_cols)), [-1])
  num_visual = tf.shape(vis_index)[0]

  def scatter(base, word_values, visual_values):
    out = tf.fill([batch, out_len], tf.constant(base, tf.int32))
    out = tf.tensor_scatter_nd_update(out, word_index, word_values)
    return tf.tensor_scatter_nd_update(out, vis_index, visual_values)

  return dict(
      mix_ids=scatter(pad_id, tf.gather_nd(text_ids, word), tf.fill([num_visual], pad_id)),
      mix_mask=scatter(0, tf.gather_nd(text_mask, word), tf.ones([num_visual], tf.int32)),
      mix_positions=scatter(0, tf.gather_nd(positions, word), vis_position),
      mix_types=scatter(0, tf.zeros_like(tf.gather_nd(text_ids, word)), tf.ones([num_visual], tf.int32)),
      mix_slot=scatter(-1, -tf.ones_like(tf.gather_nd(text_ids, word)), vis_slot))


@registry.register("cmc")
def cmc(p: float = 0.5, *, entry_tokens: int = 4, min_replaced: int = 0,
        kind: str = "sentencepiece", model: str | None = None, pad_id: int | None = None):
  """Cross-modal CutMix of a batch (see the module docstring); run per batch (batch_pp).

  Reads text_ids, text_mask [B, L], span_start, span_end, span_concept [B, K] and the batch
  seed. Each occurrence (span_concept >= 0) is replaced with probability `p`; with
  `min_replaced=1` a sentence that has an occurrence but drew none gets one, chosen uniformly.
  """
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"cmc: p must be in [0, 1], got {p}")
  if entry_tokens < 1:
    raise ValueError(f"cmc: entry_tokens must be >= 1, got {entry_tokens}")
  if min_replaced not in (0, 1):
    raise ValueError(f"cmc: min_replaced must be 0 or 1, got {min_replaced}")
  if pad_id is None:
    from input_pipeline import ops_text  # pylint: disable=import-outside-toplevel
    pad_id = ops_text.load_tokenizer(kind, model).pad_id

  def fn(batch):
    for field in ("text_ids", "text_mask", "span_start", "span_end", "span_concept"):
      if field not in batch:
        raise KeyError(f"cmc: the batch has no {field!r} (run tokenize and ground_words per "
                       f"example first); keys: {sorted(batch)}")
    if batch["text_ids"].shape.rank != 2:
      raise ValueError("cmc is a batch op (batch_pp): text_ids must be [B, L], got "
                       f"{batch['text_ids'].shape}")
    concept = tf.cast(batch["span_concept"], tf.int32)
    seed = example_seed(batch, _SALT_CMC, "cmc")
    coin_seed, draw_seed, pick_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(concept)
    exists = concept >= 0
    replace = exists & (tf.random.stateless_uniform(shape, coin_seed) < p)
    if min_replaced:
      none = tf.reduce_any(exists, axis=1) & ~tf.reduce_any(replace, axis=1)
      score = tf.where(exists, tf.random.stateless_uniform(shape, pick_seed), -1.0)
      forced = tf.one_hot(tf.argmax(score, axis=1), shape[1], on_value=True, off_value=False)
      replace = replace | (forced & none[:, None])
    out = dict(batch)
    out.update(cmc_layout(tf.cast(batch["text_ids"], tf.int32), tf.cast(batch["text_mask"], tf.int32),
                          tf.cast(batch["span_start"], tf.int32), tf.cast(batch["span_end"], tf.int32),
                          replace, entry_tokens=entry_tokens, pad_id=pad_id))
    out.update(cmc_concept=concept, cmc_replaced=replace,
               cmc_draw=tf.random.stateless_uniform(shape, draw_seed),
               cmc_valid=tf.reduce_any(replace, axis=1))
    return out

  return fn


# ----------------------------------------------------------------------------- object tags


@registry.register("object_tags")
def object_tags(concept_vocab: str = "", *, demo_config: str = "default", data_dir: str = "",
                max_objects: int = 8, label_field: str = "objects/label", shuffle: bool = True,
                out: str = "tags"):
  """The image's objects as gallery sources and its tags, from `label_field` and objects/bbox.

  Objects whose label the concept vocabulary (`concept_vocab`; '' = the demo's) lacks are
  dropped; the rest are shuffled (with `shuffle`, from the example seed) and the first
  `max_objects` (M) kept. Writes object_boxes float32 [M, 4] ((ymin, xmin, ymax, xmax) in
  [0, 1], zeros on padding), object_concepts int32 [M] (-1 on padding) and `example[out]`, the
  kept labels joined by spaces. An image with no known object is invalid (skipped, counted).
  """
  table = grounding.label_table(_demo_or(concept_vocab, demo_config, data_dir, "concept_vocab"))

  def fn(example):
    for field in (label_field, "objects/bbox"):
      if field not in example:
        raise KeyError(f"object_tags: the example has no {field!r} (config.input."
                       f"object_label_field names the label field); keys: {sorted(example)}")
    labels = tf.reshape(example[label_field], [-1])
    boxes = tf.clip_by_value(tf.reshape(tf.cast(example["objects/bbox"], tf.float32), [-1, 4]), 0.0, 1.0)
    concepts = table.lookup(labels)
    known = concepts >= 0
    labels, boxes, concepts = (tf.boolean_mask(x, known) for x in (labels, boxes, concepts))
    if shuffle:
      noise = tf.random.stateless_uniform(tf.shape(concepts), example_seed(example, _SALT_TAGS, "object_tags"))
      order = tf.argsort(noise)
      labels, boxes, concepts = (tf.gather(x, order) for x in (labels, boxes, concepts))
    labels, boxes, concepts = labels[:max_objects], boxes[:max_objects], concepts[:max_objects]
    kept = tf.shape(concepts)[0]
    example = dict(example)
    example["object_boxes"] = tf.ensure_shape(tf.pad(boxes, [[0, max_objects - kept], [0, 0]]), [max_objects, 4])
    example["object_concepts"] = tf.ensure_shape(
        tf.pad(concepts, [[0, max_objects - kept]], constant_values=-1), [max_objects])
    example[out] = tf.strings.reduce_join(labels, separator=" ")
    example["_valid"] = tf.logical_and(tf.cast(example.get("_valid", True), tf.bool), kept > 0)
    return example

  return fn
