"""Each downstream task end to end on its tiny demo data: `configs/<task>.py:tiny` finetunes from
a pretraining export (`init_from`), evaluates itself at the end, and `vlpjax.evaluate` reports the
same metric from the exported params."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import albef, finetune_nlvr2, finetune_snli_ve, finetune_vqa, grounding
from vlpjax import checkpoint, evaluate, train
from vlpjax.models import vlp


@pytest.fixture(scope="module", autouse=True)
def data_dirs(tmp_path_factory):
  """The tiny demo datasets (captions and tasks) built once for the module."""
  saved = {k: os.environ.get(k) for k in ("VLPJAX_DATA_DIR", "VLPJAX_DEMO_DIR")}
  os.environ["VLPJAX_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
  os.environ["VLPJAX_DEMO_DIR"] = str(tmp_path_factory.mktemp("demo_tasks"))
  yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A params export of the tiny pretraining model (random weights: the wiring is under test)."""
  config = albef.get_config("tiny")
  model = train.build_model(config)
  init = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))
  directory = tmp_path_factory.mktemp("pretrained") / "params"
  checkpoint.export_params(jax.device_get(init(jax.random.PRNGKey(3))["params"]), directory)
  return str(directory)


def _finetune_and_evaluate(config, workdir, pretrained, metric):
  config.init_from.path = pretrained
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == config.total_steps
  assert np.isfinite(out["train/loss"])
  trained = out[f"eval/{metric}"]
  config.init_from.path = str(checkpoint.export_dir(workdir, "finetune" if config.get("stages") else "pretrain"))
  again = evaluate.evaluate_checkpoint(config, verbose=False)
  np.testing.assert_allclose(again[metric], trained, atol=1e-6)
  return out, again


def test_snli_ve_tiny(tmp_path, pretrained):
  config = finetune_snli_ve.get_config("tiny")
  out, results = _finetune_and_evaluate(config, str(tmp_path / "ve"), pretrained, "accuracy")
  assert results["num_examples"] > 0 and 0 <= results["accuracy"] <= 100
  assert "train/cls/loss" in out


def test_nlvr2_tiny_runs_text_assignment_then_finetunes(tmp_path, pretrained):
  config = finetune_nlvr2.get_config("tiny")
  assert [s["name"] for s in config.stages] == ["ta", "finetune"]
  out, results = _finetune_and_evaluate(config, str(tmp_path / "nlvr"), pretrained, "accuracy")
  assert 0 <= results["accuracy"] <= 100
  assert "train/cls/loss" in out
  assert os.path.isdir(checkpoint.export_dir(str(tmp_path / "nlvr"), "ta"))


def test_grounding_tiny(tmp_path, pretrained):
  config = grounding.get_config("tiny")
  out, results = _finetune_and_evaluate(config, str(tmp_path / "grounding"), pretrained, "accuracy")
  assert any(key.startswith("acc_") for key in results)
  assert "train/itm/loss" in out


def test_vqa_tiny(tmp_path, pretrained):
  config = finetune_vqa.get_config("tiny")
  config.eval.predictions = str(tmp_path / "predictions.json")
  out, results = _finetune_and_evaluate(config, str(tmp_path / "vqa"), pretrained, "accuracy")
  assert 0 <= results["accuracy"] <= 100 and "train/vqa/loss" in out
  import json
  predictions = json.load(open(tmp_path / "predictions.json"))
  assert len(predictions) == results["num_questions"] and {"question_id", "answer"} <= set(predictions[0])
