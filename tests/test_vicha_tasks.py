"""ViCHA downstream (configs/vicha_finetune.py): the task readers take ViCHA's `kwords` (NLVR2
`kwords1`, `kwords2`), the training and eval batches of every task carry the concept ids, the task
models feed them to the image encoder, and NLVR2 (text assignment + finetune + eval) runs end to end
from a ViCHA pretraining export."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import vicha, vicha_finetune
from input_pipeline import builder, ops_text, tasks
from vlpjax import checkpoint, train
from vlpjax.models import vlp


@pytest.fixture(scope="module", autouse=True)
def data_dirs(tmp_path_factory):
  saved = {k: os.environ.get(k) for k in ("VLPJAX_DATA_DIR", "VLPJAX_DEMO_DIR")}
  os.environ["VLPJAX_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
  os.environ["VLPJAX_DEMO_DIR"] = str(tmp_path_factory.mktemp("demo_tasks"))
  yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def test_task_readers_take_kwords(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  entries = [{"images": ["a.png", "a.png"], "sentence": "x", "label": "True", "kwords1": ["dog", "cat"],
              "kwords2": ["car"]},
             {"images": ["a.png", "a.png"], "sentence": "y", "label": "False"}]
  (tmp_path / "nlvr.json").write_text(json.dumps(entries))
  records = tasks.load_task_annotations("nlvr2", str(tmp_path / "nlvr.json"), str(tmp_path))
  assert records.rows[0]["concepts0"] == ["dog", "cat"] and records.rows[0]["concepts1"] == ["car"]
  read = tasks._example_reader("nlvr2", records.rows, train=True)
  first, second = read(0), read(1)
  assert [w.decode() for w in first["concepts0"].numpy()] == ["dog", "cat"]
  assert second["concepts1"].shape == (0,)  # an entry without kwords: no words
  entries[0]["kwords1"] = "dog cat"
  (tmp_path / "bad.json").write_text(json.dumps(entries))
  with pytest.raises(ValueError, match=r"bad.json: entry 0: field 'kwords1' must be a list of strings"):
    tasks.load_task_annotations("nlvr2", str(tmp_path / "bad.json"), str(tmp_path))


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli_ve", "grounding"])
def test_task_batches_carry_the_concepts_of_their_kwords(task):
  config = vicha_finetune.get_config(f"{task},tiny")
  keys = ("concept0_ids", "concept1_ids") if task == "nlvr2" else ("concept_ids",)
  length = config.input.eval_concept_max_len
  iterator = builder.make_train_iterator(config.input, global_batch_size=4, seed=0, process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  eval_batch = next(builder.make_eval_data(config.input, split="test", batch_size=4, process_index=0,
                                           process_count=1).batches())
  tokenizer = ops_text.load_tokenizer("sentencepiece", None)
  for key in keys:
    assert batch[key].shape == (4, length) and eval_batch[key].shape == (4, length), key
  # Eval row 0 is the first test entry: its concept string is its kwords, all of them.
  directory = os.path.dirname(tasks._annotation_files(config.input, "test")[0][0])
  first = json.load(open(os.path.join(directory, "test.json")))[0]
  words = first["kwords1"] if task == "nlvr2" else first["kwords"]
  decoded = tokenizer.decode(eval_batch[keys[0]][0]).split()
  assert decoded == words[:len(decoded)] and len(decoded) >= 10


def _init(model):
  return jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))(
      jax.random.PRNGKey(0))["params"]


def test_task_models_feed_concepts_to_the_image_encoder():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 100, (2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), jnp.int32)
  c1 = jnp.asarray(rng.integers(5, 100, (2, 5)), jnp.int32)
  c2 = jnp.asarray(rng.integers(5, 100, (2, 5)), jnp.int32)
  cmask = jnp.ones((2, 5), jnp.int32)
  for task, method in (("snli_ve", "cls_logits"), ("vqa", "vqa_encode"), ("nlvr2", "nlvr_logits")):
    model = vlp.build_model(vicha_finetune.get_config(f"{task},tiny").model)
    params = _init(model)
    assert "image_tokens" in params, task
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    pair = (images, images[::-1]) if task == "nlvr2" else (images,)

    def run(concepts):
      if task == "nlvr2":
        concepts = dict(concept0_ids=concepts, concept0_mask=cmask, concept1_ids=c1, concept1_mask=cmask)
      else:
        concepts = dict(concept_ids=concepts, concept_mask=cmask)
      return np.asarray(model.apply({"params": params}, *pair, ids, mask, **concepts, method=method))

    first, second = run(c1), run(c2)
    # The freshly initialised heads give small outputs: compare relative to their size (float32
    # noise is ~1e-7 of it).
    assert np.max(np.abs(first - second)) > 1e-4 * np.max(np.abs(first)), task


def test_nlvr2_with_concepts_end_to_end_from_a_vicha_export(tmp_path):
  pretrain = vicha.get_config("tiny")
  model = train.build_model(pretrain)
  export = tmp_path / "pretrained"
  checkpoint.export_params(jax.device_get(_init(model)), export)
  config = vicha_finetune.get_config("nlvr2,tiny")
  config.init_from.path = str(export)
  config.checkpoint.every_steps = 0
  out = train.train_and_evaluate(config, str(tmp_path / "nlvr"))
  assert out["step"] == config.total_steps and np.isfinite(out["train/cls/loss"])
  assert 0 <= out["eval/accuracy"] <= 100
