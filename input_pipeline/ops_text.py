"""Text ops: caption choice and cleaning, tokenization, ViCHA visual-concept strings.

Registered ops (each `factory(...) -> fn(example) -> example`, TF ops only):

    choose_caption(key="captions", out="caption", first=False)
    clean_caption(max_words=30, key="caption")
    tokenize(max_len, kind="sentencepiece", model=None, key="caption", out="text",
             append_sep=False, lower=True)
    concepts_to_text(n=None, key="concepts", out="concept")

Text is framed the ALBEF way: `[CLS] tokens`, no final `[SEP]` unless `append_sep=True`,
truncated and padded to exactly `max_len`. `load_tokenizer` gives the same tokenizer as a
Python object (ids, decoding, special ids) for the trainer, the MLM masker and evaluators;
its `encode` runs the very TF code the op runs, so both give the same ids.

Random choices are stateless: they derive a sub-seed from `example["_seed"]` (int64 [2]) with a
salt fixed per op and output key, so a batch is a pure function of (seed, step).
"""
import functools
import os
import zlib

import numpy as np
import sentencepiece
import tensorflow as tf
import tensorflow_text as tf_text

from input_pipeline import registry

DEMO_SP_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                             "demo_sp.model")

# ALBEF `pre_caption` deletes these characters.
_CAPTION_PUNCTUATION = r"[,.'!?\"()*#:;~]"
# Exactly the characters Python's `re` matches with `\s` in a str pattern (RE2's `\s` is
# ASCII only): \t \n \v \f \r, the separators \x1c-\x1f, NEL and the Unicode Z category.
_PYTHON_WHITESPACE = r"[\t-\r\x{1c}-\x{1f}\x{85}\p{Z}]"


def _salt(op_name: str, out: str) -> int:
  """A fixed per-(op, output) salt, so two ops (or one op used twice) draw independently."""
  return zlib.crc32(f"{op_name}:{out}".encode()) & 0x7FFFFFFF


def _op_seed(example: dict, op_name: str, out: str) -> tf.Tensor:
  if "_seed" not in example:
    raise KeyError(f"{op_name}: example has no '_seed' (int64 [2], set by the input builder) "
                   f"for its random choice; keys: {sorted(example)}")
  return tf.random.experimental.stateless_fold_in(
      tf.cast(example["_seed"], tf.int64), _salt(op_name, out))


def _get_strings(example: dict, key: str, op_name: str) -> tf.Tensor:
  if key not in example:
    raise KeyError(f"{op_name}: example has no key {key!r}; keys: {sorted(example)}")
  value = example[key]
  if value.dtype != tf.string:
    raise TypeError(f"{op_name}: example[{key!r}] must be tf.string, got {value.dtype.name}")
  return value


# ----------------------------------------------------------------------------- caption choice


@registry.register("choose_caption")
def choose_caption(key: str = "captions", out: str = "caption", first: bool = False):
  """Picks one caption of `example[key]` (string [k], k >= 1) into `example[out]` (scalar).

  Training (`first=False`) draws the index uniformly from the example's seed; evaluation
  (`first=True`) takes caption 0.
  """

  def fn(example):
    captions = _get_strings(example, key, "choose_caption")
    num_captions = tf.shape(captions)[0]
    check = tf.debugging.assert_positive(
        num_captions, message=f"choose_caption: example[{key!r}] holds no captions")
    with tf.control_dependencies([check]):
      if first:
        index = tf.constant(0)
      else:
        index = tf.random.stateless_uniform(
            [], seed=_op_seed(example, "choose_caption", out), minval=0, maxval=num_captions,
            dtype=tf.int32)
      return {**example, out: tf.gather(captions, index)}

  return fn


# ----------------------------------------------------------------------------- cleaning


def _keep_first_words(text: tf.Tensor, max_words: int) -> tf.Tensor:
  """Keeps the first `max_words` of every string (words separated by single spaces)."""
  flat = tf.reshape(text, [-1])
  words = tf.strings.split(flat, sep=" ")[:, :max_words]
  return tf.reshape(tf.strings.reduce_join(words, axis=-1, separator=" "), tf.shape(text))


def albef_pre_caption(text: tf.Tensor, max_words: int = 30) -> tf.Tensor:
  """ALBEF `pre_caption` on a string tensor of any shape, elementwise.

  lowercase -> delete ,.'!?"()*#:;~ -> `-` and `/` to space -> `<person>` to `person` ->
  collapse whitespace runs of 2+ into one space -> drop one trailing newline -> strip spaces
  -> keep the first `max_words` space-separated words.
  """
  text = tf.strings.lower(text, encoding="utf-8")
  text = tf.strings.regex_replace(text, _CAPTION_PUNCTUATION, "")
  text = tf.strings.regex_replace(text, "[-/]", " ")
  text = tf.strings.regex_replace(text, "<person>", "person")
  text = tf.strings.regex_replace(text, _PYTHON_WHITESPACE + "{2,}", " ")
  # ALBEF's rstrip('\n'): after the collapse at most one whitespace character trails.
  text = tf.strings.regex_replace(text, "\n$", "")
  text = tf.strings.regex_replace(text, "^ +| +$", "")
  return _keep_first_words(text, max_words)


@registry.register("clean_caption")
def clean_caption(max_words: int = 30, key: str = "caption"):
  """Cleans `example[key]` (a string or string [k]) in place with ALBEF's `pre_caption`.

  Sets `example["_valid"]` (bool scalar) to False when a cleaned caption is empty (ANDed with
  an existing `_valid`), so the builder can skip and count the example.
  """
  if max_words < 1:
    raise ValueError(f"clean_caption: max_words must be >= 1, got {max_words}")

  def fn(example):
    cleaned = albef_pre_caption(_get_strings(example, key, "clean_caption"), max_words)
    valid = tf.reduce_all(tf.strings.length(cleaned) > 0)
    if "_valid" in example:
      valid = tf.logical_and(tf.cast(example["_valid"], tf.bool), valid)
    return {**example, key: cleaned, "_valid": valid}

  return fn


# ----------------------------------------------------------------------------- tokenizers

# Hugging Face `tokenizers` BERT rules (BertNormalizer, BertPreTokenizer, WordPiece), which
# `BertTokenizerFast` applies and `tf_text.BertTokenizer` does not quite: its lower-casing is
# NFKC case folding (ß -> ss, ligatures and full-width forms rewritten), it keeps format
# characters (zero-width space) and it limits words in bytes, not characters.
_CJK_RANGES = (r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
               r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}")
# ASCII punctuation and symbols, Unicode punctuation, CJK ideographs: each its own word.
_BERT_ISOLATED = r"[!-/:-@\[-`{-~\p{P}" + _CJK_RANGES + "]"
_MAX_CHARS_PER_WORD = 100  # longer words become [UNK]


def _bert_normalize(texts: tf.Tensor, lower: bool) -> tf.Tensor:
  """BertNormalizer: drop U+FFFD and control/format characters (category C) except tab
  and newlines; whitespace to spaces; with `lower`, NFD, drop non-spacing marks (accents)
  and lower-case character by character (so no final-sigma rule, as in Rust)."""
  texts = tf.strings.regex_replace(texts, r"[\x{fffd}]|[^\P{C}\t\n\r]", "")
  texts = tf.strings.regex_replace(texts, r"[\t\n\r\p{Z}]", " ")
  if lower:
    texts = tf.strings.regex_replace(tf_text.normalize_utf8(texts, "NFD"), r"\p{Mn}", "")
    chars = tf.strings.unicode_split(texts, "UTF-8")
    texts = tf.strings.reduce_join(tf.strings.lower(chars, encoding="utf-8"), axis=-1)
  return texts


def _bert_words(texts: tf.Tensor) -> tf.RaggedTensor:
  """BertPreTokenizer: split on spaces, isolate punctuation and CJK; words longer than 100
  characters are replaced by [UNK]. [n] -> ragged [n, (words)]."""
  words = tf_text.regex_split(texts, delim_regex_pattern=r"\s+|" + _BERT_ISOLATED,
                              keep_delim_regex_pattern=_BERT_ISOLATED)
  too_long = tf.strings.length(words.flat_values, unit="UTF8_CHAR") > _MAX_CHARS_PER_WORD
  return words.with_flat_values(tf.where(too_long, "[UNK]", words.flat_values))


class Tokenizer:
  """A SentencePiece model or a BERT WordPiece vocabulary, usable in TF and in Python.

  Attributes:
    kind: "sentencepiece" or "wordpiece".
    path: the model file (`.model`) or vocabulary file (`vocab.txt`).
    vocab_size: number of ids.
    pad_id, unk_id, cls_id, sep_id, mask_id: special ids.
    special_ids: the special ids as a sorted tuple.
  """

  def __init__(self, kind: str, path: str, lower: bool = True):
    self.kind, self.path, self.lower = kind, path, lower
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"{kind} tokenizer file not found: {path}")
    # Lift resource creation out of any graph being traced, so the tokenizer (cached per
    # path) can be captured by every later tf.data function.
    with tf.init_scope():
      if kind == "sentencepiece":
        self._init_sentencepiece(path)
      elif kind == "wordpiece":
        self._init_wordpiece(path)
      else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'sentencepiece' or 'wordpiece'")
    self.special_ids = tuple(sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id,
                                     self.mask_id}))

  def _init_sentencepiece(self, path: str):
    with tf.io.gfile.GFile(path, "rb") as f:
      model = f.read()
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    self._tf_tokenizer = tf_text.SentencepieceTokenizer(model=model, out_type=tf.int32)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
    self.cls_id, self.sep_id, self.mask_id = (
        self._special_id(self._sp.piece_to_id(p), p) for p in ("[CLS]", "[SEP]", "[MASK]"))
    if self.pad_id < 0:
      raise ValueError(f"SentencePiece model {path} has no pad id (train it with pad_id >= 0)")

  def _init_wordpiece(self, path: str):
    with tf.io.gfile.GFile(path, "r") as f:
      self._vocab = [line.rstrip("\n") for line in f]
    index = {token: i for i, token in enumerate(self._vocab)}
    # The word-length rule is applied in characters by `_bert_words`; the byte limit here only
    # has to let every word of up to 100 characters (4 bytes each at most) through.
    self._tf_tokenizer = tf_text.WordpieceTokenizer(
        path, suffix_indicator="##", max_bytes_per_word=4 * _MAX_CHARS_PER_WORD,
        token_out_type=tf.int64, unknown_token="[UNK]")
    self.vocab_size = len(self._vocab)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        self._special_id(index.get(t, -1), t)
        for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))

  def _special_id(self, token_id: int, token: str) -> int:
    # SentencePiece answers unknown pieces with the unk id, a vocab lookup with -1.
    if token_id < 0 or (self.kind == "sentencepiece" and self._sp.id_to_piece(token_id) != token):
      raise ValueError(f"{self.kind} tokenizer {self.path} has no {token} token")
    return token_id

  def token_ids(self, texts: tf.Tensor) -> tf.RaggedTensor:
    """Ids of the tokens of each text, without special tokens: int32 ragged [n, (tokens)]."""
    if self.kind == "sentencepiece":
      if self.lower:
        texts = tf.strings.lower(texts, encoding="utf-8")
      return self._tf_tokenizer.tokenize(texts)
    pieces = self._tf_tokenizer.tokenize(_bert_words(_bert_normalize(texts, self.lower)))
    return tf.cast(pieces.merge_dims(-2, -1), tf.int32)  # [n, (words), (pieces)] -> [n, (pieces)]

  def encode_tf(self, texts: tf.Tensor, max_len: int, append_sep: bool = False):
    """Frames texts as `[CLS] tokens ([SEP])`, truncated and padded to `max_len`.

    Args:
      texts: tf.string, a scalar or [n].
      max_len: output length, including [CLS] (and [SEP]).
      append_sep: end each text with [SEP] (kept when truncating).

    Returns:
      ids: int32 [max_len] or [n, max_len], padded with `pad_id`.
      mask: int32, same shape; 1 on real tokens ([CLS] and [SEP] included), 0 on padding.
    """
    min_len = 2 if append_sep else 1
    if max_len < min_len:
      raise ValueError(f"tokenize: max_len must be >= {min_len}, got {max_len}")
    texts = tf.convert_to_tensor(texts, tf.string)
    if texts.shape.rank not in (0, 1):
      raise ValueError(f"tokenize: text must be a string or a vector of strings, got shape "
                       f"{texts.shape}")
    tokens = self.token_ids(tf.reshape(texts, [-1]))[:, :max_len - min_len]
    num_texts = tokens.nrows()
    parts = [tf.RaggedTensor.from_tensor(tf.fill([num_texts, 1], self.cls_id)), tokens]
    if append_sep:
      parts.append(tf.RaggedTensor.from_tensor(tf.fill([num_texts, 1], self.sep_id)))
    framed = tf.concat(parts, axis=1)
    ids = framed.to_tensor(default_value=self.pad_id, shape=[None, max_len])
    mask = tf.ones_like(framed).to_tensor(default_value=0, shape=[None, max_len])
    if texts.shape.rank == 0:
      ids, mask = ids[0], mask[0]
    return ids, mask

  def encode(self, texts: list[str], max_len: int, append_sep: bool = False):
    """Python twin of the `tokenize` op: ids, mask as np.int32 [len(texts), max_len]."""
    ids, mask = self.encode_tf(tf.constant(list(texts), tf.string, shape=[len(texts)]),
                               max_len, append_sep)
    return ids.numpy(), mask.numpy()

  def decode(self, ids, skip_special: bool = True):
    """Text of one id sequence ([len] -> str) or of a batch ([n, len] -> list[str]).

    With `skip_special`, pad, unk, [CLS], [SEP] and [MASK] ids are dropped first.
    """
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row, skip_special) for row in ids]
    if ids.ndim != 1:
      raise ValueError(f"decode: ids must be [len] or [n, len], got shape {ids.shape}")
    kept = [int(i) for i in ids if not (skip_special and int(i) in self.special_ids)]
    if self.kind == "sentencepiece":
      return self._sp.decode(kept)
    return " ".join(self._vocab[i] for i in kept).replace(" ##", "")


def _resolve_model_path(kind: str, path: str | None) -> str:
  if path is None:
    if kind != "sentencepiece":
      raise ValueError(f"tokenizer kind {kind!r} needs a model path (a BERT vocab.txt)")
    return DEMO_SP_MODEL
  path = os.path.expanduser(path)
  return path if "://" in path else os.path.abspath(path)


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(kind: str, path: str, lower: bool) -> Tokenizer:
  return Tokenizer(kind, path, lower)


def load_tokenizer(kind: str = "sentencepiece", path: str | None = None,
                   lower: bool = True) -> Tokenizer:
  """The tokenizer for (kind, path, lower), built once per process.

  Args:
    kind: "sentencepiece" (path to a `.model`; default the shipped demo model) or "wordpiece"
      (path to a BERT `vocab.txt`; lower-cases and strips accents when `lower`).
    path: the model or vocabulary file.
    lower: lower-case the text first (WordPiece: also NFD and accent stripping, like
      Hugging Face `BertTokenizer(do_lower_case=True)`).
  """
  return _cached_tokenizer(kind, _resolve_model_path(kind, path), lower)


@registry.register("tokenize")
def tokenize(max_len: int, kind: str = "sentencepiece", model: str | None = None,
             key: str = "caption", out: str = "text", append_sep: bool = False,
             lower: bool = True):
  """Tokenizes `example[key]` into `example[out + "_ids"]` and `example[out + "_mask"]`.

  Both int32 [max_len] (or [k, max_len] for a string [k]): `[CLS] tokens` (+ `[SEP]` with
  `append_sep`), truncated to `max_len` and padded with the pad id; mask 1 = real token.
  """
  tokenizer = load_tokenizer(kind, model, lower)

  def fn(example):
    ids, mask = tokenizer.encode_tf(_get_strings(example, key, "tokenize"), max_len,
                                    append_sep)
    return {**example, f"{out}_ids": ids, f"{out}_mask": mask}

  return fn


# ----------------------------------------------------------------------------- concepts


@registry.register("concepts_to_text")
def concepts_to_text(n: int | None = None, key: str = "concepts", out: str = "concept"):
  """Joins visual-concept words `example[key]` (string [k]) into one string `example[out]`.

  ViCHA: training (`n` given) draws `n` of the k concepts uniformly WITH replacement from the
  example's seed (no draw when k = 0); evaluation (`n=None`) keeps all k in order. The words
  are joined with single spaces.
  """
  if n is not None and n < 1:
    raise ValueError(f"concepts_to_text: n must be >= 1 or None, got {n}")

  def fn(example):
    concepts = _get_strings(example, key, "concepts_to_text")
    if n is not None:
      num_concepts = tf.shape(concepts)[0]
      indices = tf.random.stateless_uniform(
          [n], seed=_op_seed(example, "concepts_to_text", out), minval=0,
          maxval=tf.maximum(num_concepts, 1), dtype=tf.int32)
      concepts = tf.gather(concepts, indices[:tf.where(num_concepts > 0, n, 0)])
    return {**example, out: tf.strings.reduce_join(concepts, separator=" ")}

  return fn
