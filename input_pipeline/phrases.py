r"""MVP level-2 concepts, offline: phrase tuples of captions, the phrase vocabulary, phrase ids per
caption and object tags per image; and MVP's phrase corruption rule.

    python -m input_pipeline.phrases vocab --annotations=coco.json,vg.json --output=id2phrase.json
    python -m input_pipeline.phrases annotate --input=coco.json --output=coco_mvp.json \
        --vocab=id2phrase.json --coco_instances=instances_train2014.json
    python -m input_pipeline.phrases demo --output_dir=/tmp/mvp_demo      # the embedded demo set

Phrases. MVPTR parses captions with SPICE (a Java scene-graph parser) into objects `(obj,)`,
attribute pairs `(obj, attr)` and relation triples `(subj, rel, obj)`; its released vocabulary
(`id2phrase_new.json`) maps ids to lists such as ["boat"], ["boat", "white"], ["man", "ride",
"wave"], ["man", "sit on", "bench"], ["light", "traffic"]. Here the tuples come from spaCy's
dependency parse (`en_core_web_sm`, from PyPI) with the rules below, written to give SPICE's
strings; the PyPI SceneGraphParser was evaluated and not used (it parses text itself so it cannot
reuse one parse, it turns "to the left of" into two relations through the noun "left", misses
relations behind a copula ("a triangle is under a diamond") and predicate adjectives, and keeps
pronouns as entities under spaCy 3).

Rules, on the parse of the raw caption (lemmas lower-cased; `nominal` = a NOUN or PROPN token, or
any token with an article child, which rescues nouns the small model tags as verbs, e.g. "a plus
sign"):
  * objects: every nominal token that is not a modifier of another nominal (compound, amod) and
    not part of a complex preposition; its lemma ("hydrants" -> "hydrant").
  * attributes (obj, attr): adjectival modifiers (amod, with their conjuncts: "red and white"),
    number modifiers (nummod: "two"), noun compounds ("fire hydrant" -> ("hydrant", "fire"), as
    SPICE's ("light", "traffic")) and the modifiers the parser hangs on them ("red fire hydrant" ->
    ("hydrant", "red")), predicate adjectives of a copula-like verb (be, look, seem,
    appear, become, remain, stay: "the dog is brown" -> ("dog", "brown")), and intransitive verbs
    of a subject ("a man sitting" -> ("man", "sit")). Adjectives and numbers keep their surface
    form ("smiling", "larger", as SPICE), nouns and verbs their lemma.
  * relations (subj, rel, obj): a preposition with a nominal object attached to a noun
    ("man in suit" -> ("man", "in", "suit")), to a verb ("sit on", "ride on top of": verb lemma +
    preposition; the copula is dropped: "is under" -> "under"), or to an adjective ("full of");
    direct objects of verbs ("man ride horse"); passives turn round ("piano is played by a woman" ->
    ("woman", "play", "piano")). The subject of a verb is its nominal subject, or the noun it
    modifies (acl, relcl: "a man riding a horse"), or that of the verb it is a conjunct or xcomp
    of; subjects and objects expand over their conjuncts ("a diamond above a triangle and a star").
  * complex prepositions: a preposition `of`/`to`/`from` whose head is a relational word (left,
    right, front, top, middle, side, back, edge, bottom, center, rear, next, close, ahead, outside,
    inside, near, out) joins it, with the preposition above it ("to the left of" -> to, left, of;
    "next to"). Any chain naming left or right and ending in `of` becomes "left of" / "right of"
    ("to the left of", "on the left side of"); others keep their words ("in front of", "on top of").
  * lemma fix: en_core_web_sm lemmatises "riding"/"rides" to "rid"; it becomes "ride".
Known limits of the small model: colour words before a shape are often tagged as nouns (they
become compound attributes, the same pair), and a few template captions ("a square colored cyan")
parse wrongly.

Phrase order and words. A caption's phrases are ordered as they occur (by their first word, then
objects before pairs before triples) and deduplicated; each comes with the positions of its words
(subject, relation words, object; determiners left out) among the words of the ALBEF-cleaned
caption (`words.caption_words`), which is what MVP's leakage rule (`corrupt_phrases`) needs: a
phrase is forced to [MASK] when one of its words is masked.

Vocabulary. `vocab` counts, for every phrase, the sentences (captions) containing it and keeps
those in >= --min_sentences (50, MVPTR's threshold), sorted by count (then objects, pairs,
triples, then alphabetically). Ids start at --id_offset (30522, the BERT word vocabulary), so phrase
ids extend the word-embedding table: MVP's table has `table_size` = last id + 1 rows (104,121 for
MVPTR's released vocabulary). The output is MVPTR's `id2phrase` JSON, {"30522": ["dog"], ...}, and
`--vocab` reads MVPTR's released file as well.

Annotation. `annotate` copies an ALBEF-style JSON (a list of entries with `caption`, a string or a
list of strings) and adds per caption `phrase_ids` (the in-vocabulary phrases, up to
--max_phrases=5, in order) and `phrase_words` (per phrase, its word positions); for a list of
captions both are lists of per-caption lists. With a tag source it adds `tags` per entry: the
object labels of the image (COCO instance names, Visual Genome object names, or a field such as
ViCHA's `kwords`), lower-cased, deduplicated, most frequent in the image first, as many as fit in
--max_tag_words=20 words. The token budget of MVP's tag sequence, `[CLS] tags [SEP]` <= 20 tokens,
is applied later, when the pipeline tokenizes the tags.
"""
import collections
from collections.abc import Iterable, Sequence
import dataclasses
import json
import os

from absl import logging
import numpy as np

from input_pipeline import object_labels
from input_pipeline import words as words_lib

Phrase = tuple[str, ...]  # (obj,), (obj, attr) or (subj, rel, obj)

BERT_VOCAB_SIZE = 30522
DEFAULT_MIN_SENTENCES = 50
DEFAULT_MAX_PHRASES = 5
DEFAULT_MAX_TAG_WORDS = 20

_RELATIONAL = frozenset({"left", "right", "front", "top", "middle", "side", "back", "edge",
                         "bottom", "center", "centre", "rear", "next", "close", "ahead", "outside",
                         "inside", "near", "out"})
_LINKERS = frozenset({"of", "to", "from"})
# How a relational word hangs below the word its relation attaches to.
_RELATIONAL_DEPS = frozenset({"pobj", "advmod", "amod", "npadvmod", "acomp", "prep", "acl",
                              "advcl", "ROOT"})
_PREDICATE_VERBS = frozenset({"be", "look", "seem", "appear", "become", "remain", "stay"})
_LEMMA_FIXES = {"rid": "ride"}
_MODIFIER_DEPS = frozenset({"compound", "amod"})


# ----------------------------------------------------------------------------- extraction


def _lemma(token) -> str:
  lemma = token.lemma_.lower()
  if lemma in _LEMMA_FIXES and token.lower_ != lemma:
    return _LEMMA_FIXES[lemma]
  return lemma


def _attribute_text(token) -> str:
  """Nouns as attributes by lemma, adjectives, participles and numbers as written (SPICE)."""
  return _lemma(token) if token.pos_ in ("NOUN", "PROPN") else token.lower_


def _is_nominal(token) -> bool:
  if token.pos_ in ("NOUN", "PROPN"):
    return True
  return token.pos_ in ("VERB", "ADJ") and any(
      c.dep_ == "det" and c.lower_ in ("a", "an", "the") for c in token.children)


def _with_conjuncts(token, keep) -> list:
  """`token` and its conjuncts (recursively) that satisfy `keep`."""
  out = [token]
  for c in token.children:
    if c.dep_ == "conj" and keep(c):
      out.extend(_with_conjuncts(c, keep))
  return out


def _complex_preposition(prep):
  """The words of the preposition ending in `prep` and its outermost word.

  "to the left of": called on `of` -> ([to, left, of], to); "next to" -> ([next, to], next);
  a plain preposition -> ([prep], prep).
  """
  chain, outer = [prep], prep
  while (outer.lower_ in _LINKERS and outer.head is not outer
         and outer.head.lower_ in _RELATIONAL and outer.head.dep_ in _RELATIONAL_DEPS):
    rel = outer.head
    chain.insert(0, rel)
    if rel.dep_ == "pobj" and rel.head.pos_ == "ADP" and rel.head is not rel:
      chain.insert(0, rel.head)
      outer = rel.head
    else:
      outer = rel
  return chain, outer


def _relation_name(chain) -> str:
  names = [t.lower_ for t in chain]
  if len(names) > 1 and names[-1] == "of":
    for side in ("left", "right"):
      if side in names:
        return f"{side} of"
  return " ".join(names)


def _verb_subjects(verb, seen=None) -> list:
  """Nominal subjects of `verb` (active or passive), else the noun it modifies, else those of the
  verb it is a conjunct or open complement of."""
  seen = set() if seen is None else seen
  if verb.i in seen:
    return []
  seen.add(verb.i)
  subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass") and _is_nominal(c)]
  if subjects:
    return [s for subj in subjects for s in _with_conjuncts(subj, _is_nominal)]
  if verb.dep_ in ("acl", "relcl") and _is_nominal(verb.head):
    return [verb.head]
  if verb.dep_ in ("conj", "xcomp") and verb.head.pos_ in ("VERB", "AUX"):
    return _verb_subjects(verb.head, seen)
  return []


def _anchor(token):
  """(subjects, predicate) of a relation whose preposition hangs below `token`: the predicate is
  the verb or adjective whose lemma leads the relation name, None for a noun or a copula."""
  if _is_nominal(token):
    return [token], None
  if token.pos_ in ("VERB", "AUX"):
    return _verb_subjects(token), None if _lemma(token) == "be" else token
  if token.pos_ == "ADJ":
    if token.dep_ == "amod" and _is_nominal(token.head):
      return [token.head], token
    if token.dep_ == "acomp":
      return _verb_subjects(token.head), token
  return [], None


def phrase_occurrences(doc) -> list[tuple[Phrase, tuple[int, ...]]]:
  """Phrase tuples of a parsed caption, each with the spaCy token indices of its words.

  Args:
    doc: a spaCy Doc with tags, lemmas and a dependency parse.

  Returns:
    [(phrase, token indices)], deduplicated (a repeated phrase keeps the union of its words) and
    ordered as they occur: by first word, then objects, pairs, triples, then the other words.
  """
  found = collections.OrderedDict()

  def add(phrase, tokens):
    indices = {t.i for t in tokens if t.pos_ != "DET"}
    found.setdefault(phrase, set()).update(indices)

  # Complex prepositions first: their relational words are no objects.
  relations, consumed = [], set()
  for token in doc:
    if token.dep_ not in ("prep", "agent", "prt"):  # prt: "driving down a street"
      continue
    for obj in token.children:
      if obj.dep_ != "pobj" or not _is_nominal(obj):
        continue
      chain, outer = _complex_preposition(token)
      consumed.update(t.i for t in chain if t.lower_ in _RELATIONAL)
      relations.append((token, obj, chain, outer))

  predicates_with_objects = set()
  for prep, obj, chain, outer in relations:
    if obj.i in consumed:
      continue
    objects = _with_conjuncts(obj, _is_nominal)
    if prep.dep_ == "agent" and prep.head.pos_ in ("VERB", "AUX"):
      verb = prep.head
      patients = [c for c in verb.children if c.dep_ == "nsubjpass" and _is_nominal(c)]
      for agent in objects:
        for patient in (p for s in patients for p in _with_conjuncts(s, _is_nominal)):
          add((_lemma(agent), _lemma(verb), _lemma(patient)), (agent, verb, patient))
      predicates_with_objects.add(verb.i)
      continue
    if outer.lower_ in _RELATIONAL and outer.pos_ in ("VERB", "AUX"):
      # "left" tagged as the verb leave ("a triangle is left of a disk"): its subjects are the
      # relation's, and it names no verb.
      subjects, predicate = _verb_subjects(outer), None
    else:
      subjects, predicate = _anchor(outer.head)
    name = _relation_name(chain)
    if predicate is not None:
      name = f"{_lemma(predicate)} {name}"
      predicates_with_objects.add(predicate.i)
    for subj in subjects:
      if subj.i in consumed:
        continue
      for o in objects:
        add((_lemma(subj), name, _lemma(o)),
            [subj, o, *chain] + ([predicate] if predicate is not None else []))

  for verb in doc:
    if verb.pos_ not in ("VERB", "AUX") or _lemma(verb) in _PREDICATE_VERBS:
      continue
    subjects = _verb_subjects(verb)
    direct = [o for c in verb.children if c.dep_ == "dobj" and _is_nominal(c)
              for o in _with_conjuncts(c, _is_nominal)]
    for subj in subjects:
      for o in direct:
        add((_lemma(subj), _lemma(verb), _lemma(o)), (subj, verb, o))
      if not direct and verb.i not in predicates_with_objects and verb.pos_ == "VERB":
        add((_lemma(subj), _lemma(verb)), (subj, verb))

  for token in doc:
    if not _is_nominal(token) or token.i in consumed:
      continue
    if token.dep_ in _MODIFIER_DEPS and _is_nominal(token.head):
      continue  # an attribute of its head
    add((_lemma(token),), (token,))
    # Modifiers the parser hung on a compound modifier belong to the head: "red fire hydrant".
    modifiers = [m for c in token.children
                 for m in [c] + ([g for g in c.children if g.dep_ in ("amod", "nummod")]
                                 if c.dep_ == "compound" else [])]
    for c in modifiers:
      if c.i in consumed:
        continue
      if c.dep_ in ("amod", "compound") or (c.dep_ == "nummod" and c.pos_ == "NUM"):
        for a in _with_conjuncts(c, lambda t: t.pos_ in ("ADJ", "NOUN", "PROPN", "VERB")):
          add((_lemma(token), _attribute_text(a)), (token, a))

  for acomp in doc:  # predicate adjectives: "the dog is brown (and white)"
    if (acomp.dep_ != "acomp" or acomp.i in consumed
        or _lemma(acomp.head) not in _PREDICATE_VERBS):
      continue
    for subj in _verb_subjects(acomp.head):
      for a in _with_conjuncts(acomp, lambda t: t.pos_ == "ADJ"):
        add((_lemma(subj), _attribute_text(a)), (subj, a))

  items = [(phrase, tuple(sorted(indices))) for phrase, indices in found.items() if indices]
  items = [(p, t) for p, t in items if all(p)]
  return sorted(items, key=lambda item: (item[1][0], len(item[0]), item[1], item[0]))


def extract_phrases(doc_or_text, nlp=None) -> list[Phrase]:
  """Phrase tuples of one caption, ordered as they occur (see `phrase_occurrences`).

  Args:
    doc_or_text: a parsed spaCy Doc, or a caption string (parsed with `nlp`).
    nlp: the spaCy pipeline for a string; default `words.load_spacy()`.
  """
  if isinstance(doc_or_text, str):
    doc_or_text = (nlp or words_lib.load_spacy())(doc_or_text)
  return [phrase for phrase, _ in phrase_occurrences(doc_or_text)]


def caption_phrases(caption: str, doc) -> list[tuple[Phrase, tuple[int, ...]]]:
  """Phrases of `caption` (parsed as `doc`) with their word positions in the ALBEF-cleaned caption
  (`words.caption_words`); a phrase whose words all vanish in cleaning is dropped."""
  if doc.text != caption:
    raise ValueError(f"the parse is of {doc.text!r}, not of the caption {caption!r}")
  _, char_to_word = words_lib.caption_words(caption)
  token_words = words_lib.token_word_indices(doc, char_to_word)
  out = []
  for phrase, tokens in phrase_occurrences(doc):
    positions = tuple(sorted({token_words[t] for t in tokens if token_words[t] >= 0}))
    if positions:
      out.append((phrase, positions))
  return out


def parse(captions: Iterable[str], nlp=None, batch_size: int = 256, n_process: int = 1):
  """spaCy Docs of the captions, in order (nlp.pipe)."""
  nlp = nlp or words_lib.load_spacy()
  return nlp.pipe(captions, batch_size=batch_size, n_process=n_process)


# ----------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True)
class PhraseVocab:
  """Phrase tuples and their ids in the word-embedding table.

  Attributes:
    phrase_to_id: {phrase tuple: id}.
    id_offset: the first phrase id (the word vocabulary size the ids follow).
  """

  phrase_to_id: dict
  id_offset: int = BERT_VOCAB_SIZE

  @property
  def num_phrases(self) -> int:
    return len(self.phrase_to_id)

  @property
  def table_size(self) -> int:
    """Rows of the enlarged embedding table: last phrase id + 1."""
    return max(self.phrase_to_id.values(), default=self.id_offset - 1) + 1

  def id2phrase(self) -> dict:
    """MVPTR's `id2phrase` JSON object: {"<id>": [phrase strings]}, ids ascending."""
    return {str(i): list(p) for p, i in sorted(self.phrase_to_id.items(), key=lambda x: x[1])}


def count_phrases(phrase_lists: Iterable[Iterable[Phrase]]) -> collections.Counter:
  """{phrase: number of sentences containing it}, from each sentence's phrases."""
  counts = collections.Counter()
  for phrases in phrase_lists:
    counts.update(set(phrases))
  return counts


def vocab_from_counts(counts: collections.Counter, min_sentences: int = DEFAULT_MIN_SENTENCES,
                      id_offset: int = BERT_VOCAB_SIZE) -> PhraseVocab:
  """Keeps the phrases seen in >= `min_sentences` sentences; ids from `id_offset`, by count
  (descending), then objects, pairs, triples, then alphabetically."""
  if min_sentences < 1:
    raise ValueError(f"min_sentences must be >= 1, got {min_sentences}")
  kept = sorted((p for p, c in counts.items() if c >= min_sentences),
                key=lambda p: (-counts[p], len(p), p))
  return PhraseVocab({p: id_offset + k for k, p in enumerate(kept)}, id_offset)


def save_vocab(vocab: PhraseVocab, path: str):
  _write_json(vocab.id2phrase(), path)


def load_vocab(path: str, min_id: int | None = None) -> PhraseVocab:
  """Reads an `id2phrase` JSON (ours or MVPTR's released `id2phrase_new.json`).

  A phrase listed under several ids keeps its smallest id (the others are counted in the log).

  Args:
    path: the JSON file.
    min_id: when given, every id must be >= it (phrase ids must not collide with word ids).
  """
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"phrase vocabulary file not found: {path}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"phrase vocabulary {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict) or not data:
    raise ValueError(f"phrase vocabulary {path} must be a non-empty JSON object "
                     f"{{\"<id>\": [words]}}")
  phrase_to_id, duplicates = {}, 0
  for key, value in data.items():
    try:
      phrase_id = int(key)
    except ValueError as e:
      raise ValueError(f"phrase vocabulary {path}: key {key!r} is not an integer id") from e
    if (not isinstance(value, list) or not 1 <= len(value) <= 3
        or not all(isinstance(v, str) and v for v in value)):
      raise ValueError(f"phrase vocabulary {path}: id {key} must map to a list of 1 to 3 "
                       f"non-empty strings, got {value!r}")
    if min_id is not None and phrase_id < min_id:
      raise ValueError(f"phrase vocabulary {path}: id {phrase_id} is below {min_id}, inside the "
                       f"word vocabulary (check --id_offset)")
    phrase = tuple(value)
    if phrase in phrase_to_id:
      duplicates += 1
      phrase_id = min(phrase_id, phrase_to_id[phrase])
    phrase_to_id[phrase] = phrase_id
  if duplicates:
    logging.warning("phrase vocabulary %s: %d phrases listed under more than one id; each keeps "
                    "its smallest id", path, duplicates)
  return PhraseVocab(phrase_to_id, min(phrase_to_id.values()))


def caption_phrase_ids(phrases: Sequence[tuple[Phrase, tuple[int, ...]]], vocab: PhraseVocab,
                       max_phrases: int = DEFAULT_MAX_PHRASES):
  """The first `max_phrases` in-vocabulary phrases of a caption: (ids, word positions)."""
  ids, positions = [], []
  for phrase, words in phrases:
    if phrase in vocab.phrase_to_id and len(ids) < max_phrases:
      ids.append(vocab.phrase_to_id[phrase])
      positions.append(list(words))
  return ids, positions


# ----------------------------------------------------------------------------- tags


def select_tags(names: Iterable[str], max_words: int = DEFAULT_MAX_TAG_WORDS) -> list[str]:
  """Lower-cased, whitespace-collapsed, deduplicated names in order, as many as fit in
  `max_words` words (stopping at the first that does not fit)."""
  tags, used = [], 0
  for name in names:
    name = " ".join(str(name).lower().split())
    if not name or name in tags:
      continue
    n = len(name.split())
    if used + n > max_words:
      break
    tags.append(name)
    used += n
  return tags


def by_frequency(names: Sequence[str]) -> list[str]:
  """Distinct names, most frequent first, ties in order of first appearance."""
  counts = collections.Counter(names)
  first = {}
  for k, n in enumerate(names):
    first.setdefault(n, k)
  return sorted(counts, key=lambda n: (-counts[n], first[n]))


def demo_tags(objects, max_words: int = DEFAULT_MAX_TAG_WORDS) -> list[str]:
  """Object tags of a demo scene: each object's colour then shape, deduplicated, in object order.

  Args:
    objects: the scene's objects, dicts with "shape" and "color" (str or bytes).
  """
  def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)

  return select_tags([text(o[k]) for o in objects for k in ("color", "shape")], max_words)


# ----------------------------------------------------------------------------- corruption


def _check_corruption_args(prob, mask_fraction, random_fraction, phrase_vocab_size):
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"corrupt_phrases: prob must be in [0, 1], got {prob}")
  if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
    raise ValueError(f"corrupt_phrases: mask_fraction {mask_fraction} and random_fraction "
                     f"{random_fraction} must be >= 0 and sum to <= 1")
  if phrase_vocab_size < 1:
    raise ValueError(f"corrupt_phrases: phrase_vocab_size must be >= 1, got {phrase_vocab_size}")


def _apply_corruption(where, phrase_ids, forced, valid, u_select, u_kind, random_ids, *, prob,
                      mask_id, mask_fraction, random_fraction, keep_labels):
  """The corruption rule on drawn uniforms; `where` is np.where or tf.where."""
  selected = valid & ~forced & (u_select < prob)
  corrupted = where(u_kind < mask_fraction, mask_id,
                    where(u_kind < mask_fraction + random_fraction, random_ids, phrase_ids))
  out = where(forced, mask_id, where(selected, corrupted, phrase_ids))
  labels = where(forced | selected, phrase_ids if keep_labels else -1, -1)
  return out, labels


def corrupt_phrases(phrase_ids, phrase_word_ids, masked_word_ids, rng: np.random.Generator,
                    prob: float = 0.15, *, mask_id: int, word_vocab_size: int,
                    phrase_vocab_size: int, pad_id: int = 0, mask_fraction: float = 0.8,
                    random_fraction: float = 0.1, keep_labels: bool = False):
  """MVP's phrase corruption (MVPTR `random_phrases`), in NumPy.

  A phrase one of whose words was selected for MLM is forced to [MASK] (the phrase would give the
  word away otherwise). Every other real phrase is selected with probability `prob`; a selected
  phrase becomes [MASK] with probability `mask_fraction`, a uniform random phrase id in
  [word_vocab_size, word_vocab_size + phrase_vocab_size) with probability `random_fraction`, and
  stays as it is otherwise. The released code predicts no phrase: labels are all -1 unless
  `keep_labels`, which gives the original id at forced and selected phrases.

  Positions in `phrase_word_ids` index the same sequence as `masked_word_ids`: token positions
  of the text sequence (map word positions with `grounded_words.word_spans_to_token_spans`), or
  word positions with a per-word selection.

  Draws from `rng`, in this order: u_select, u_kind ~ U[0, 1) and the random ids, each of the
  shape of `phrase_ids`.

  Args:
    phrase_ids: int [..., P], `pad_id` on padding (never corrupted).
    phrase_word_ids: int [..., P, W], the positions of each phrase's words, -1 padding.
    masked_word_ids: int [..., L], MLM labels of the word sequence (the `mask_tokens` op's
      `mlm_labels`): >= 0 where the token was selected, -1 elsewhere.
    rng: the random generator.

  Returns:
    (corrupted int32 [..., P], labels int32 [..., P]).
  """
  _check_corruption_args(prob, mask_fraction, random_fraction, phrase_vocab_size)
  phrase_ids = np.asarray(phrase_ids, np.int64)
  positions = np.asarray(phrase_word_ids, np.int64)
  selected_words = np.asarray(masked_word_ids) >= 0
  if positions.shape[:-1] != phrase_ids.shape:
    raise ValueError(f"corrupt_phrases: phrase_word_ids {positions.shape} must be phrase_ids "
                     f"{phrase_ids.shape} + [words]")
  if selected_words.shape[:-1] != phrase_ids.shape[:-1]:
    raise ValueError(f"corrupt_phrases: masked_word_ids {selected_words.shape} and phrase_ids "
                     f"{phrase_ids.shape} must share their leading dimensions")
  length = selected_words.shape[-1]
  in_range = (positions >= 0) & (positions < length)
  hit = np.take_along_axis(selected_words[..., None, :], np.clip(positions, 0, max(length - 1, 0)),
                           axis=-1) if length else np.zeros(positions.shape, bool)
  valid = phrase_ids != pad_id
  forced = valid & np.any(hit & in_range, axis=-1)
  u_select = rng.random(phrase_ids.shape)
  u_kind = rng.random(phrase_ids.shape)
  random_ids = rng.integers(word_vocab_size, word_vocab_size + phrase_vocab_size, phrase_ids.shape)
  out, labels = _apply_corruption(
      np.where, phrase_ids, forced, valid, u_select, u_kind, random_ids, prob=prob, mask_id=mask_id,
      mask_fraction=mask_fraction, random_fraction=random_fraction, keep_labels=keep_labels)
  return out.astype(np.int32), labels.astype(np.int32)


def phrase_draws_tf(shape, seed, word_vocab_size: int, phrase_vocab_size: int):
  """The stateless draws of `corrupt_phrases_tf`: u_select, u_kind, random ids of `shape`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  select_seed, kind_seed, random_seed = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3))
  return (tf.random.stateless_uniform(shape, select_seed),
          tf.random.stateless_uniform(shape, kind_seed),
          tf.random.stateless_uniform(shape, random_seed, word_vocab_size,
                                      word_vocab_size + phrase_vocab_size, tf.int32))


def corrupt_phrases_tf(phrase_ids, phrase_word_ids, masked_word_ids, seed, prob: float = 0.15, *,
                       mask_id: int, word_vocab_size: int, phrase_vocab_size: int,
                       pad_id: int = 0, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                       keep_labels: bool = False):
  """`corrupt_phrases` in TensorFlow ops (eager or inside `Dataset.map`), with stateless draws
  from `seed` (int [2]; see `phrase_draws_tf`). Same shapes and rule; int32 outputs."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  _check_corruption_args(prob, mask_fraction, random_fraction, phrase_vocab_size)
  phrase_ids = tf.cast(phrase_ids, tf.int32)
  positions = tf.cast(phrase_word_ids, tf.int32)
  selected_words = tf.cast(masked_word_ids, tf.int32) >= 0
  length = tf.shape(selected_words)[-1]
  in_range = (positions >= 0) & (positions < length)
  hit = tf.gather(selected_words, tf.clip_by_value(positions, 0, tf.maximum(length - 1, 0)),
                  axis=-1, batch_dims=phrase_ids.shape.rank - 1)
  hit = hit & in_range & (length > 0)
  valid = tf.not_equal(phrase_ids, pad_id)
  forced = valid & tf.reduce_any(hit, axis=-1)
  u_select, u_kind, random_ids = phrase_draws_tf(tf.shape(phrase_ids), seed, word_vocab_size,
                                                 phrase_vocab_size)
  return _apply_corruption(
      tf.where, phrase_ids, forced, valid, u_select, u_kind, random_ids, prob=prob,
      mask_id=mask_id, mask_fraction=mask_fraction, random_fraction=random_fraction,
      keep_labels=keep_labels)


# ----------------------------------------------------------------------------- annotation files


def parse_annotations(entries: Sequence[dict], nlp=None, batch_size: int = 256,
                      n_process: int = 1):
  """Yields, per entry, the `caption_phrases` of each of its captions (a list per entry)."""
  captions = [c for entry in entries for c in words_lib.entry_captions(entry)]
  docs = parse(captions, nlp, batch_size, n_process)
  for entry in entries:
    yield [caption_phrases(c, doc) for c, doc in zip(words_lib.entry_captions(entry), docs)]


def tag_source(tags_field: str | None = None, coco_instances: str | None = None,
               vg_objects: str | None = None):
  """A function entry -> list of object labels (most frequent first) or None (no label known),
  from at most one source: a field of the entry (e.g. ViCHA's `kwords`), a COCO instances file or
  a Visual Genome objects file (matched on the base name of the entry's `image`). None when no
  source is given."""
  given = [s for s in (tags_field, coco_instances, vg_objects) if s]
  if len(given) > 1:
    raise ValueError("give at most one tag source: --tags_field, --coco_instances or --vg_objects")
  if not given:
    return None
  if tags_field:
    def from_field(entry):
      value = entry.get(tags_field)
      if value is None:
        return None
      if isinstance(value, str):
        return [value]
      if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"tags field {tags_field!r} must be a string or a list of strings, "
                         f"got {value!r}")
      return value
    return from_field
  labels, _ = (object_labels.read_coco_instances(coco_instances) if coco_instances
               else object_labels.read_vg_objects(vg_objects))

  def from_labels(entry):
    if "image" not in entry:
      raise ValueError(f"entry has no 'image' path to match object labels: {entry!r}")
    names = labels.get(object_labels.image_key(entry["image"]))
    return None if names is None else by_frequency(names)
  return from_labels


def annotate_entries(entries: Sequence[dict], per_entry_phrases: Iterable, vocab: PhraseVocab,
                     max_phrases: int = DEFAULT_MAX_PHRASES, tags=None,
                     max_tag_words: int = DEFAULT_MAX_TAG_WORDS):
  """Copies of `entries` with `phrase_ids`, `phrase_words` (and `tags` when `tags` is given).

  Args:
    entries: ALBEF-style entries.
    per_entry_phrases: per entry, the `caption_phrases` of each caption (`parse_annotations`).
    vocab: the phrase vocabulary.
    max_phrases: phrases kept per caption.
    tags: None, or a function entry -> object labels or None (`tag_source`).
    max_tag_words: words of tags kept per entry.

  Returns:
    (annotated entries, stats dict: captions, captions_with_phrases, phrases, entries_without_tags).
  """
  out = []
  stats = collections.Counter()
  for entry, caption_list in zip(entries, per_entry_phrases, strict=True):
    ids, positions = zip(*(caption_phrase_ids(p, vocab, max_phrases) for p in caption_list))
    stats["captions"] += len(ids)
    stats["captions_with_phrases"] += sum(1 for i in ids if i)
    stats["phrases"] += sum(len(i) for i in ids)
    new = dict(entry)
    if isinstance(entry["caption"], str):
      new["phrase_ids"], new["phrase_words"] = ids[0], positions[0]
    else:
      new["phrase_ids"], new["phrase_words"] = list(ids), list(positions)
    if tags is not None:
      names = tags(entry)
      if names is None:
        stats["entries_without_tags"] += 1
      new["tags"] = select_tags(names or [], max_tag_words)
    out.append(new)
  return out, dict(stats)


def demo_entries(split: str = "train", config: str = "default",
                 max_tag_words: int = DEFAULT_MAX_TAG_WORDS) -> list[dict]:
  """The demo split as ALBEF-style entries: `image_id`, `caption` (the five captions) and `tags`
  (`demo_tags` of the scene)."""
  return [{"image_id": image_id, "caption": captions,
           "tags": demo_tags(scene["objects"], max_tag_words)}
          for image_id, scene, captions in object_labels.demo_scenes(split, config)]


def describe_vocab(vocab: PhraseVocab) -> str:
  kinds = collections.Counter(len(p) for p in vocab.phrase_to_id)
  return (f"{vocab.num_phrases} phrases ({kinds[1]} objects, {kinds[2]} attribute pairs, "
          f"{kinds[3]} relation triples), ids {vocab.id_offset}..{vocab.table_size - 1}, "
          f"embedding table {vocab.table_size} rows")


# ----------------------------------------------------------------------------- command line


_FLAGS = (  # (kind, name, default, help)
    ("list", "annotations", [], "vocab: ALBEF-style annotation JSON files."),
    ("string", "input", None, "annotate: the annotation JSON to copy."),
    ("string", "output", None, "vocab: the id2phrase JSON; annotate: the annotated copy."),
    ("string", "output_dir", None, "demo: directory for id2phrase.json and the split files."),
    ("string", "vocab", None, "annotate: an id2phrase JSON (ours or MVPTR's released one)."),
    ("integer", "min_sentences", DEFAULT_MIN_SENTENCES,
     "vocab/demo: keep phrases seen in at least this many sentences."),
    ("integer", "id_offset", BERT_VOCAB_SIZE,
     "First phrase id: the size of the word vocabulary the phrase ids follow."),
    ("integer", "max_phrases", DEFAULT_MAX_PHRASES, "Phrase ids kept per caption."),
    ("string", "tags_field", None, "annotate: the entry field holding tags (e.g. kwords)."),
    ("string", "coco_instances", None, "annotate: a COCO instances JSON for the tags."),
    ("string", "vg_objects", None, "annotate: a Visual Genome objects.json for the tags."),
    ("integer", "max_tag_words", DEFAULT_MAX_TAG_WORDS, "Words of tags kept per image."),
    ("string", "demo_config", "default", "demo: the vlpjax_demo config (default, tiny)."),
    ("string", "spacy_model", words_lib.SPACY_MODEL, "The spaCy model package."),
    ("integer", "batch_size", 256, "spaCy nlp.pipe batch size."),
    ("integer", "n_process", 1, "spaCy nlp.pipe processes."),
)


def define_flags(flag_values=None):
  """Defines the command's flags on `flag_values` (default absl's global FLAGS); returns it."""
  return words_lib.define_flags(_FLAGS, flag_values)


def _require(flag_values, *names):
  missing = [f"--{n}" for n in names if not getattr(flag_values, n)]
  if missing:
    raise ValueError(f"missing {', '.join(missing)}")


def _write_json(obj, path: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def run(argv, flag_values):
  """Runs the command argv[1] with the parsed flag values."""
  commands = ("vocab", "annotate", "demo")
  if len(argv) != 2 or argv[1] not in commands:
    raise ValueError(f"usage: python -m input_pipeline.phrases {{{','.join(commands)}}} --flags; "
                     f"got {argv[1:]}")
  nlp = words_lib.load_spacy(flag_values.spacy_model)
  pipe = dict(nlp=nlp, batch_size=flag_values.batch_size, n_process=flag_values.n_process)
  if argv[1] == "vocab":
    _require(flag_values, "annotations", "output")
    counts = collections.Counter()
    for path in flag_values.annotations:
      entries = words_lib.read_annotations(path)
      counts.update(count_phrases(
          [p for p, _ in caption] for entry in parse_annotations(entries, **pipe)
          for caption in entry))
    vocab = vocab_from_counts(counts, flag_values.min_sentences, flag_values.id_offset)
    logging.info("%d distinct phrases, %d in >= %d sentences", len(counts), vocab.num_phrases,
                 flag_values.min_sentences)
    save_vocab(vocab, flag_values.output)
    logging.info("wrote %s: %s", flag_values.output, describe_vocab(vocab))
  elif argv[1] == "annotate":
    _require(flag_values, "input", "output", "vocab")
    vocab = load_vocab(flag_values.vocab, min_id=flag_values.id_offset)
    tags = tag_source(flag_values.tags_field, flag_values.coco_instances, flag_values.vg_objects)
    entries = words_lib.read_annotations(flag_values.input)
    annotated, stats = annotate_entries(entries, parse_annotations(entries, **pipe), vocab,
                                        flag_values.max_phrases, tags, flag_values.max_tag_words)
    _write_json(annotated, flag_values.output)
    logging.info("wrote %s: %s; vocabulary %s", flag_values.output, stats, describe_vocab(vocab))
  else:
    _require(flag_values, "output_dir")
    splits = {s: demo_entries(s, flag_values.demo_config, flag_values.max_tag_words)
              for s in ("train", "test")}
    parsed = {s: list(parse_annotations(e, **pipe)) for s, e in splits.items()}
    counts = count_phrases([p for p, _ in caption] for entry in parsed["train"]
                           for caption in entry)
    vocab = vocab_from_counts(counts, flag_values.min_sentences, flag_values.id_offset)
    logging.info("%d distinct phrases; in >= 5 / 50 sentences: %d / %d", len(counts),
                 sum(c >= 5 for c in counts.values()), sum(c >= 50 for c in counts.values()))
    save_vocab(vocab, os.path.join(flag_values.output_dir, "id2phrase.json"))
    logging.info("demo vocabulary (train split, >= %d sentences): %s", flag_values.min_sentences,
                 describe_vocab(vocab))
    for split, entries in splits.items():
      annotated, stats = annotate_entries(entries, parsed[split], vocab, flag_values.max_phrases)
      path = os.path.join(flag_values.output_dir, f"demo_{split}.json")
      _write_json(annotated, path)
      logging.info("wrote %s: %s", path, stats)


def main():
  from vlpjax import cli  # pylint: disable=import-outside-toplevel
  flag_values = define_flags()
  cli.run(lambda argv: run(argv, flag_values))


if __name__ == "__main__":
  main()
