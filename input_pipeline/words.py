"""Words of a caption as the input pipeline sees them, the spaCy model and annotation files, for
the offline concept tools (`phrases` for MVP, `grounded_words` for VLMixer).

Word positions. Both tools write word positions into annotation files (the words of an MVP phrase,
the span of a VLMixer grounded word). A position counts the words of the caption after ALBEF's
`pre_caption`, the `clean_caption` op of the pipeline (lower case, ,.'!?"()*#:;~ deleted, - and /
to spaces, whitespace runs collapsed), split on single spaces. The pipeline tokenizes that same
string, and both of its tokenizers split at spaces first (BERT's pre-tokenizer; SentencePiece,
whose pieces never cross a space), so the token sequence is the concatenation of the words'
tokenizations, and a word position maps to token positions with
`grounded_words.word_spans_to_token_spans`. Positions are counted before the pipeline's
`max_words` truncation; positions past it simply find no token.

spaCy parses the raw caption (its punctuation helps the parser) and each spaCy token is mapped to
the cleaned word its characters landed in (`caption_words` keeps a character map).
"""
import json
import re

from input_pipeline import nlp

SPACY_MODEL = nlp.DEFAULT_MODEL

# ALBEF `pre_caption` deletes these characters; it turns '-' and '/' into spaces.
_DELETED = frozenset(",.'!?\"()*#:;~")
_TO_SPACE = frozenset("-/")
_PERSON = "<person>"


def load_spacy(model: str = SPACY_MODEL, disable: tuple[str, ...] = ("ner",)):
  """`nlp.load_spacy` with named entities off (never used by these tools); loaded once per
  arguments. Raises `nlp.SpacyMissingError` (an ImportError) naming the pip command."""
  return nlp.load_spacy(model, tuple(disable))


def _lowered(caption: str) -> list[tuple[str, int]]:
  """(character, index in `caption`) after lower-casing; a character whose lower case is
  longer (e.g. 'İ') maps all its output characters to its own index."""
  lowered = caption.lower()
  if len(lowered) == len(caption):  # the common case keeps str.lower's context rules
    return [(c, i) for i, c in enumerate(lowered)]
  return [(lc, i) for i, c in enumerate(caption) for lc in c.lower()]


def caption_words(caption: str, max_words: int | None = None):
  """ALBEF `pre_caption` of `caption`, as words, with where each input character went.

  Args:
    caption: the raw caption.
    max_words: keep the first `max_words` words (ALBEF's truncation); None keeps all.

  Returns:
    words: list[str], `" ".join(words)` equals `pre_caption(caption, max_words)` (no words for a
      caption that cleans to the empty string).
    char_to_word: list[int], len(caption): the index of the word each input character ended up
      in, -1 for characters deleted or turned into separators.
  """
  chars = [(c, i) for c, i in _lowered(caption) if c not in _DELETED]
  chars = [(" " if c in _TO_SPACE else c, i) for c, i in chars]
  text = "".join(c for c, _ in chars)
  if _PERSON in text:  # '<person>' -> 'person': drop the brackets of each occurrence
    drop = set()
    for m in re.finditer(re.escape(_PERSON), text):
      drop.update((m.start(), m.end() - 1))
    chars = [ci for k, ci in enumerate(chars) if k not in drop]
    text = "".join(c for c, _ in chars)
  # Collapse each whitespace run of 2+ characters into one space (re's \s, as ALBEF).
  out, last = [], 0
  for m in re.finditer(r"\s{2,}", text):
    out.extend(chars[last:m.start()])
    out.append((" ", -1))
    last = m.end()
  out.extend(chars[last:])
  while out and out[-1][0] == "\n":  # ALBEF's rstrip('\n'), then strip(' ')
    out.pop()
  while out and out[-1][0] == " ":
    out.pop()
  start = 0
  while start < len(out) and out[start][0] == " ":
    start += 1
  out = out[start:]
  words, char_to_word, current = [], [-1] * len(caption), []
  for c, i in out + [(" ", -1)]:
    if c == " ":
      if out:
        words.append("".join(current))
      current = []
      continue
    current.append(c)
    if i >= 0:
      char_to_word[i] = len(words)
  if max_words is not None and len(words) > max_words:
    words = words[:max_words]
    char_to_word = [w if w < max_words else -1 for w in char_to_word]
  return words, char_to_word


def token_word_indices(doc, char_to_word: list[int]) -> list[int]:
  """For each spaCy token of `doc` (parsed from the raw caption), the index of the cleaned word
  holding most of its characters (the first such word on a tie), -1 when none does
  (punctuation)."""
  indices = []
  for token in doc:
    counts = {}
    for i in range(token.idx, token.idx + len(token.text)):
      if char_to_word[i] >= 0:
        counts[char_to_word[i]] = counts.get(char_to_word[i], 0) + 1
    indices.append(max(sorted(counts), key=counts.get) if counts else -1)
  return indices


def read_json(path: str, what: str):
  """The JSON in `path`; errors name `what` the file is and the path."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{what} file not found: {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e


def read_annotations(path: str) -> list[dict]:
  """An ALBEF-style annotation JSON: a list of entries whose `caption` is a string or a
  non-empty list of strings."""
  entries = read_json(path, "annotation")
  if not isinstance(entries, list):
    raise ValueError(f"annotation file {path} must hold a JSON list of entries")
  for k, entry in enumerate(entries):
    caption = entry.get("caption") if isinstance(entry, dict) else None
    if isinstance(caption, str):
      continue
    if (not isinstance(caption, list) or not caption
        or not all(isinstance(c, str) for c in caption)):
      raise ValueError(f"{path}: entry {k} needs a 'caption' string or a non-empty list of "
                       f"strings, got {caption!r}")
  return entries


def entry_captions(entry: dict) -> list[str]:
  """The captions of an entry read by `read_annotations`, as a list."""
  caption = entry["caption"]
  return [caption] if isinstance(caption, str) else list(caption)


def define_flags(specs, flag_values=None, module_name=None):
  """Defines (kind, name, default, help) absl flags on `flag_values` (default the global FLAGS);
  returns it. Shared by the concept commands (`phrases`, `grounded_words`).

  `module_name`: the module the flags belong to (absl's `--helpshort` lists the main module's
  flags; pass the command module's `__name__`, "__main__" when run with -m)."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if module_name == "__main__":
    module_name = sys.argv[0]  # absl's key for the main module
  for kind, name, default, help_text in specs:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values, module_name=module_name)
  return flag_values
