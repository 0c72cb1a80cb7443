r"""VLMixer's visually grounded words, offline: the concept vocabulary from the object labels of an
image corpus, the words of a sentence that name a concept, and their token spans.

    python -m input_pipeline.grounded_words vocab --coco_instances=instances_train2014.json \
        --vg_objects=objects.json --output=concepts.json
    python -m input_pipeline.grounded_words annotate --input=cc3m.json --vocab=concepts.json \
        --output=cc3m_grounded.json
    python -m input_pipeline.grounded_words demo --output_dir=/tmp/vlmixer_demo

Concepts (docs/method_spec.md 4.2 A/B). The names of the image corpus's objects: COCO instance categories
(kept with >= --coco_min_instances instances, default 1), Visual Genome object names (>=
--vg_min_instances, default 50), the demo set's shapes (with their caption synonyms as aliases:
"disk" is a circle, "plus sign" a cross) and, by default, its colour-shape pairs ("red circle").
A name is normalised like a sentence (below), so "traffic lights" and "traffic light" are one
concept and multi-word names stay multi-word. Ids go by instance count (descending), then name.

Normalisation (`word_keys`): the words of the ALBEF-cleaned text (`words.caption_words`, the
positions the pipeline sees) become match keys. With the default `spacy` normaliser a word whose
main spaCy token is a noun gets its lemma ("dogs" -> "dog", "mice" -> "mouse", "men" -> "man"), and
any other word the rule-based singular of its lower-cased form (`singularize`), so verbs keep their
form ("skiing" is no ski) while nouns mis-tagged as verbs or adjectives still lose a plural `s`.
The `rules` normaliser (no spaCy) singularises every word: lower-case; an irregular table (mice,
men, women, children, teeth, feet, geese, knives, leaves, ...); words that do not change (sheep,
deer, fish, series, species, ...) or only look plural (glass, bus, tennis, ...: -ss, -us, -is);
-ies -> -y (longer than 4 letters); -ches, -shes, -sses, -xes, -zes -> drop -es; -oes -> -oe;
otherwise a final -s is dropped from words of 4+ letters. A vocabulary records its normaliser,
and matching uses it, so names and sentences are always normalised alike.

Matching (`find_grounded_words`): every run of words whose keys spell a concept name is a
candidate; the longest candidates win (then the leftmost), overlapping ones are dropped: "a red fire
hydrant" grounds "fire hydrant", not "hydrant". Only whole words match ("cart" is no "car").

Token spans (`word_spans_to_token_spans`): a word's tokens are its tokenizer pieces; the pipeline's
tokenizers split at spaces first, so a sentence's tokens are its words' tokens in a row, and a word
span maps to the token span covering all pieces of its words (shifted by the [CLS] offset).

`annotate` adds `grounded_words` per caption: [[start_word, end_word, concept_id], ...] (end
exclusive), a list of such lists when `caption` is a list.
"""
import collections
from collections.abc import Callable, Iterable, Sequence
import dataclasses
import json
import os

from absl import logging

from input_pipeline import object_labels
from input_pipeline import words as words_lib

NORMALIZERS = ("spacy", "rules")
DEFAULT_VG_MIN_INSTANCES = 50
DEFAULT_COCO_MIN_INSTANCES = 1

# ----------------------------------------------------------------------------- normalisation

_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "oxen": "ox", "lice": "louse", "dice": "die",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
    "halves": "half", "calves": "calf", "shelves": "shelf", "wolves": "wolf", "scarves": "scarf",
    "thieves": "thief", "hooves": "hoof", "elves": "elf", "selves": "self", "cacti": "cactus",
    "fungi": "fungus", "octopi": "octopus", "indices": "index", "matrices": "matrix",
    "vertices": "vertex", "phenomena": "phenomenon", "criteria": "criterion", "data": "datum",
    "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero", "mangoes": "mango",
    "buses": "bus", "gases": "gas", "lenses": "lens", "atlases": "atlas",
    "skis": "ski", "taxis": "taxi", "kiwis": "kiwi", "bikinis": "bikini", "martinis": "martini",
}
# -ies plurals of words ending in -ie (the -ies -> -y rule would break them).
_IE_PLURALS = frozenset({"cookies", "movies", "brownies", "zombies", "selfies", "smoothies",
                         "hippies", "goalies", "veggies", "calories", "pies", "ties", "lies",
                         "magpies", "pixies", "rookies", "hoodies", "beanies", "collies"})
_INVARIANT = frozenset({"sheep", "deer", "fish", "moose", "series", "species", "aircraft",
                        "news", "means", "swiss", "chassis", "corps", "gas", "lens", "bus",
                        "pants", "jeans", "shorts", "scissors", "glasses", "trousers", "tongs",
                        "pliers", "goggles", "binoculars", "headphones", "clothes", "stairs",
                        "sunglasses", "overalls"})
# Clothes and tools named in the plural (pants, scissors) are singular objects; the caption and
# the label use the same form, so both stay as written.


def singularize(word: str) -> str:
  """Rule-based singular of one word (lower-cased); see the module docstring for the rules."""
  w = word.lower()
  if w in _IRREGULAR:
    return _IRREGULAR[w]
  if w in _INVARIANT or len(w) < 4 or not w.isalpha():
    return w
  if w.endswith(("ss", "us", "is")):
    return w
  if w in _IE_PLURALS:
    return w[:-1]
  if w.endswith("ies") and len(w) > 4:
    return w[:-3] + "y"
  if w.endswith(("ches", "shes", "sses", "xes", "zes")):
    return w[:-2]
  if w.endswith("oes"):
    return w[:-1]
  if w.endswith("s"):
    return w[:-1]
  return w


def word_keys(text: str, normalizer: str = "spacy", doc=None, nlp=None):
  """The words of the ALBEF-cleaned `text` and their match keys.

  Args:
    text: a sentence or a concept name.
    normalizer: "spacy" (lemmas of nouns, singulars of the rest) or "rules" (`singularize`).
    doc: the spaCy parse of `text` (tagger + lemmatizer), else parsed with `nlp`.
    nlp: the spaCy pipeline; default `words.load_spacy` without parser and NER.

  Returns:
    (words, keys): two lists of str of equal length.
  """
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
  words, char_to_word = words_lib.caption_words(text)
  if normalizer == "rules":
    return words, [singularize(w) for w in words]
  if doc is None:
    doc = (nlp or tagger())(text)
  elif doc.text != text:
    raise ValueError(f"the parse is of {doc.text!r}, not of {text!r}")
  main = {}
  for token, w in zip(doc, words_lib.token_word_indices(doc, char_to_word)):
    if w >= 0 and (w not in main or len(token.text) > len(main[w].text)):
      main[w] = token
  keys = []
  for k, word in enumerate(words):
    token = main.get(k)
    if token is not None and token.pos_ in ("NOUN", "PROPN"):
      keys.append(token.lemma_.lower())
    else:
      keys.append(singularize(word))
  return words, keys


def tagger(model: str = words_lib.SPACY_MODEL):
  """The spaCy pipeline for grounded words: tagger and lemmatizer, no parser, no NER."""
  return words_lib.load_spacy(model, disable=("parser", "ner"))


def _name_keys(names: Sequence[str], normalizer: str, nlp=None) -> list[str]:
  """Normalised form of each name: its word keys joined by spaces ("" when none)."""
  if normalizer == "rules":
    docs = [None] * len(names)
  else:
    docs = (nlp or tagger()).pipe(names, batch_size=512)
  return [" ".join(word_keys(n, normalizer, doc)[1]) for n, doc in zip(names, docs)]


# ----------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True)
class ConceptVocab:
  """Concepts and how words and labels find them.

  Attributes:
    names: the normalised name of each concept id.
    counts: object instances of each concept in the image corpus.
    name_to_id: {normalised name or alias: id}; what sentences are matched against.
    label_to_id: {raw object label of the image corpus: id}, for the patch gallery.
    normalizer: how names were normalised ("spacy" or "rules"); sentences must use the same.
  """

  names: tuple
  counts: tuple
  name_to_id: dict
  label_to_id: dict
  normalizer: str = "spacy"

  @property
  def max_words(self) -> int:
    return max((len(n.split()) for n in self.name_to_id), default=0)

  def to_json(self) -> dict:
    aliases = collections.defaultdict(list)
    for name, i in sorted(self.name_to_id.items()):
      if name != self.names[i]:
        aliases[i].append(name)
    return {
        "normalizer": self.normalizer,
        "concepts": [{"id": i, "name": n, "count": c, "aliases": aliases[i]}
                     for i, (n, c) in enumerate(zip(self.names, self.counts))],
        "name_to_id": dict(sorted(self.name_to_id.items())),
        "label_to_id": dict(sorted(self.label_to_id.items())),
    }

  @classmethod
  def from_json(cls, data: dict, where: str = "concept vocabulary") -> "ConceptVocab":
    try:
      concepts = sorted(data["concepts"], key=lambda c: c["id"])
      names = tuple(str(c["name"]) for c in concepts)
      counts = tuple(int(c["count"]) for c in concepts)
      if [c["id"] for c in concepts] != list(range(len(concepts))):
        raise ValueError("concept ids must be 0..N-1")
      vocab = cls(names, counts, {str(k): int(v) for k, v in data["name_to_id"].items()},
                  {str(k): int(v) for k, v in data.get("label_to_id", {}).items()},
                  data.get("normalizer", "spacy"))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: not a concept vocabulary ({e!r}); expected {{'concepts': "
                       f"[{{id, name, count}}], 'name_to_id': {{...}}, 'normalizer'}}") from e
    if vocab.normalizer not in NORMALIZERS:
      raise ValueError(f"{where}: normalizer must be one of {NORMALIZERS}, got "
                       f"{vocab.normalizer!r}")
    bad = [v for v in list(vocab.name_to_id.values()) + list(vocab.label_to_id.values())
           if not 0 <= v < len(names)]
    if bad:
      raise ValueError(f"{where}: ids {sorted(set(bad))[:5]} are not concept ids")
    return vocab


def save_vocab(vocab: ConceptVocab, path: str):
  _write_json(vocab.to_json(), path)


def load_vocab(path: str) -> ConceptVocab:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"concept vocabulary file not found: {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"concept vocabulary {path} is not valid JSON: {e}") from e
  return ConceptVocab.from_json(data, path)


def build_vocab(sources: Sequence[tuple[collections.Counter, int]], normalizer: str = "spacy",
                aliases: dict[str, Sequence[str]] | None = None, nlp=None) -> ConceptVocab:
  """The concept vocabulary from label counts.

  Args:
    sources: (counts {raw label: instances}, min_instances) per image corpus; a normalised name
      is kept when its instances in one corpus reach that corpus's minimum.
    normalizer: "spacy" or "rules".
    aliases: {raw label: other names for it} (e.g. {"circle": ["disk"]}).
    nlp: the spaCy tagger for the "spacy" normaliser.

  Returns:
    A ConceptVocab, ids by total instances (descending), then name.
  """
  raw = sorted({label for counts, _ in sources for label in counts}
               | {a for names in (aliases or {}).values() for a in names})
  normal = dict(zip(raw, _name_keys(raw, normalizer, nlp)))
  totals, kept = collections.Counter(), set()
  for counts, min_instances in sources:
    per_source = collections.Counter()
    for label, n in counts.items():
      if normal[label]:
        per_source[normal[label]] += n
    totals.update(per_source)
    kept.update(name for name, n in per_source.items() if n >= min_instances)
  names = sorted(kept, key=lambda n: (-totals[n], n))
  name_to_id = {n: i for i, n in enumerate(names)}
  for label, others in (aliases or {}).items():
    if normal[label] in name_to_id:
      for other in others:
        name_to_id.setdefault(normal[other], name_to_id[normal[label]])
  label_to_id = {label: name_to_id[normal[label]] for counts, _ in sources for label in counts
                 if normal[label] in name_to_id}
  return ConceptVocab(tuple(names), tuple(totals[n] for n in names), name_to_id, label_to_id,
                      normalizer)


def demo_object_labels(obj, colors: bool = True) -> list[str]:
  """Labels of one demo object: its shape, and "<colour> <shape>" with `colors`."""
  def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)
  shape = text(obj["shape"])
  return [shape, f"{text(obj['color'])} {shape}"] if colors else [shape]


def demo_label_counts(split: str = "train", config: str = "default", colors: bool = True):
  """({label: objects} over a demo split, {label: caption synonyms}) for `build_vocab`."""
  from input_pipeline import demo_data  # pylint: disable=import-outside-toplevel  (imports TF)
  counts = collections.Counter()
  for _, scene, _ in object_labels.demo_scenes(split, config):
    for obj in scene["objects"]:
      counts.update(demo_object_labels(obj, colors))
  aliases = {}
  for shape, synonyms in demo_data.SHAPE_SYNONYMS.items():
    aliases[shape] = [s for s in synonyms if s != shape]
    if colors:
      for color in demo_data.COLORS:
        aliases[f"{color} {shape}"] = [f"{color} {s}" for s in synonyms if s != shape]
  return counts, {k: v for k, v in aliases.items() if v}


# ----------------------------------------------------------------------------- matching


def match_keys(keys: Sequence[str], vocab: ConceptVocab) -> list[tuple[int, int, int]]:
  """Concept spans over a sequence of word keys: longest first, then leftmost, no overlaps.

  Returns:
    [(start_word, end_word, concept_id)], end exclusive, sorted by start.
  """
  candidates = []
  for n in range(min(vocab.max_words, len(keys)), 0, -1):
    for start in range(len(keys) - n + 1):
      concept = vocab.name_to_id.get(" ".join(keys[start:start + n]))
      if concept is not None:
        candidates.append((start, start + n, concept))
  taken, spans = set(), []
  for start, end, concept in candidates:  # already longest first, then leftmost
    if not taken.intersection(range(start, end)):
      taken.update(range(start, end))
      spans.append((start, end, concept))
  return sorted(spans)


def find_grounded_words(sentence: str, vocab: ConceptVocab, *, normalizer: str | None = None,
                        doc=None, nlp=None) -> list[tuple[int, int, int]]:
  """The words of `sentence` that name a concept of `vocab`.

  Args:
    sentence: the raw sentence (word positions refer to its ALBEF-cleaned words).
    vocab: the concept vocabulary.
    normalizer: "spacy" or "rules"; default the vocabulary's own (the one its names went through).
    doc, nlp: the spaCy parse of `sentence`, or the pipeline to parse it (`word_keys`).

  Returns:
    [(start_word, end_word, concept_id)], end exclusive, sorted, non-overlapping.
  """
  _, keys = word_keys(sentence, normalizer or vocab.normalizer, doc, nlp)
  return match_keys(keys, vocab)


def word_spans_to_token_spans(words: Sequence[str], spans: Iterable[Sequence[int]],
                              tokenize_word: Callable[[str], Sequence], offset: int = 0,
                              max_len: int | None = None) -> list[tuple[int, ...]]:
  """Maps word spans to token spans.

  The token sequence is taken to be the words' tokenizations in a row (true of the pipeline's
  WordPiece and SentencePiece tokenizers on cleaned captions, see the module docstring); a word
  split into several pieces maps to all of them.

  Args:
    words: the words (`words.caption_words`).
    spans: (start_word, end_word, ...) with end exclusive; trailing fields (the concept id) are
      kept.
    tokenize_word: word -> its tokens (ids or pieces).
    offset: position of the first word's first token (1 after [CLS]).
    max_len: when given, spans reaching past this many tokens (truncated away) are dropped.

  Returns:
    [(start_token, end_token, ...)], end exclusive; spans of words without tokens are dropped.
  """
  starts = [offset]
  for word in words:
    starts.append(starts[-1] + len(tokenize_word(word)))
  out = []
  for span in spans:
    start, end, rest = int(span[0]), int(span[1]), tuple(span[2:])
    if not 0 <= start < end <= len(words):
      raise ValueError(f"word span {tuple(span)} is outside the {len(words)} words {words}")
    token_span = (starts[start], starts[end])
    if token_span[0] == token_span[1] or (max_len is not None and token_span[1] > max_len):
      continue
    out.append(token_span + rest)
  return out


# ----------------------------------------------------------------------------- annotation


def annotate_entries(entries: Sequence[dict], vocab: ConceptVocab, nlp=None,
                     batch_size: int = 512, n_process: int = 1):
  """Copies of ALBEF-style entries with `grounded_words` per caption (see the module docstring).

  Returns:
    (entries, stats dict: captions, captions_grounded, spans).
  """
  captions = [c for entry in entries for c in words_lib.entry_captions(entry)]
  if vocab.normalizer == "rules":
    docs = iter([None] * len(captions))
  else:
    docs = (nlp or tagger()).pipe(captions, batch_size=batch_size, n_process=n_process)
  stats = collections.Counter()
  out = []
  for entry in entries:
    per_caption = []
    for caption in words_lib.entry_captions(entry):
      spans = find_grounded_words(caption, vocab, doc=next(docs))
      per_caption.append([list(s) for s in spans])
      stats["captions"] += 1
      stats["captions_grounded"] += bool(spans)
      stats["spans"] += len(spans)
    new = dict(entry)
    new["grounded_words"] = per_caption[0] if isinstance(entry["caption"], str) else per_caption
    out.append(new)
  return out, dict(stats)


def _write_json(obj, path: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


# ----------------------------------------------------------------------------- command line


_FLAGS = (  # (kind, name, default, help)
    ("string", "coco_instances", None, "vocab: a COCO instances JSON."),
    ("string", "vg_objects", None, "vocab: a Visual Genome objects.json."),
    ("bool", "demo", False, "vocab: add the demo set's object names."),
    ("bool", "demo_colors", True, "Demo concepts include colour-shape pairs."),
    ("string", "demo_config", "default", "The vlpjax_demo config (default, tiny)."),
    ("integer", "coco_min_instances", DEFAULT_COCO_MIN_INSTANCES,
     "Keep COCO categories with at least this many instances."),
    ("integer", "vg_min_instances", DEFAULT_VG_MIN_INSTANCES,
     "Keep Visual Genome names with at least this many instances."),
    ("string", "normalizer", "spacy", f"Word normalisation, one of {NORMALIZERS}."),
    ("string", "input", None, "annotate: the ALBEF-style JSON to copy."),
    ("string", "vocab", None, "annotate: the concept vocabulary JSON."),
    ("string", "output", None, "vocab: the vocabulary JSON; annotate: the annotated copy."),
    ("string", "output_dir", None, "demo: directory for concepts.json and the split files."),
    ("string", "spacy_model", words_lib.SPACY_MODEL, "The spaCy model package."),
    ("integer", "batch_size", 512, "spaCy nlp.pipe batch size."),
    ("integer", "n_process", 1, "spaCy nlp.pipe processes."),
)


def define_flags(flag_values=None):
  """Defines the command's flags on `flag_values` (default absl's global FLAGS); returns it."""
  return words_lib.define_flags(_FLAGS, flag_values, module_name=__name__)


def run(argv, fv):
  """Runs the command argv[1] with the parsed flag values `fv`."""
  commands = ("vocab", "annotate", "demo")
  if len(argv) != 2 or argv[1] not in commands:
    raise ValueError(f"usage: python -m input_pipeline.grounded_words {{{','.join(commands)}}} "
                     f"--flags; got {argv[1:]}")
  if fv.normalizer not in NORMALIZERS:
    raise ValueError(f"--normalizer must be one of {NORMALIZERS}, got {fv.normalizer!r}")
  nlp = tagger(fv.spacy_model) if fv.normalizer == "spacy" else None
  if argv[1] in ("vocab", "demo"):
    if argv[1] == "vocab" and not fv.output:
      raise ValueError("missing --output")
    if argv[1] == "demo" and not fv.output_dir:
      raise ValueError("missing --output_dir")
    sources, aliases = [], {}
    if argv[1] == "vocab":
      if fv.coco_instances:
        sources.append((object_labels.read_coco_instances(fv.coco_instances)[1],
                        fv.coco_min_instances))
      if fv.vg_objects:
        sources.append((object_labels.read_vg_objects(fv.vg_objects)[1], fv.vg_min_instances))
    if argv[1] == "demo" or fv.demo:
      counts, aliases = demo_label_counts("train", fv.demo_config, fv.demo_colors)
      sources.append((counts, 1))
    if not sources:
      raise ValueError("vocab needs --coco_instances, --vg_objects and/or --demo")
    vocab = build_vocab(sources, fv.normalizer, aliases, nlp)
    path = fv.output if argv[1] == "vocab" else os.path.join(fv.output_dir, "concepts.json")
    save_vocab(vocab, path)
    logging.info("wrote %s: %d concepts (%d names and aliases, at most %d words)", path,
                 len(vocab.names), len(vocab.name_to_id), vocab.max_words)
    if argv[1] == "vocab":
      return
    for split in ("train", "test"):
      entries = [{"image_id": i, "caption": c}
                 for i, _, c in object_labels.demo_scenes(split, fv.demo_config)]
      annotated, stats = annotate_entries(entries, vocab, nlp, fv.batch_size, fv.n_process)
      path = os.path.join(fv.output_dir, f"demo_{split}.json")
      _write_json(annotated, path)
      logging.info("wrote %s: %s", path, stats)
    return
  if not (fv.input and fv.vocab and fv.output):
    raise ValueError("annotate needs --input, --vocab and --output")
  vocab = load_vocab(fv.vocab)
  nlp = tagger(fv.spacy_model) if vocab.normalizer == "spacy" else None
  entries = words_lib.read_annotations(fv.input)
  annotated, stats = annotate_entries(entries, vocab, nlp, fv.batch_size, fv.n_process)
  _write_json(annotated, fv.output)
  logging.info("wrote %s: %s", fv.output, stats)


def main():
  from vlpjax import cli  # pylint: disable=import-outside-toplevel
  fv = define_flags()
  cli.run(lambda argv: run(argv, fv))


if __name__ == "__main__":
  main()
