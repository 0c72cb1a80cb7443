"""CLIP's byte-level BPE tokenizer in plain Python (no torch, no tokenizers library).

Reads the vocabulary of a Hugging Face CLIP directory (`tokenizer.json`, or `vocab.json` +
`merges.txt`) or OpenAI's `bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary is built
from them as OpenAI's tokenizer does: 256 byte symbols, the same with the end-of-word mark
`</w>`, one entry per merge, then <|startoftext|> and <|endoftext|>).

Encoding: text -> HTML-unescaped, NFC, runs of whitespace -> one space, stripped, lower-cased;
split into words, contractions, single digits and runs of other symbols; each piece's UTF-8 bytes
mapped to printable characters (GPT-2's byte map), the last one marked `</w>`; merged by BPE rank;
pieces not in the vocabulary become <|endoftext|> (transformers' unknown token).
`tokenize` frames each text as [<|startoftext|>, ..., <|endoftext|>], truncated to the context
length (keeping the end token) and right-padded with 0.

Differences from the reference tokenizers, all outside plain words: no `ftfy` text repair, and
the split uses Python's `re` classes (letters = `[^\\W\\d_]`, digits = `\\d`) where the reference
uses Unicode \\p{L} / \\p{N}, which differ on rare characters (superscripts, fractions).
"""
import functools
import gzip
import html
import json
import os
import re
import unicodedata

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI's merges file holds more merges than CLIP uses: 49152 - 256 - 2 of them.
OPENAI_NUM_MERGES = 49152 - 256 - 2
_SPLIT = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map from the 256 byte values to printable characters (printable bytes map to themselves)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      chars[byte] = chr(byte)
    else:
      chars[byte] = chr(256 + extra)
      extra += 1
  return chars


def normalize(text: str) -> str:
  text = html.unescape(html.unescape(text))
  text = unicodedata.normalize("NFC", text)
  return re.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
  """Byte-level BPE with `vocab` (token -> id) and `merges` (pairs, best first)."""

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
    for token in (BOS, EOS):
      if token not in vocab:
        raise ValueError(f"CLIP tokenizer vocabulary has no {token}")
    self.vocab = vocab
    self.ranks = {pair: rank for rank, pair in enumerate(merges)}
    self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
    self._cache: dict[str, list[str]] = {}

  def bpe(self, piece: str) -> list[str]:
    """The BPE symbols of one byte-mapped piece: repeatedly merge every occurrence of the best-ranked pair."""
    if piece in self._cache:
      return self._cache[piece]
    symbols = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
    while len(symbols) > 1:
      best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    self._cache[piece] = symbols
    return symbols

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without the start / end tokens."""
    byte_chars = bytes_to_unicode()
    ids = []
    for piece in _SPLIT.findall(normalize(text)):
      mapped = "".join(byte_chars[b] for b in piece.encode("utf-8"))
      ids += [self.vocab.get(symbol, self.eos_id) for symbol in self.bpe(mapped)]
    return ids

  def tokenize(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, length], mask int32 [n, length]): [BOS] + tokens + [EOS], cut to `length`
    (the end token kept), right-padded with 0."""
    if length < 2:
      raise ValueError(f"CLIP text length {length} leaves no room for the start and end tokens")
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      tokens = [self.bos_id] + self.encode(text)[:length - 2] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask

  def __len__(self) -> int:
    return len(self.vocab)


def _merge_pairs(lines) -> list[tuple[str, str]]:
  pairs = []
  for line in lines:
    if isinstance(line, (list, tuple)):
      pairs.append(tuple(line))
    elif line and not line.startswith("#version"):
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"bad BPE merge line {line!r}")
      pairs.append((parts[0], parts[1]))
  return pairs


def from_openai_bpe(path: str) -> ClipTokenizer:
  """OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a header line, then merges)."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = _merge_pairs(lines[1:OPENAI_NUM_MERGES + 1])
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
  return ClipTokenizer({token: i for i, token in enumerate(tokens)}, merges)


def from_hf_files(vocab_path: str, merges_path: str) -> ClipTokenizer:
  with open(vocab_path, encoding="utf-8") as f:
    vocab = json.load(f)
  with open(merges_path, encoding="utf-8") as f:
    merges = _merge_pairs(f.read().split("\n"))
  return ClipTokenizer(vocab, merges)


def from_tokenizer_json(path: str) -> ClipTokenizer:
  """A Hugging Face fast-tokenizer file whose model is BPE (merges as "a b" strings or pairs)."""
  with open(path, encoding="utf-8") as f:
    model = json.load(f).get("model", {})
  if model.get("type") != "BPE" or "vocab" not in model:
    raise ValueError(f"{path}: not a BPE tokenizer (model type {model.get('type')!r})")
  vocab = dict(model["vocab"])
  with open(path, encoding="utf-8") as f:  # special tokens live in added_tokens
    for token in json.load(f).get("added_tokens", []):
      vocab.setdefault(token["content"], token["id"])
  return ClipTokenizer(vocab, _merge_pairs(model.get("merges", [])))


def load_tokenizer(path: str) -> ClipTokenizer:
  """A CLIP tokenizer from a Hugging Face directory, a tokenizer.json, or OpenAI's .txt.gz merges.

  Raises:
    FileNotFoundError: nothing usable at `path` (the message lists what was looked for).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt")):
      return from_hf_files(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      return from_tokenizer_json(os.path.join(path, "tokenizer.json"))
    raise FileNotFoundError(f"{path}: no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"CLIP tokenizer {path} does not exist")
  if path.endswith(".gz"):
    return from_openai_bpe(path)
  if path.endswith(".json"):
    return from_tokenizer_json(path)
  raise FileNotFoundError(f"{path}: expected a directory, tokenizer.json or OpenAI's bpe_simple_vocab_16e6.txt.gz")
