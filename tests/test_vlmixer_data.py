"""VLMixer's unpaired input: grounded words as token spans through the pipeline, the CMC batch op
against a NumPy reference, the text-only / image-only sources (bad items skipped and counted per
stream), several input streams per step resuming exactly, and the demo's broken pairing."""
import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest
import tensorflow as tf

from input_pipeline import builder
from input_pipeline import grounded_words as gw
from input_pipeline import ops_mix
from input_pipeline import ops_text
from input_pipeline import pipeline
from input_pipeline import unpaired
from vlpjax import config_lib
from vlpjax import data as data_lib
from vlpjax import sharding
from vlpjax import state as state_lib
from vlpjax.models import vlp
from vlpjax.objectives import context, gallery, registry

CAPTIONS = [
    "Two dogs next to a red fire hydrant.",   # plural, multi-word (longest match), sub-words
    "Mice under the traffic lights",          # irregular plural, multi-word plural
    "three squares",                           # SentencePiece: square + s
    "a cat on a mat",                          # nothing grounded
    "dogs dogs dogs dogs dogs dogs a dog",     # more occurrences than max_spans; the last is cut
]


@pytest.fixture(scope="module")
def vocab():
  counts = {"dog": 3, "fire hydrant": 2, "hydrant": 1, "mouse": 2, "traffic light": 2, "square": 1}
  return gw.build_vocab([(counts, 1)], "rules")


@pytest.fixture(scope="module")
def grounding_file(tmp_path_factory, vocab):
  entries, _ = gw.annotate_entries([{"caption": c} for c in CAPTIONS], vocab)
  path = tmp_path_factory.mktemp("grounding") / "grounded.json"
  path.write_text(json.dumps(entries))
  return str(path)


def _wordpiece(tmp_path):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "two", "dog", "##s", "next", "to", "a", "red",
           "fire", "hy", "##dra", "##nt", "mice", "under", "the", "traffic", "light", "three", "square",
           "cat", "on", "mat"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(words) + "\n")
  return str(path)


def _ground(captions, grounding, kind, model, max_len=16, max_spans=4):
  cfg = ml_collections.ConfigDict(dict(tokenizer=dict(kind=kind, path=model or "")))
  ops = pipeline.build_ops(f"clean_caption(30)|tokenize({max_len})|ground_words({grounding!r}, max_words=30, "
                           f"max_spans={max_spans}, max_len={max_len})", cfg)
  ds = tf.data.Dataset.from_tensor_slices({"caption": tf.constant(captions)}).map(ops)
  return list(ds.as_numpy_iterator())


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_grounded_words_reach_the_batch_as_token_spans(tmp_path, grounding_file, vocab, kind):
  model = _wordpiece(tmp_path) if kind == "wordpiece" else None
  tokenizer = ops_text.load_tokenizer(kind, model)
  out = _ground(CAPTIONS, grounding_file, kind, model, max_len=48)  # the demo model spells unknown words out
  got = []
  for example in out:
    spans = []
    for start, end, concept in zip(example["span_start"], example["span_end"], example["span_concept"]):
      if concept >= 0:
        spans.append((tokenizer.decode(example["text_ids"][start:end]), vocab.names[concept]))
    got.append(spans)
  assert got[0] == [("dogs", "dog"), ("fire hydrant", "fire hydrant")]
  assert got[1] == [("mice", "mouse"), ("traffic lights", "traffic light")]
  assert got[2] == [("squares", "square")]
  assert got[3] == []
  assert got[4] == [("dogs", "dog")] * 4  # max_spans = 4: the first four occurrences
  ids = out[0]["text_ids"]
  if kind == "wordpiece":  # dogs = dog ##s, hydrant = hy ##dra ##nt: every piece is in the span
    assert list(ids[2:4]) == [6, 7] and (out[0]["span_start"][0], out[0]["span_end"][0]) == (2, 4)
    # [CLS] two dog ##s next to a red (fire hy ##dra ##nt)
    assert (out[0]["span_start"][1], out[0]["span_end"][1]) == (8, 12)
  else:  # squares = ▁square s
    assert out[2]["span_end"][0] - out[2]["span_start"][0] == 2
  # The reference rule (grounded_words.word_spans_to_token_spans), spans cut off by max_len dropped.
  from input_pipeline import words
  for max_len in (16, 8, 48):
    out = _ground(CAPTIONS, grounding_file, kind, model, max_len=max_len)
    for caption, example in zip(CAPTIONS, out):
      cleaned = words.caption_words(caption)[0]
      spans = gw.find_grounded_words(caption, vocab)
      want = gw.word_spans_to_token_spans(cleaned, spans, lambda w: tokenizer.token_ids(tf.constant([w]))[0],
                                          offset=1, max_len=max_len)[:4]
      got = [tuple(map(int, s)) for s in zip(example["span_start"], example["span_end"], example["span_concept"])
             if s[2] >= 0]
      assert got == want, (caption, max_len)
    if max_len == 8:  # it cut something off
      assert any(len(gw.find_grounded_words(c, vocab)) > len([x for x in e["span_concept"] if x >= 0])
                 for c, e in zip(CAPTIONS[:4], out))


def _layout_reference(text_ids, text_mask, starts, ends, replace, p, pad_id):
  """The mixed sequence, one sentence at a time (ops_mix's docstring)."""
  b, length = text_ids.shape
  k = starts.shape[1]
  out_len = length + k * (p - 1)
  fields = {name: np.full((b, out_len), base, np.int32) for name, base in
            (("mix_ids", pad_id), ("mix_mask", 0), ("mix_positions", 0), ("mix_types", 0), ("mix_slot", -1))}
  for i in range(b):
    j, t = 0, 0
    while t < length:
      occ = [o for o in range(k) if replace[i, o] and starts[i, o] == t]
      if occ:
        o = occ[0]
        for q in range(p):
          fields["mix_ids"][i, j] = pad_id
          fields["mix_mask"][i, j] = 1
          fields["mix_positions"][i, j] = t
          fields["mix_types"][i, j] = 1
          fields["mix_slot"][i, j] = o * p + q
          j += 1
        t = ends[i, o]
        continue
      fields["mix_ids"][i, j] = text_ids[i, t]
      fields["mix_mask"][i, j] = text_mask[i, t]
      fields["mix_positions"][i, j] = t
      j += 1
      t += 1
  return fields


def test_cmc_layout_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  b, length, k, p = 12, 14, 4, 3
  text_ids = rng.integers(5, 50, (b, length)).astype(np.int32)
  lengths = rng.integers(4, length + 1, b)
  text_mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  text_ids = np.where(text_mask > 0, text_ids, 0)
  starts = np.full((b, k), -1, np.int32)
  ends = np.full((b, k), -1, np.int32)
  for i in range(b):  # non-overlapping spans of 1-3 tokens inside the sentence
    t, o = 1, 0
    while o < k and t < lengths[i] - 1:
      t += int(rng.integers(0, 2))
      size = int(rng.integers(1, 4))
      if t + size > lengths[i]:
        break
      starts[i, o], ends[i, o] = t, t + size
      t, o = t + size, o + 1
  replace = (starts >= 0) & (rng.random((b, k)) < 0.6)
  got = ops_mix.cmc_layout(tf.constant(text_ids), tf.constant(text_mask), tf.constant(starts), tf.constant(ends),
                           tf.constant(replace), entry_tokens=p, pad_id=0)
  want = _layout_reference(text_ids, text_mask, starts, ends, replace, p, 0)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name].numpy(), value, err_msg=name)
  assert replace.any() and (~replace & (starts >= 0)).any()


def _cmc_batch(p, min_replaced=0, seed=(1, 2)):
  batch = {"text_ids": tf.constant([[2, 7, 8, 9, 10, 0], [2, 11, 12, 0, 0, 0], [2, 13, 14, 15, 16, 17]]),
           "text_mask": tf.constant([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1] * 6]),
           "span_start": tf.constant([[1, 3], [-1, -1], [2, 4]]), "span_end": tf.constant([[3, 4], [-1, -1], [3, 6]]),
           "span_concept": tf.constant([[5, 6], [-1, -1], [1, 2]]), "_seed": tf.constant(seed, tf.int64)}
  return ops_mix.cmc(p, entry_tokens=2, min_replaced=min_replaced, pad_id=0)(batch)


def test_cmc_op_probability_positions_types_and_determinism():
  none = _cmc_batch(0.0)
  assert not none["cmc_valid"].numpy().any()
  np.testing.assert_array_equal(none["mix_ids"].numpy()[:, :6], none["text_ids"].numpy())
  np.testing.assert_array_equal(none["mix_types"].numpy(), 0)
  every = _cmc_batch(1.0)
  np.testing.assert_array_equal(every["cmc_replaced"].numpy(), [[1, 1], [0, 0], [1, 1]])
  np.testing.assert_array_equal(every["cmc_valid"].numpy(), [True, False, True])
  # Sentence 0: [CLS] (7 8 -> 2 slots at position 1) (9 -> 2 slots at position 3) 10
  np.testing.assert_array_equal(every["mix_ids"].numpy()[0], [2, 0, 0, 0, 0, 10, 0, 0])  # Lm = L + K (P - 1) = 8
  np.testing.assert_array_equal(every["mix_positions"].numpy()[0], [0, 1, 1, 3, 3, 4, 5, 0])
  np.testing.assert_array_equal(every["mix_types"].numpy()[0], [0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(every["mix_slot"].numpy()[0], [-1, 0, 1, 2, 3, -1, -1, -1])
  np.testing.assert_array_equal(every["mix_mask"].numpy()[0], [1, 1, 1, 1, 1, 1, 0, 0])
  half = [_cmc_batch(0.5, seed=(s, 0))["cmc_replaced"].numpy() for s in range(40)]
  assert 0.35 < np.mean([h[[0, 2]].mean() for h in half]) < 0.65
  np.testing.assert_array_equal(_cmc_batch(0.5, seed=(3, 4))["cmc_draw"].numpy(),
                                _cmc_batch(0.5, seed=(3, 4))["cmc_draw"].numpy())
  forced = [_cmc_batch(0.01, min_replaced=1, seed=(s, 1))["cmc_valid"].numpy() for s in range(5)]
  np.testing.assert_array_equal(forced, [[True, False, True]] * 5)


# ----------------------------------------------------------------------------- sources


def _png(seed: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def _stats(it, steps):
  for _ in range(steps):
    batch = next(it)
  return batch, it.stats()


def test_image_only_and_text_only_sources_skip_and_count_bad_items(tmp_path, vocab):
  vocab_path = str(tmp_path / "concepts.json")
  gw.save_vocab(vocab, vocab_path)
  (tmp_path / "img").mkdir()
  for i in range(3):
    (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
  (tmp_path / "img" / "broken.png").write_bytes(_png(9)[:40])
  box = [0.1, 0.2, 0.5, 0.6]
  entries = [{"image": "img/0.png", "objects": [{"label": "dog", "bbox": box}, {"label": "square", "bbox": box}]},
             {"image": "img/1.png", "objects": [{"label": "dog", "bbox": box}]},
             {"image": "img/2.png", "objects": [{"label": "unicorn", "bbox": box}]},   # no known object
             {"image": "img/broken.png", "objects": [{"label": "dog", "bbox": box}]},  # undecodable
             {"image": "img/missing.png", "objects": [{"label": "dog", "bbox": box}]}]  # no file
  (tmp_path / "objects.json").write_text(json.dumps(entries))
  cfg = ml_collections.ConfigDict(dict(
      format="image_only", source="json", annotations=str(tmp_path / "objects.json"), image_root=str(tmp_path),
      concept_vocab=vocab_path, image_size=16, max_objects=3, max_tags=8, tokenizer=dict(kind="sentencepiece", path=""),
      probe_examples=8))
  builder.validate_config(cfg)
  it = builder.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
  batch, stats = _stats(it, 3)
  assert stats["data_skipped_at_load"] == 1  # the missing file
  assert stats["data_skipped"] == stats["data_position"] - 6 > 0  # broken and unicorn, in each epoch
  assert set(batch) == {"image", "image_id", "object_boxes", "object_concepts", "tag_ids", "tag_mask",
                        "tag_mlm_ids", "tag_mlm_labels"}
  for concepts, boxes in zip(batch["object_concepts"], batch["object_boxes"]):
    kept = concepts >= 0
    assert set(concepts[kept]) <= {vocab.name_to_id["dog"], vocab.name_to_id["square"]}
    np.testing.assert_allclose(boxes[kept], [box] * kept.sum())
    np.testing.assert_array_equal(boxes[~kept], 0)
  # Text-only JSON: images are never opened (none of these files exists); empty captions are counted.
  texts = [{"image": "nowhere.jpg", "caption": ["Two dogs next to a red fire hydrant.", "three squares"]},
           {"image": "nowhere2.jpg", "caption": "   "}, {"caption": "a cat on a mat", "image_id": 7}]
  (tmp_path / "texts.json").write_text(json.dumps(texts))
  cfg = ml_collections.ConfigDict(dict(
      format="text_only", source="json", annotations=str(tmp_path / "texts.json"), max_len=16,
      tokenizer=dict(kind="sentencepiece", path=""), batch_pp="cmc(1.0, entry_tokens=2)", p_cmc=1.0))
  cfg.grounding = str(tmp_path / "texts_grounded.json")
  annotated, _ = gw.annotate_entries([texts[0], texts[2]], vocab)
  (tmp_path / "texts_grounded.json").write_text(json.dumps(annotated))
  cfg.pp = ("choose_caption|clean_caption(30)|tokenize({max_len})|ground_words({grounding!r}, max_spans=2, "
            "max_len={max_len})")
  builder.validate_config(cfg)
  it = builder.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
  batch, stats = _stats(it, 2)
  assert stats["data_skipped_at_load"] == 1 and stats["data_skipped"] == 0
  assert "image" not in batch and batch["mix_ids"].shape == (2, 16 + 2)
  assert batch["cmc_valid"].sum() == (batch["cmc_concept"][:, 0] >= 0).sum()


def test_image_only_reads_tfrecords_without_captions(tmp_path, vocab):
  vocab_path = str(tmp_path / "concepts.json")
  gw.save_vocab(vocab, vocab_path)
  path = str(tmp_path / "objects-00000-of-00001.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(4):
      feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(i)])),
                 "image_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
                 "objects/label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"dog", b"mouse"])),
                 "objects/bbox": tf.train.Feature(float_list=tf.train.FloatList(value=[0, 0, .5, .5, .5, .5, 1, 1]))}
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  cfg = ml_collections.ConfigDict(dict(format="image_only", source="tfrecord", tfrecord_pattern=path,
                                       concept_vocab=vocab_path, image_size=16, max_objects=2, max_tags=8,
                                       tokenizer=dict(kind="sentencepiece", path=""), shuffle_buffer=1))
  it = builder.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert sorted(batch["image_id"]) == [0, 1, 2, 3] and it.stats()["data_skipped"] == 0
  want = sorted([vocab.name_to_id["dog"], vocab.name_to_id["mouse"]])
  assert (np.sort(batch["object_concepts"], axis=1) == want).all()


# ----------------------------------------------------------------------------- several streams


@pytest.fixture
def demo_dir(tmp_path_factory, monkeypatch):
  root = str(tmp_path_factory.getbasetemp() / "demo_data")
  monkeypatch.setenv("VLPJAX_DATA_DIR", root)
  return root


def _tiny_config():
  return config_lib.load_config("configs/vlmixer.py:tiny")


def _leaves(batch):
  return jax.tree.leaves(jax.tree.map(np.asarray, batch))


def test_two_streams_resume_exactly(demo_dir):
  config = _tiny_config()
  config_lib.validate(config)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])

  def stream(start_step=0, position=None):
    return data_lib.make_train_stream(config, mesh, config.batch_size, start_step=start_step,
                                      start_position=position, process_index=0, process_count=1)

  straight = stream()
  batches = [next(straight) for _ in range(2)]
  state = straight.state()
  batches += [next(straight) for _ in range(2)]
  straight.close()
  assert set(batches[0]) == {"text", "image"} and state["step"] == 2
  assert set(state["data_position"]) == {"text", "image"}
  assert {"text/data_skipped", "image/data_skipped", "text/data_position"} <= set(straight.stats())
  for position in (state["data_position"], None):  # O(1) resume, and replay
    resumed = stream(2, position)
    for want in batches[2:]:
      for a, b in zip(_leaves(want), _leaves(next(resumed))):
        np.testing.assert_array_equal(a, b)
    resumed.close()
  # The two streams draw independently: a different order and different seeds.
  assert data_lib.stream_seed(0, "text") != data_lib.stream_seed(0, "image")


def test_demo_streams_never_pair_an_image_with_its_caption(demo_dir):
  config = _tiny_config()
  streams = data_lib.stream_configs(config)
  ids = {}
  for name, (cfg, _) in streams.items():
    source = builder.make_source(cfg, split=cfg.split)
    ids[name] = [int(e["image_id"]) for e in source.examples().as_numpy_iterator()]
  assert not set(ids["text"]) & set(ids["image"])
  assert sorted(ids["text"] + ids["image"]) == list(range(256))  # the two halves of the tiny demo's train split
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  it = data_lib.make_train_stream(config, mesh, config.batch_size, start_step=0, start_position=None,
                                  process_index=0, process_count=1)
  # On the device: every visual token of a mixed sentence comes from an image-stream image (of the
  # step's batch, or of the bank, written from earlier image batches), never from its own image.
  model = vlp.build_model(config.model)
  specs = registry.objective_specs(config.objectives)
  state = jax.jit(state_lib.make_init_fn(model, optax.identity(), specs, False))(jax.random.PRNGKey(0))

  @jax.jit
  def mix(objective_state, batch):
    ctx = context.Context(model=model, params=state.params, ema_params=None, objective_state=objective_state,
                          batch=batch, rng=jax.random.PRNGKey(1), step=jnp.int32(0), alpha=0.0, num_groups=1)
    view = ctx.with_cfg(next(s for s in specs if s.name == "gallery").cfg, "gallery")
    new_bank = gallery.update_bank(view, batch, objective_state["gallery"])
    return ctx.mixed_inputs["entry_image_id"], ctx.cmc_draws, new_bank

  objective_state = dict(state.objective_state)
  from_bank = 0
  for _ in range(4):
    batch = next(it)
    text_ids = np.asarray(batch["text"]["image_id"])
    assert not set(text_ids.tolist()) & set(ids["image"])
    assert set(np.asarray(batch["image"]["image_id"]).tolist()) <= set(ids["image"])
    entry_ids, draws, objective_state["gallery"] = mix(objective_state, batch)
    entry_ids = np.asarray(entry_ids)
    used = np.asarray(draws["use_batch"] | draws["use_bank"])
    assert used.any() and (entry_ids[used] >= 0).all() and (entry_ids[~used] == -1).all()
    assert set(entry_ids[used].tolist()) <= set(ids["image"])
    assert not (entry_ids == text_ids[:, None]).any()
    from_bank += int(np.asarray(draws["use_bank"]).sum())
  assert from_bank > 0
  it.close()


def test_stream_config_errors_name_the_stream():
  config = _tiny_config()
  config.input.streams.text.p_cmcc = 0.3
  with pytest.raises(ValueError, match=r"config\.input\.streams\.text\.p_cmcc"):
    config_lib.validate(config)
  config = _tiny_config()
  config.input.streams.image.source = "nowhere"
  with pytest.raises(ValueError, match=r"config\.input\.streams\.image"):
    config_lib.validate(config)
  assert set(unpaired.TEXT_SOURCE_KINDS) >= {"demo", "json", "tfrecord", "tfds"}
