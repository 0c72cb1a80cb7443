"""MVP's pipeline ops: phrases of captions through the real spaCy path into `[CLS] words phrases
[SEP]`, tags per image, and the phrase leakage rule against a NumPy reference."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import grounded_words, ops_image, ops_mvp, ops_text, phrases, pipeline, words

WORD_VOCAB = 128  # the demo models' word rows (the SentencePiece demo tokenizer has 99 pieces)
CFG = ml_collections.ConfigDict(dict(tokenizer=dict(kind="sentencepiece", path=""), caption_max_words=30))
KNOWN = {
    "a red circle to the left of a blue square":
        {("circle",), ("circle", "red"), ("circle", "left of", "square"), ("square",), ("square", "blue")},
    "a man riding a horse": {("man",), ("horse",), ("man", "ride", "horse")},
}


@pytest.fixture(scope="module")
def tokenizer():
  return ops_text.load_tokenizer("sentencepiece")


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
  """An ALBEF-style JSON annotated the way `python -m input_pipeline.phrases annotate` does."""
  nlp = words.load_spacy()
  entries = [{"image": "a.png", "image_id": 7, "caption": list(KNOWN), "tags": ["red", "circle", "blue", "square"]},
             {"image": "b.png", "image_id": 3, "caption": "two dogs", "tags": []}]
  parsed = list(phrases.parse_annotations(entries, nlp))
  counts = phrases.count_phrases([p for p, _ in caption] for entry in parsed for caption in entry)
  vocab = phrases.vocab_from_counts(counts, 1, WORD_VOCAB)
  annotated_entries, _ = phrases.annotate_entries(entries, parsed, vocab, max_phrases=5)
  path = tmp_path_factory.mktemp("mvp") / "train_mvp.json"
  path.write_text(json.dumps(annotated_entries))
  return str(path), vocab


def _run(spec, examples):
  """The ops of `spec` on each example, eagerly and inside Dataset.map (both must agree)."""
  fn = pipeline.build_ops(spec, CFG)
  eager = [{k: v.numpy() for k, v in fn(dict(e)).items()} for e in examples]
  keys = list(examples[0])
  ds = tf.data.Dataset.from_tensor_slices({k: [e[k] for e in examples] for k in keys}).map(
      pipeline.no_autograph(fn))
  mapped = list(ds.as_numpy_iterator())
  for a, b in zip(eager, mapped):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  return eager


def _example(caption, image_id, seed):
  return {"caption": tf.constant(caption), "image_id": tf.constant(image_id, tf.int64),
          "_seed": pipeline.example_seed(0, seed)}


def test_phrases_of_known_captions_become_the_level2_text(annotated, tokenizer):
  path, vocab = annotated
  id_to_phrase = {i: p for p, i in vocab.phrase_to_id.items()}
  spec = (f"mvp_concepts(path={path!r}, word_vocab={WORD_VOCAB}, phrase_vocab={vocab.num_phrases})"
          f"|clean_caption(30)|tokenize(16)|mvp_text(5, word_vocab={WORD_VOCAB}, phrase_vocab={vocab.num_phrases})"
          "|tokenize(8, key='tags', out='concept', append_sep=True)")
  outs = _run(spec, [_example(c, 7, k) for k, c in enumerate(KNOWN)] + [_example("two dogs", 3, 9)])
  for caption, out in zip(list(KNOWN) + ["two dogs"], outs):
    word_ids, _ = tokenizer.encode([caption], 16)
    n = int(_.sum()) - 1
    ids = out["text_ids"]
    assert ids.shape == (16 + 5 + 1,)
    np.testing.assert_array_equal(ids[:n + 1], word_ids[0, :n + 1])  # [CLS] words, unchanged
    found = ids[n + 1:][out["phrase_mask"][n + 1:] == 1]
    assert {id_to_phrase[int(i)] for i in found} == KNOWN.get(caption, {("dog",), ("dog", "two")})
    k = len(found)
    assert ids[n + 1 + k] == tokenizer.sep_id and not ids[n + 2 + k:].any()
    np.testing.assert_array_equal(out["text_mask"], np.arange(22) <= n + k + 1)
    assert "phrase_ids" not in out and "mlm_ids" not in out  # no masking asked: no corruption
  # The tags of image 7: `[CLS] red circle blue square [SEP]`; image 3 has none: `[CLS] [SEP]`.
  tag_ids, _ = tokenizer.encode(["red circle blue square"], 8, append_sep=True)
  np.testing.assert_array_equal(outs[0]["concept_ids"], tag_ids[0])
  np.testing.assert_array_equal(outs[-1]["concept_ids"][:3], [tokenizer.cls_id, tokenizer.sep_id, 0])


def _reference_corruption(example, out, phrase_ids, phrase_words, caption, tokenizer, phrase_vocab):
  """The op's outputs recomputed: word hits from the token labels, then the rule of
  `phrases._apply_corruption` on the op's own stateless draws."""
  cleaned = " ".join(words.caption_words(caption)[0])
  caption_words = cleaned.split(" ")
  spans = grounded_words.word_spans_to_token_spans(
      caption_words, [(w, w + 1) for w in range(len(caption_words))],
      lambda w: tokenizer.token_ids(tf.constant([w]))[0].numpy(), offset=1)
  labels = out["mlm_labels"]
  hit = np.array([np.any(labels[s:min(e, 16)] >= 0) for s, e in spans])
  seed = ops_image.example_seed(example, ops_mvp._SALT_PHRASES, "mvp_text")
  u_select, u_kind, random_ids = (t.numpy() for t in phrases.phrase_draws_tf(
      [5], seed, WORD_VOCAB, phrase_vocab))
  valid = phrase_ids != 0
  forced = valid & np.array([any(0 <= p < len(hit) and hit[p] for p in ws if p >= 0) for ws in phrase_words])
  expected, expected_labels = phrases._apply_corruption(  # pylint: disable=protected-access
      np.where, phrase_ids, forced, valid, u_select, u_kind, random_ids, prob=0.5, mask_id=tokenizer.mask_id,
      mask_fraction=0.8, random_fraction=0.1, keep_labels=True)
  return expected, expected_labels, forced


def test_phrase_corruption_in_the_op_follows_the_leakage_rule(tmp_path, tokenizer):
  caption = "a big red circle left of a tiny blue square"  # words 0..9
  phrase_ids = np.array([WORD_VOCAB, WORD_VOCAB + 1, WORD_VOCAB + 2, WORD_VOCAB + 3, 0])
  phrase_words = [[3], [2, 3], [3, 4, 5, 9], [8, 9]]
  path = tmp_path / "hand.json"
  path.write_text(json.dumps([{"image": "x.png", "image_id": 1, "caption": caption,
                               "phrase_ids": phrase_ids[:4].tolist(), "phrase_words": phrase_words}]))
  spec = (f"mvp_concepts(path={str(path)!r}, word_vocab={WORD_VOCAB}, phrase_vocab=6)|clean_caption(30)"
          f"|tokenize(16)|mask_tokens(0.3)|mvp_text(5, word_vocab={WORD_VOCAB}, phrase_vocab=6, prob=0.5)")
  examples = [_example(caption, 1, seed) for seed in range(40)]
  padded_words = np.full((5, 8), -1)
  for k, ws in enumerate(phrase_words):
    padded_words[k, :len(ws)] = ws
  forced_total = 0
  for example, out in zip(examples, _run(spec, examples)):
    n = int(out["text_mask"].sum()) - 6  # [CLS] + n words, then 4 phrases and [SEP]
    slots = slice(n + 1, n + 5)
    expected, expected_labels, forced = _reference_corruption(example, out, phrase_ids, padded_words, caption,
                                                              tokenizer, 6)
    np.testing.assert_array_equal(out["mlm_ids"][slots], expected[:4])
    np.testing.assert_array_equal(out["phrase_labels"][slots], expected_labels[:4])
    np.testing.assert_array_equal(out["text_ids"][slots], phrase_ids[:4])  # the clean text keeps them
    assert np.all(out["mlm_ids"][slots][forced[:4]] == tokenizer.mask_id)  # leakage: forced [MASK]
    assert np.all(out["mlm_labels"][n + 1:] == -1)  # words only for MLM
    assert out["mlm_ids"][n + 5] == tokenizer.sep_id
    forced_total += int(forced.sum())
  assert forced_total > 10  # the rule was exercised


def test_mvp_concepts_errors_name_the_problem(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([{"image": "x.png", "caption": "a dog", "phrase_ids": [5], "phrase_words": [[1]]}]))
  with pytest.raises(ValueError, match=r"phrase id 5 is outside \[128, 134\).*phrase_vocab_size"):
    ops_mvp.get_mvp_concepts(path=str(path), word_vocab=128, phrase_vocab=6)
  with pytest.raises(ValueError, match="exactly one"):
    ops_mvp.get_mvp_concepts(word_vocab=128, phrase_vocab=6)
  with pytest.raises((ValueError, FileNotFoundError), match="missing.json"):
    ops_mvp.get_mvp_concepts(path=str(tmp_path / "missing.json"), word_vocab=128, phrase_vocab=6)


def test_drop_tags_empties_a_seeded_fraction_and_tokenizes_to_cls_sep():
  examples = [{"tags": tf.constant("red circle blue square"), "_seed": pipeline.example_seed(0, i)}
              for i in range(400)]
  dropped = _run("drop_tags(0.3)|tokenize(20, key='tags', out='concept', append_sep=True)", examples)
  empty = np.array([e["tags"] == b"" for e in dropped])
  assert 0.22 < empty.mean() < 0.38   # 400 Bernoulli(0.3) draws
  cls = dropped[0]["concept_ids"][0]
  for e, was_dropped in zip(dropped, empty):   # a dropped image keeps `[CLS] [SEP]` only
    assert e["concept_ids"][0] == cls
    assert (e["concept_mask"].sum() == 2) == was_dropped
  again = _run("drop_tags(0.3)", examples)   # the same seeds draw the same images
  assert [e["tags"] == b"" for e in again] == list(empty)
  kept = _run("drop_tags(0.0)", examples[:5])
  assert all(e["tags"] == b"red circle blue square" for e in kept)
  with pytest.raises(ValueError, match=r"config.input.tag_drop"):
    ops_mvp.get_drop_tags(1.5)
