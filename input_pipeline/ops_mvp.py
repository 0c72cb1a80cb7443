"""MVP's level-2 inputs in tf.data: phrase concepts in the text, object tags for the image.

Registered ops (TF ops only; they run per example inside `Dataset.map`):

    mvp_concepts(path='', eval_path='', demo='', data_dir='', *, word_vocab, phrase_vocab,
                 max_phrases=5, max_phrase_words=8, min_sentences=50, key='caption')
    mvp_text(max_phrases=5, *, word_vocab, phrase_vocab, prob=0.15, kind=..., model=...)

Phrases are parsed offline (spaCy is far too slow per example): `python -m input_pipeline.phrases
annotate` writes `phrase_ids` (ids after the word vocabulary) and `phrase_words` (their word
positions in the cleaned caption) per caption, and `tags` per entry, into an ALBEF-style JSON.
`mvp_concepts` reads such files once, when the pipeline is built, into lookup tables: the
phrases by the caption's text (its 64-bit fingerprint), so they follow whichever caption
`choose_caption` drew and serve eval captions too; the tags by `image_id`, computed from the
files exactly as the `json` source computes its ids (so `path` must be the source's
`annotations`). For the demo (`demo='default' | 'tiny'`) the same annotation is built once with
the real spaCy path (`phrases.demo_entries` -> `parse_annotations` -> `vocab_from_counts` ->
`annotate_entries`, what `python -m input_pipeline.phrases demo --id_offset=<word_vocab>
--min_sentences=<min_sentences>` writes) and cached beside the demo TFDS data
(`<data_dir>/vlpjax_demo_mvp/<config>-w<word_vocab>-m<min_sentences>-p<max_phrases>-v1/`), under
the same lock `demo_data.build_demo` uses. The tags of a demo image are `phrases.demo_tags` of
its scene (colour and shape words).

Per example, `mvp_concepts` (after `choose_caption`, before `clean_caption`) writes
`phrase_ids` int32 [P] (0 = none), `phrase_words` int32 [P, W] (-1 padding) and `tags` (string,
space-joined; '' when the image has none). Then the config tokenizes and masks the words
(`tokenize(L)|mask_tokens(p)`) and the tags (`tokenize(20, key='tags', out='concept',
append_sep=True)|mask_tokens(p, key='concept')`: `concept_ids`, `concept_mask`,
`concept_mlm_ids`, `concept_mlm_labels`), and `mvp_text` builds the level-2 text.

`mvp_text` turns the word tokens `[CLS] w_1..w_n` (`text_ids` [L]) into MVPTR's sequence
`[CLS] w_1..w_n p_1..p_k [SEP]`, padded to L + P + 1: the phrases directly after the words (so
they get the next positions), then [SEP]. With `mlm_labels` in the example (words masked by
`mask_tokens`) it also applies MVP's phrase corruption (`phrases.corrupt_phrases_tf`): a phrase
one of whose words has a masked token becomes [MASK] (it would leak the word), any other phrase
is selected with probability `prob` and then becomes [MASK] (80%), a random phrase id (10%) or
stays. Writes `text_ids`, `text_mask` (clean), `phrase_mask` int32 [L+P+1] (1 at phrase tokens),
and with masking `mlm_ids` (masked words + corrupted phrases), `mlm_labels` (the word labels;
-1 at phrases, [SEP] and padding) and `phrase_labels` (the original phrase id at corrupted
phrases, -1 elsewhere; read only by `mcr` with `phrase_loss`). `phrase_ids` / `phrase_words`
are consumed. A word's tokens are found by tokenizing each word of the cleaned `caption` alone
(the pipeline's tokenizers split at spaces first; `grounded_words.word_spans_to_token_spans`).
"""
import json
import os
import zlib

from absl import logging
import numpy as np
import tensorflow as tf

from input_pipeline import registry
from input_pipeline.ops_image import example_seed

DEFAULT_MAX_PHRASE_WORDS = 8
DEFAULT_MIN_SENTENCES = 50
# Part of the demo cache's directory name: bump it when the extraction rules change.
DEMO_CACHE_VERSION = "v1"
_SALT_PHRASES = zlib.crc32(b"mvp_text:phrases") & 0x7FFFFFFF
_SALT_DROP_TAGS = zlib.crc32(b"drop_tags") & 0x7FFFFFFF
_FINGERPRINT_BUCKETS = 2**63 - 1


# ----------------------------------------------------------------------------- annotation files


def fingerprints(texts) -> np.ndarray:
  """int64 [n]: the 64-bit fingerprint (`tf.strings.to_hash_bucket_fast`) of each text, as the
  `mvp_concepts` op computes it in the graph."""
  texts = list(texts)
  out = []
  for start in range(0, len(texts), 65536):
    chunk = tf.constant(texts[start:start + 65536], tf.string, shape=[len(texts[start:start + 65536])])
    out.append(tf.strings.to_hash_bucket_fast(chunk, _FINGERPRINT_BUCKETS).numpy())
  return np.concatenate(out) if out else np.zeros([0], np.int64)


def _captions(entry) -> list[str]:
  caption = entry.get("caption", entry.get("captions"))
  return [caption] if isinstance(caption, str) else list(caption or [])


def _per_caption(entry, field: str, captions: list[str], where: str):
  """The entry's `field` as one list per caption (`phrases annotate` writes a flat list for a
  string caption, a list of lists for a list of captions)."""
  value = entry.get(field)
  if value is None:
    return [[] for _ in captions]
  if isinstance(entry.get("caption", entry.get("captions")), str):
    value = [value]
  if not isinstance(value, list) or len(value) != len(captions):
    raise ValueError(f"{where}: field {field!r} must hold one list per caption ({len(captions)}), got {value!r:.80}")
  return value


class ConceptTables:
  """Phrases per caption and tags per image, as arrays for the TF lookup tables.

  Attributes:
    keys: int64 [R] caption fingerprints; phrase_ids int32 [R, P]; phrase_words int8 [R, P, W].
    tag_ids: int64 [I] image ids; tags: [I] space-joined tag strings.
  """

  def __init__(self, *, word_vocab: int, phrase_vocab: int, max_phrases: int, max_phrase_words: int):
    self.word_vocab, self.phrase_vocab = word_vocab, phrase_vocab
    self.max_phrases, self.max_phrase_words = max_phrases, max_phrase_words
    self._rows: dict[str, tuple[list, list]] = {}
    self._tags: dict[int, str] = {}
    self.truncated_words = 0

  def add(self, entry: dict, image_id, where: str, with_tags: bool = True) -> None:
    """Adds an annotated entry (`phrases annotate` output); image_id None adds no tags."""
    captions = _captions(entry)
    ids = _per_caption(entry, "phrase_ids", captions, where)
    positions = _per_caption(entry, "phrase_words", captions, where)
    for caption, caption_ids, caption_words in zip(captions, ids, positions):
      if len(caption_ids) != len(caption_words):
        raise ValueError(f"{where}: caption {caption!r}: {len(caption_ids)} phrase_ids but "
                         f"{len(caption_words)} phrase_words")
      for phrase_id in caption_ids:
        if not self.word_vocab <= int(phrase_id) < self.word_vocab + self.phrase_vocab:
          raise ValueError(
              f"{where}: phrase id {phrase_id} is outside [{self.word_vocab}, {self.word_vocab + self.phrase_vocab}): "
              f"the phrase ids must follow the word vocabulary (phrases annotate --id_offset={self.word_vocab}) and "
              f"fit the model's phrase rows (configs/mvp.py:phrases=N, config.model.phrase_vocab_size)")
      self._rows.setdefault(caption, (list(caption_ids)[:self.max_phrases], list(caption_words)[:self.max_phrases]))
    if with_tags and image_id is not None and "tags" in entry:
      tags = entry["tags"]
      if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"{where}: field 'tags' must be a list of strings, got {tags!r:.80}")
      self._tags.setdefault(int(image_id), " ".join(tags))

  def arrays(self) -> dict[str, np.ndarray]:
    captions = list(self._rows)
    num, p, w = len(captions), self.max_phrases, self.max_phrase_words
    phrase_ids = np.zeros([num, p], np.int32)
    phrase_words = np.full([num, p, w], -1, np.int8)
    for row, caption in enumerate(captions):
      ids, words = self._rows[caption]
      phrase_ids[row, :len(ids)] = ids
      for k, positions in enumerate(words):
        kept = [x for x in positions if 0 <= x < 128][:w]  # int8; captions are cut to 30 words anyway
        self.truncated_words += len(positions) - len(kept)
        phrase_words[row, k, :len(kept)] = kept
    tag_ids = np.asarray(sorted(self._tags), np.int64)
    return dict(keys=fingerprints(captions), phrase_ids=phrase_ids, phrase_words=phrase_words, tag_ids=tag_ids,
                tags=np.asarray([self._tags[i] for i in tag_ids], object))


def _read_entries(path: str) -> list:
  try:
    with open(path) as f:
      entries = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"mvp_concepts: annotation file not found: {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"mvp_concepts: {path} is not valid JSON: {e}") from e
  if not isinstance(entries, list):
    raise ValueError(f"mvp_concepts: {path} must hold a JSON list of entries")
  return entries


def add_json_files(tables: ConceptTables, paths: list[str], with_tags: bool) -> None:
  """Entries of annotated ALBEF-style files; image ids assigned as the `json` source assigns
  them over the same list of files (`sources.load_json_annotations`)."""
  from input_pipeline import sources  # pylint: disable=import-outside-toplevel
  if not paths:
    return
  ids = {}
  if with_tags:
    loaded = sources.load_json_annotations(paths, check_files=False)
    ids = dict(zip(loaded.origins, loaded.image_ids))
  for path in paths:
    for index, entry in enumerate(_read_entries(path)):
      if isinstance(entry, dict):
        tables.add(entry, ids.get((path, index)), f"{path}: entry {index}", with_tags)


def demo_annotations(config: str = "default", data_dir: str | None = None, *, word_vocab: int,
                     min_sentences: int = DEFAULT_MIN_SENTENCES, max_phrases: int = 5) -> str:
  """The demo's phrase annotation (both splits) and vocabulary, built once with spaCy and cached.

  Returns:
    The directory holding `id2phrase.json`, `demo_train.json` and `demo_test.json` (the files
    `python -m input_pipeline.phrases demo` writes, phrase ids from `word_vocab`).
  """
  from input_pipeline import demo_data  # pylint: disable=import-outside-toplevel
  root = os.path.expanduser(data_dir or os.environ.get("VLPJAX_DATA_DIR") or demo_data.DEFAULT_DATA_DIR)
  name = f"{config}-w{word_vocab}-m{min_sentences}-p{max_phrases}-{DEMO_CACHE_VERSION}"
  directory = os.path.join(root, "vlpjax_demo_mvp", name)
  done = os.path.join(directory, "DONE")
  if os.path.exists(done):
    return directory
  with demo_data.build_lock(root, f"vlpjax_demo_mvp-{name}"):
    if not os.path.exists(done):
      _write_demo_annotations(directory, config, word_vocab, min_sentences, max_phrases)
      with open(done, "w") as f:
        f.write("ok\n")
  return directory


def _write_demo_annotations(directory, config, word_vocab, min_sentences, max_phrases):
  from input_pipeline import phrases  # pylint: disable=import-outside-toplevel  (spaCy)
  logging.info("mvp_concepts: parsing the demo captions (%s) with spaCy into %s", config, directory)
  splits = {s: phrases.demo_entries(s, config) for s in ("train", "test")}
  parsed = {s: list(phrases.parse_annotations(e)) for s, e in splits.items()}
  counts = phrases.count_phrases([p for p, _ in caption] for entry in parsed["train"] for caption in entry)
  vocab = phrases.vocab_from_counts(counts, min_sentences, word_vocab)
  os.makedirs(directory, exist_ok=True)
  phrases.save_vocab(vocab, os.path.join(directory, "id2phrase.json"))
  for split, entries in splits.items():
    annotated, stats = phrases.annotate_entries(entries, parsed[split], vocab, max_phrases)
    with open(os.path.join(directory, f"demo_{split}.json"), "w") as f:
      json.dump(annotated, f)
    logging.info("mvp_concepts: demo %s: %s; %s", split, stats, phrases.describe_vocab(vocab))


def demo_vocab_size(directory: str) -> int:
  """Phrases in the cached demo vocabulary of `demo_annotations`."""
  with open(os.path.join(directory, "id2phrase.json")) as f:
    return len(json.load(f))


# ----------------------------------------------------------------------------- ops


@registry.register("mvp_concepts")
def get_mvp_concepts(path: str = "", eval_path: str = "", demo: str = "", data_dir: str = "", *,
                     word_vocab: int, phrase_vocab: int, max_phrases: int = 5,
                     max_phrase_words: int = DEFAULT_MAX_PHRASE_WORDS,
                     min_sentences: int = DEFAULT_MIN_SENTENCES, key: str = "caption"):
  """Looks up the phrases of `example[key]` (the raw chosen caption) and the tags of
  `example['image_id']` (see the module docstring).

  Args:
    path: annotated training JSON file(s), comma-separated: phrases and tags (the `json`
      source's `annotations`, for the same image ids).
    eval_path: more annotated files whose captions' phrases are looked up too (eval captions).
    demo: instead, the demo config ('default' | 'tiny'): annotation built once and cached.
    data_dir: the demo's TFDS data dir ('' = $VLPJAX_DATA_DIR or the default).
    word_vocab, phrase_vocab: the model's word rows and phrase rows; every phrase id must lie
      in [word_vocab, word_vocab + phrase_vocab).
    max_phrases, max_phrase_words: P and W of the outputs.
    min_sentences: the demo vocabulary's threshold.
  """
  if bool(path) == bool(demo):
    raise ValueError("mvp_concepts: give the annotated files (path=...) or the demo config (demo=...), "
                     f"exactly one; got path={path!r}, demo={demo!r}")
  tables = ConceptTables(word_vocab=word_vocab, phrase_vocab=phrase_vocab, max_phrases=max_phrases,
                         max_phrase_words=max_phrase_words)
  if demo:
    directory = demo_annotations(demo, data_dir or None, word_vocab=word_vocab, min_sentences=min_sentences,
                                 max_phrases=max_phrases)
    for split in ("train", "test"):
      file = os.path.join(directory, f"demo_{split}.json")
      for index, entry in enumerate(_read_entries(file)):
        tables.add(entry, entry["image_id"], f"{file}: entry {index}")
  else:
    add_json_files(tables, [p.strip() for p in path.split(",") if p.strip()], with_tags=True)
    add_json_files(tables, [p.strip() for p in eval_path.split(",") if p.strip()], with_tags=False)
  arrays = tables.arrays()
  if tables.truncated_words:
    logging.warning("mvp_concepts: %d phrase word positions beyond %d words per phrase (or position 127) dropped",
                    tables.truncated_words, max_phrase_words)
  logging.info("mvp_concepts: %d captions with phrases, %d images with tags", len(arrays["keys"]),
               len(arrays["tag_ids"]))
  # A sentinel entry keeps the tables non-empty (TF refuses empty ones); no real key equals it
  # (fingerprints are >= 0; an image id of -2**63 does not occur).
  caption_keys = np.concatenate([arrays["keys"], [-1]]).astype(np.int64)
  tag_keys = np.concatenate([arrays["tag_ids"], [np.iinfo(np.int64).min]]).astype(np.int64)
  with tf.init_scope():
    rows = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(caption_keys), tf.range(len(caption_keys), dtype=tf.int64)),
        default_value=-1)
    tags = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(tag_keys),
                                            tf.constant(list(arrays["tags"]) + [""], tf.string, shape=[len(tag_keys)])),
        default_value="")
    phrase_ids = tf.constant(np.concatenate([arrays["phrase_ids"], np.zeros([1, max_phrases], np.int32)]))
    phrase_words = tf.constant(np.concatenate(
        [arrays["phrase_words"], np.full([1, max_phrases, max_phrase_words], -1, np.int8)]))
  missing_row = len(arrays["keys"])

  def fn(example):
    if key not in example:
      raise KeyError(f"mvp_concepts: example has no {key!r} (run choose_caption first); keys: {sorted(example)}")
    row = rows.lookup(tf.strings.to_hash_bucket_fast(example[key], _FINGERPRINT_BUCKETS))
    row = tf.where(row < 0, tf.constant(missing_row, tf.int64), row)
    out = dict(example, phrase_ids=tf.gather(phrase_ids, row),
               phrase_words=tf.cast(tf.gather(phrase_words, row), tf.int32))
    if "image_id" in example:
      out["tags"] = tags.lookup(tf.cast(example["image_id"], tf.int64))
    return out

  return fn


@registry.register("drop_tags")
def get_drop_tags(prob: float, key: str = "tags"):
  """Empties `example[key]` (an image's space-joined tags) with probability `prob`, drawn from the
  example's seed (so resume and sharding see the same draws).

  A dropped image trains from its patches alone: its tag sequence is `[CLS] [SEP]`, so `mcr` has
  nothing to recover there and VSC / ITM / WPG must read the pixels. [D] Not in MVPTR; the demo
  ablation in docs/methods/mvp.md is why (`config.input.tag_drop`). `prob` 0 is the identity.
  """
  prob = float(prob)
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"drop_tags: prob must be in [0, 1] (config.input.tag_drop), got {prob}")

  def fn(example):
    if key not in example:
      raise KeyError(f"drop_tags: example has no {key!r} (run mvp_concepts first); keys: {sorted(example)}")
    if prob == 0.0:
      return example
    draw = tf.random.stateless_uniform([], seed=example_seed(example, _SALT_DROP_TAGS, "drop_tags"))
    return {**example, key: tf.where(draw < prob, tf.constant("", tf.string), example[key])}

  return fn


@registry.register("mvp_text")
def get_mvp_text(max_phrases: int = 5, *, word_vocab: int, phrase_vocab: int, prob: float = 0.15,
                 kind: str | None = None, model: str | None = None, key: str = "caption",
                 mask_fraction: float = 0.8, random_fraction: float = 0.1):
  """`[CLS] words` -> `[CLS] words phrases [SEP]` with MVP's phrase corruption (module docstring).

  Args:
    max_phrases: P, the phrase slots (the text grows by P + 1 tokens).
    word_vocab, phrase_vocab: random replacement phrase ids are drawn from
      [word_vocab, word_vocab + phrase_vocab).
    prob, mask_fraction, random_fraction: the corruption of phrases no masked word forces.
    kind, model: the tokenizer (filled in from `config.input.tokenizer`).
    key: the cleaned caption the word tokens were made from.
  """
  from input_pipeline import ops_text  # pylint: disable=import-outside-toplevel
  from input_pipeline import phrases  # pylint: disable=import-outside-toplevel  (no spaCy import)
  if kind is None:
    raise ValueError("mvp_text needs the tokenizer (kind=, model=); the pipeline fills in config.input.tokenizer")
  tokenizer = ops_text.load_tokenizer(kind, model)

  def fn(example):
    for field in ("text_ids", "text_mask", key):
      if field not in example:
        raise KeyError(f"mvp_text: example has no {field!r} (run clean_caption and tokenize first); "
                       f"keys: {sorted(example)}")
    text_ids = tf.cast(example["text_ids"], tf.int32)
    length = text_ids.shape[0]
    if length is None:
      raise ValueError("mvp_text: text_ids must have a fixed length (tokenize pads to max_len)")
    total = length + max_phrases + 1
    n = tf.reduce_sum(tf.cast(example["text_mask"], tf.int32)) - 1  # word tokens after [CLS]
    if "phrase_ids" in example:
      phrase_ids = tf.cast(example["phrase_ids"], tf.int32)[:max_phrases]
      phrase_words = tf.cast(example["phrase_words"], tf.int32)[:max_phrases]
    else:
      phrase_ids = tf.zeros([max_phrases], tf.int32)
      phrase_words = -tf.ones([max_phrases, 1], tf.int32)
    phrase_ids = tf.pad(phrase_ids, [[0, max_phrases - tf.shape(phrase_ids)[0]]])
    phrase_words = tf.pad(phrase_words, [[0, max_phrases - tf.shape(phrase_words)[0]], [0, 0]],
                          constant_values=-1)
    num_phrases = tf.reduce_sum(tf.cast(phrase_ids != 0, tf.int32))
    positions = tf.range(total)
    slot = positions - (n + 1)
    in_phrase = (slot >= 0) & (slot < num_phrases)
    slot = tf.clip_by_value(slot, 0, max_phrases - 1)
    is_sep = positions == n + num_phrases + 1
    is_word = positions <= n

    def assemble(words, phrase_values, fill):
      words = tf.concat([words, tf.fill([max_phrases + 1], fill)], 0)
      rest = tf.where(in_phrase, tf.gather(phrase_values, slot), tf.where(is_sep, tokenizer.sep_id, fill))
      return tf.where(is_word, words, rest)

    out = {k: v for k, v in example.items() if k not in ("phrase_ids", "phrase_words")}
    out["text_ids"] = tf.ensure_shape(assemble(text_ids, phrase_ids, tokenizer.pad_id), [total])
    out["text_mask"] = tf.ensure_shape(tf.cast(positions <= n + num_phrases + 1, tf.int32), [total])
    out["phrase_mask"] = tf.ensure_shape(tf.cast(in_phrase, tf.int32), [total])
    if "mlm_labels" in example:
      labels = tf.cast(example["mlm_labels"], tf.int32)
      word_hits = _word_hits(tokenizer, example[key], labels >= 0)
      corrupted, phrase_labels = phrases.corrupt_phrases_tf(
          phrase_ids, phrase_words, tf.where(word_hits, 0, -1), example_seed(example, _SALT_PHRASES, "mvp_text"),
          prob, mask_id=tokenizer.mask_id, word_vocab_size=word_vocab, phrase_vocab_size=phrase_vocab,
          pad_id=0, mask_fraction=mask_fraction, random_fraction=random_fraction, keep_labels=True)
      mlm_ids = tf.cast(example.get("mlm_ids", text_ids), tf.int32)
      out["mlm_ids"] = tf.ensure_shape(assemble(mlm_ids, corrupted, tokenizer.pad_id), [total])
      word_labels = tf.concat([labels, tf.fill([max_phrases + 1], -1)], 0)
      out["mlm_labels"] = tf.ensure_shape(tf.where(is_word, word_labels, -1), [total])
      out["phrase_labels"] = tf.ensure_shape(
          tf.where(in_phrase, tf.gather(phrase_labels, slot), -1), [total])
    return out

  return fn


def _word_hits(tokenizer, caption, selected):
  """bool [words]: whether any token of each word of `caption` is selected.

  `selected` bool [L] over `[CLS] tokens...`; word w covers tokens [s_w, s_w + n_w) with
  s_w = 1 + sum_{v<w} n_v (n_v its token count when tokenized alone); tokens past L are gone.
  """
  words = tf.strings.split(tf.reshape(caption, []), sep=" ")
  counts = tf.cast(tokenizer.token_ids(words).row_lengths(), tf.int32)
  ends = 1 + tf.cumsum(counts)
  starts = ends - counts
  length = tf.shape(selected)[0]
  cumulative = tf.concat([[0], tf.cumsum(tf.cast(selected, tf.int32))], 0)  # [L + 1]
  hits = (tf.gather(cumulative, tf.minimum(ends, length)) - tf.gather(cumulative, tf.minimum(starts, length)))
  return hits > 0
