"""VLMixer grounded words: normalisation, concept vocabulary, matching and token spans. spaCy's
tagger is loaded once for the module."""
import collections
import itertools
import json
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
import sentencepiece

from input_pipeline import demo_data
from input_pipeline import grounded_words as gw
from input_pipeline import object_labels
from input_pipeline import ops_text
from input_pipeline import words


@pytest.fixture(scope="module")
def nlp():
  return gw.tagger()


COUNTS = collections.Counter({"dog": 10, "mouse": 5, "fire hydrant": 3, "hydrant": 2,
                              "traffic lights": 4, "car": 3, "skis": 2, "person": 9, "man": 4,
                              "teddy bear": 1, "hot dog": 2, "dog stand": 1, "hot dog stand": 1})


@pytest.fixture(scope="module", params=gw.NORMALIZERS)
def vocab(request, nlp):
  return gw.build_vocab([(COUNTS, 1)], request.param, nlp=nlp)


def _spans(sentence, vocab, nlp):
  """Grounded spans as (words, concept name) for readable asserts."""
  cleaned = words.caption_words(sentence)[0]
  return [(" ".join(cleaned[s:e]), vocab.names[c])
          for s, e, c in gw.find_grounded_words(sentence, vocab, nlp=nlp)]


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("word,singular", [
    ("dogs", "dog"), ("mice", "mouse"), ("men", "man"), ("children", "child"),
    ("knives", "knife"), ("leaves", "leaf"), ("skies", "sky"), ("ponies", "pony"),
    ("cookies", "cookie"), ("ties", "tie"), ("boxes", "box"), ("benches", "bench"),
    ("dishes", "dish"), ("glasses", "glasses"), ("buses", "bus"), ("bus", "bus"),
    ("grass", "grass"), ("tennis", "tennis"), ("skis", "ski"), ("shoes", "shoe"),
    ("tomatoes", "tomato"), ("sheep", "sheep"), ("scissors", "scissors"), ("cats", "cat"),
    ("Dogs", "dog"), ("gas", "gas"), ("is", "is"), ("cactus", "cactus"), ("t-shirts", "t-shirts"),
])
def test_singularize(word, singular):
  assert gw.singularize(word) == singular


def test_word_keys_use_noun_lemmas_and_keep_verbs(nlp):
  sentence = "Two mice, three men and a woman skiing on skis."
  cleaned, keys = gw.word_keys(sentence, "spacy", nlp=nlp)
  assert cleaned == ["two", "mice", "three", "men", "and", "a", "woman", "skiing", "on", "skis"]
  assert keys == ["two", "mouse", "three", "man", "and", "a", "woman", "skiing", "on", "ski"]
  assert gw.word_keys(sentence, "rules")[1] == keys
  with pytest.raises(ValueError, match="normalizer"):
    gw.word_keys(sentence, "stemmer")
  with pytest.raises(ValueError, match="the parse is of"):
    gw.word_keys(sentence, "spacy", doc=nlp("another sentence"))


# ----------------------------------------------------------------------------- matching

HAND_CASES = [
    ("Two dogs.", [("dogs", "dog")]),
    ("three mice and two men", [("mice", "mouse"), ("men", "man")]),
    ("A red fire hydrant!", [("fire hydrant", "fire hydrant")]),
    ("a hydrant near the traffic light", [("hydrant", "hydrant"),
                                          ("traffic light", "traffic light")]),
    ("a hot dog stand", [("hot dog stand", "hot dog stand")]),  # longest first
    ("hot dog stands and a dog stand", [("hot dog stands", "hot dog stand"),
                                        ("dog stand", "dog stand")]),
    ("dogs, cars; (mice)", [("dogs", "dog"), ("cars", "car"), ("mice", "mouse")]),
    ("a cart, a catfish and a doghouse", []),  # no match inside other words
    ("a man skiing on skis", [("man", "man"), ("skis", "ski")]),
    ("teddy-bears", [("teddy bears", "teddy bear")]),  # hyphens split words, as ALBEF does
    ("The dog's toy", [("dogs", "dog")]),  # the apostrophe goes, the word stays whole
]


@pytest.mark.parametrize("sentence,expected", HAND_CASES)
def test_find_grounded_words_hand_cases(vocab, nlp, sentence, expected):
  assert _spans(sentence, vocab, nlp) == expected


def test_find_grounded_words_positions(vocab, nlp):
  # cleaned: a(0) red(1) fire(2) hydrant(3) next(4) to(5) two(6) dogs(7)
  got = gw.find_grounded_words("A red fire hydrant next to two dogs.", vocab, nlp=nlp)
  assert got == [(2, 4, vocab.name_to_id["fire hydrant"]), (7, 8, vocab.name_to_id["dog"])]


def _reference_match(keys, names):
  """Slow spec: among all windows that spell a name, repeatedly take the longest (then the
  leftmost) one that overlaps nothing taken yet."""
  windows = [(s, e) for s in range(len(keys)) for e in range(s + 1, len(keys) + 1)
             if " ".join(keys[s:e]) in names]
  taken = []
  while True:
    free = [w for w in windows if all(w[1] <= t[0] or w[0] >= t[1] for t in taken)]
    if not free:
      return sorted((s, e, names[" ".join(keys[s:e])]) for s, e in taken)
    taken.append(min(free, key=lambda w: (-(w[1] - w[0]), w[0])))


def test_match_keys_matches_the_reference_on_random_sequences():
  rng = np.random.default_rng(0)
  alphabet = ["a", "b", "c", "d"]
  for _ in range(300):
    names = {" ".join(rng.choice(alphabet, int(rng.integers(1, 4)))) for _ in range(5)}
    name_to_id = {n: i for i, n in enumerate(sorted(names))}
    vocab = gw.ConceptVocab(tuple(sorted(names)), (1,) * len(names), name_to_id, {}, "rules")
    keys = list(rng.choice(alphabet, int(rng.integers(0, 12))))
    assert gw.match_keys(keys, vocab) == _reference_match(keys, name_to_id), (keys, names)


# ----------------------------------------------------------------------------- token spans


def _sentencepiece():
  processor = sentencepiece.SentencePieceProcessor(model_file=ops_text.DEMO_SP_MODEL)
  return processor


def test_word_spans_to_token_spans_with_the_demo_sentencepiece_model(vocab, nlp):
  sp = _sentencepiece()
  tokenizer = ops_text.load_tokenizer("sentencepiece")
  captions = demo_data.demo_captions(30) + ["A red fire hydrant next to two dogs."]
  pipeline_ids = tokenizer.token_ids(np.array(
      [" ".join(words.caption_words(c)[0]) for c in captions])).to_list()
  for caption, ids in zip(captions, pipeline_ids):
    cleaned = words.caption_words(caption)[0]
    # the pipeline's token sequence is the words' tokens in a row
    assert list(itertools.chain(*(sp.encode(w) for w in cleaned))) == ids
  cleaned = words.caption_words(captions[-1])[0]
  spans = gw.find_grounded_words(captions[-1], vocab, nlp=nlp)
  token_spans = gw.word_spans_to_token_spans(cleaned, spans, sp.encode, offset=1)
  sequence = [tokenizer.cls_id] + list(itertools.chain(*(sp.encode(w) for w in cleaned)))
  for (start, end, concept), (ws, we, wc) in zip(token_spans, spans):
    assert concept == wc
    assert sp.decode(sequence[start:end]) == " ".join(cleaned[ws:we])
  assert len(token_spans) == len(spans) == 2


def _wordpiece(tmp_path):
  vocab_words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "fire", "hy",
                 "##dra", "##nt", "##s", "next", "to", "two", "dog", "traffic", "light"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab_words) + "\n")
  return ops_text.Tokenizer("wordpiece", str(path)), vocab_words


def test_word_spans_to_token_spans_with_wordpiece_subwords(tmp_path):
  tokenizer, vocab_words = _wordpiece(tmp_path)
  cleaned = words.caption_words("Two red fire hydrants next to a traffic light.")[0]
  per_word = tokenizer.token_ids(np.array(cleaned)).to_list()
  assert [vocab_words[i] for i in per_word[3]] == ["hy", "##dra", "##nt", "##s"]
  whole = tokenizer.token_ids(np.array([" ".join(cleaned)])).to_list()[0]
  assert list(itertools.chain(*per_word)) == whole
  lengths = dict(zip(cleaned, map(len, per_word)))
  spans = [(2, 4, 7), (7, 9, 3)]  # "fire hydrants", "traffic light"
  got = gw.word_spans_to_token_spans(cleaned, spans, lambda w: range(lengths[w]), offset=1)
  # [CLS] two red fire hy ##dra ##nt ##s next to a traffic light
  assert got == [(3, 8, 7), (11, 13, 3)]
  assert gw.word_spans_to_token_spans(cleaned, spans, lambda w: range(lengths[w]), offset=1,
                                      max_len=12) == [(3, 8, 7)]
  assert gw.word_spans_to_token_spans(["a", "b"], [(0, 1), (1, 2)],
                                      lambda w: [] if w == "a" else [w]) == [(0, 1)]
  with pytest.raises(ValueError, match="outside the 2 words"):
    gw.word_spans_to_token_spans(["a", "b"], [(1, 3, 0)], lambda w: [w])


# ----------------------------------------------------------------------------- vocabulary


def test_build_vocab_from_coco_and_vg(tmp_path, nlp):
  coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
          "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "traffic light"},
                         {"id": 3, "name": "toaster"}],
          "annotations": [{"image_id": 1, "category_id": 1}] * 3
                         + [{"image_id": 1, "category_id": 2}]}
  (tmp_path / "coco.json").write_text(json.dumps(coco))
  vg = [{"image_id": 1, "objects": [{"names": ["traffic lights"]}] * 2
         + [{"names": ["Trees"]}] * 3 + [{"names": ["tree"]}] + [{"names": ["kite"]}]}]
  (tmp_path / "vg.json").write_text(json.dumps(vg))
  sources = [(object_labels.read_coco_instances(str(tmp_path / "coco.json"))[1], 1),
             (object_labels.read_vg_objects(str(tmp_path / "vg.json"))[1], 3)]
  vocab = gw.build_vocab(sources, "spacy", nlp=nlp)
  # toaster has no instance; kite (1 < 3 in VG) is dropped; "trees"/"tree" are one concept
  assert vocab.names == ("tree", "person", "traffic light")  # ties by name
  assert vocab.counts == (4, 3, 3)
  assert vocab.label_to_id == {"trees": 0, "tree": 0, "person": 1, "traffic lights": 2,
                               "traffic light": 2}
  assert vocab.max_words == 2
  path = tmp_path / "concepts.json"
  gw.save_vocab(vocab, str(path))
  assert gw.load_vocab(str(path)) == vocab
  data = json.loads(path.read_text())
  assert data["concepts"][2] == {"id": 2, "name": "traffic light", "count": 3, "aliases": []}
  data["name_to_id"]["ghost"] = 9
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"ids \[9\] are not concept ids"):
    gw.load_vocab(str(path))
  path.write_text(json.dumps({"names": []}))
  with pytest.raises(ValueError, match="not a concept vocabulary"):
    gw.load_vocab(str(path))


def test_demo_concepts_with_synonyms_and_colours(nlp):
  counts, aliases = gw.demo_label_counts("train", "tiny")
  vocab = gw.build_vocab([(counts, 1)], "spacy", aliases, nlp)
  assert set(demo_data.SHAPES) <= set(vocab.names)
  assert vocab.name_to_id["disk"] == vocab.name_to_id["circle"]
  assert vocab.name_to_id["plus sign"] == vocab.name_to_id["cross"]
  assert vocab.name_to_id["red disk"] == vocab.name_to_id["red circle"]
  assert vocab.label_to_id["red circle"] == vocab.name_to_id["red circle"]
  assert counts["circle"] == sum(counts[f"{c} circle"] for c in demo_data.COLORS)
  caption = "a big red disk left of a small blue plus sign and a yellow triangle"
  assert _spans(caption, vocab, nlp) == [("red disk", "red circle"),
                                         ("blue plus sign", "blue cross"),
                                         ("yellow triangle", "yellow triangle")]
  counts, aliases = gw.demo_label_counts("train", "tiny", colors=False)
  shapes_only = gw.build_vocab([(counts, 1)], "spacy", aliases, nlp)
  assert set(shapes_only.names) == set(demo_data.SHAPES)
  assert _spans("two disks", shapes_only, nlp) == [("disks", "circle")]


# ----------------------------------------------------------------------------- command line


def _flags(argv):
  fv = gw.define_flags(flags.FlagValues())
  return fv(argv), fv


def test_vocab_annotate_and_demo_commands(tmp_path, nlp):
  del nlp  # loaded once; the commands find it in words.load_spacy's cache
  coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
          "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "fire hydrant"}],
          "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 2}]}
  (tmp_path / "coco.json").write_text(json.dumps(coco))
  vocab_path = tmp_path / "concepts.json"
  argv, fv = _flags(["prog", "vocab", f"--coco_instances={tmp_path / 'coco.json'}",
                     f"--output={vocab_path}"])
  gw.run(argv, fv)
  vocab = gw.load_vocab(str(vocab_path))
  assert set(vocab.names) == {"dog", "fire hydrant"}
  entries = [{"image": "x.jpg", "caption": ["Two dogs by a fire hydrant.", "No concept here"]},
             {"image": "y.jpg", "caption": "A hydrant"}]
  (tmp_path / "ann.json").write_text(json.dumps(entries))
  argv, fv = _flags(["prog", "annotate", f"--input={tmp_path / 'ann.json'}",
                     f"--vocab={vocab_path}", f"--output={tmp_path / 'out.json'}"])
  gw.run(argv, fv)
  got = json.loads((tmp_path / "out.json").read_text())
  assert got[0]["grounded_words"] == [[[1, 2, vocab.name_to_id["dog"]],
                                       [4, 6, vocab.name_to_id["fire hydrant"]]], []]
  assert got[1]["grounded_words"] == []  # a string caption gets one flat list
  assert {k: got[0][k] for k in entries[0]} == entries[0]
  argv, fv = _flags(["prog", "demo", "--demo_config=tiny", f"--output_dir={tmp_path / 'demo'}",
                     "--normalizer=rules"])
  gw.run(argv, fv)
  demo_vocab = gw.load_vocab(str(tmp_path / "demo" / "concepts.json"))
  assert demo_vocab.normalizer == "rules"
  train = json.loads((tmp_path / "demo" / "demo_train.json").read_text())
  assert len(train) == 256 and all(len(e["grounded_words"]) == 5 for e in train)
  grounded = sum(bool(spans) for e in train for spans in e["grounded_words"])
  assert grounded / (5 * len(train)) > 0.6
  # colour-shape names win over the bare shape ("red disk" -> red circle)
  spans = [s for e in train for caption in e["grounded_words"] for s in caption]
  assert sum(end - start >= 2 for start, end, _ in spans) / len(spans) > 0.5
  argv, fv = _flags(["prog", "vocab", f"--output={vocab_path}"])
  with pytest.raises(ValueError, match="needs --coco_instances"):
    gw.run(argv, fv)
  argv, fv = _flags(["prog", "annotate", f"--input={tmp_path / 'ann.json'}"])
  with pytest.raises(ValueError, match="annotate needs"):
    gw.run(argv, fv)


def test_module_entry_point_defines_its_flags():
  # absl prints the module's flags for --helpshort (and exits with status 1).
  result = subprocess.run([sys.executable, "-m", "input_pipeline.grounded_words", "--helpshort"],
                          capture_output=True, text=True, check=False)
  assert "--vg_min_instances" in result.stdout and "--normalizer" in result.stdout
