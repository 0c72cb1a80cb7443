"""The demo's concept words (`demo_concepts`) and ViCHA's feeding ops as configs/vicha.py writes them:
training draws 4 of the image's words with replacement, evaluation keeps all of them; MAE's keep
indices per example; retrieval eval batches carry the concept ids."""
import collections

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import builder, concepts, ops_text, pipeline, registry
from vlpjax import config_lib

COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "star")


def _scenes(num: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    k = int(rng.integers(1, 5))
    out.append({"objects/color": [str(c) for c in rng.choice(COLORS, k)],
                "objects/shape": [str(s) for s in rng.choice(SHAPES, k)], "image_id": 1000 + i})
  return out


def _run(op_spec: str, scenes: list[dict], seeds=None) -> list[list[str]]:
  op = registry.get_op(op_spec)

  def gen():
    for i, scene in enumerate(scenes):
      yield {**scene, "_seed": np.asarray(seeds[i] if seeds else [i, 0], np.int64)}

  signature = {"objects/color": tf.TensorSpec([None], tf.string), "objects/shape": tf.TensorSpec([None], tf.string),
               "image_id": tf.TensorSpec([], tf.int64), "_seed": tf.TensorSpec([2], tf.int64)}
  ds = tf.data.Dataset.from_generator(gen, output_signature=signature).map(op)
  out = [[w.decode() for w in e["concepts"]] for e in ds.as_numpy_iterator()]
  del ds
  return out


def _scene_words(scene) -> list[str]:
  return list(dict.fromkeys(w for pair in zip(scene["objects/color"], scene["objects/shape"]) for w in pair))


def test_demo_concepts_follow_demo_kwords_rule():
  scenes = _scenes(400)
  lists = _run("demo_concepts(0.2, 15)", scenes)
  vocab = set(concepts.demo_vocabulary())
  replaced = total = 0
  for scene, words in zip(scenes, lists):
    scene_words = _scene_words(scene)
    assert len(words) == 15 and len(set(words)) == 15 and set(words) <= vocab
    for position, word in enumerate(words):
      if position < len(scene_words):
        total += 1
        if word != scene_words[position]:
          replaced += 1
          assert word not in scene_words  # a distractor, never another scene word
      else:
        assert word not in scene_words
  assert 0.16 < replaced / total < 0.24, replaced / total
  # error_rate 0: the scene words first, in order; 1: none of them.
  for scene, words in zip(scenes, _run("demo_concepts(0.0, 15)", scenes)):
    assert words[:len(_scene_words(scene))] == _scene_words(scene)
  for scene, words in zip(scenes, _run("demo_concepts(1.0, 15)", scenes)):
    assert not set(words) & set(_scene_words(scene))


def test_demo_concepts_are_a_property_of_the_image():
  scenes = _scenes(30, seed=1)
  first = _run("demo_concepts(0.5, 10)", scenes)
  other_example_seeds = _run("demo_concepts(0.5, 10)", scenes, seeds=[[7, i] for i in range(30)])
  assert first == other_example_seeds  # same image, other position / epoch: same words
  shifted = [dict(s, image_id=s["image_id"] + 1) for s in scenes]
  assert first != _run("demo_concepts(0.5, 10)", shifted)
  assert first != _run("demo_concepts(0.5, 10, seed=1)", scenes)


def test_demo_concepts_error_names_the_missing_field():
  op = registry.get_op("demo_concepts()")
  with pytest.raises(KeyError, match="objects/color"):
    op({"image_id": tf.constant(1, tf.int64), "_seed": tf.constant([0, 0], tf.int64)})


def _tiny_config():
  config = config_lib.load_config("configs/vicha.py:tiny")
  config.input.probe_examples = 1
  return config


def test_vicha_training_and_eval_ops_on_the_demo_data(tmp_path, monkeypatch):
  monkeypatch.setenv("VLPJAX_DATA_DIR", str(tmp_path / "data"))
  config = _tiny_config()
  tokenizer = ops_text.load_tokenizer("sentencepiece", None)
  iterator = builder.make_train_iterator(config.input, global_batch_size=16, seed=0, process_index=0,
                                         process_count=1)
  batch = next(iterator)
  iterator.close()
  n = (config.input.image_size // config.input.patch_size) ** 2
  assert batch["concept_ids"].shape == (16, config.input.concept_max_len) and batch["concept_mask"].dtype == np.int32
  assert batch["mae_keep_idx"].shape == (16, n // 4) and batch["mae_restore_idx"].shape == (16, n)
  assert "patch_mask" not in batch  # MAE's mask must not reach the context's masked_image
  for keep, restore in zip(batch["mae_keep_idx"], batch["mae_restore_idx"]):
    np.testing.assert_array_equal(np.sort(restore), np.arange(n))
    np.testing.assert_array_equal(restore[keep], np.arange(n // 4))  # visible first in shuffle order

  # Eval: every image's full concept list, the same words training draws from.
  eval_data = builder.make_eval_dataset(config.input, split="test", batch_size=32, process_index=0,
                                        process_count=1)
  assert set(eval_data.extra_fields) == {"concept_ids", "concept_mask"}
  images = next(eval_data.image_batches())
  assert images["concept_ids"].shape == (32, config.input.eval_concept_max_len)
  full = tokenizer.decode(images["concept_ids"][0])
  assert len(full.split()) >= 10  # 15 words (some cut by the tiny eval length)


def test_training_draws_four_concepts_with_replacement():
  """concepts_to_text({concept_draws}) as configs/vicha.py writes it: 4 draws from the 15 words,
  with replacement (repeats happen), one string; the eval op keeps all 15 in order."""
  words = [f"w{i}" for i in range(15)]
  spec = pipeline.config_fields.fill("concepts_to_text({concept_draws})", _tiny_config().input)
  op = registry.get_op(spec)
  draws, repeats = collections.Counter(), 0
  for seed in range(300):
    out = op({"concepts": tf.constant(words), "_seed": tf.constant([seed, 3], tf.int64)})["concept"]
    chosen = out.numpy().decode().split(" ")
    assert len(chosen) == 4 and set(chosen) <= set(words)
    repeats += len(set(chosen)) < 4
    draws.update(chosen)
  assert repeats > 0 and len(draws) == 15
  all_words = registry.get_op("concepts_to_text")({"concepts": tf.constant(words)})["concept"]
  assert all_words.numpy().decode() == " ".join(words)
