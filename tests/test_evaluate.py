"""`python -m vlpjax.evaluate` / `evaluate_checkpoint`, and `init_from` taking EMA params and queues."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import albef, finetune_retrieval
from vlpjax import checkpoint, evaluate, optim, sharding, state as state_lib, train
from vlpjax.models import vlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _init_params(config, seed):
  model = train.build_model(config)
  init = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))
  return jax.device_get(init(jax.random.PRNGKey(seed))["params"])


@pytest.fixture(scope="module", autouse=True)
def demo_data_dir(tmp_path_factory):
  """One tiny demo dataset for the whole module (built on first use)."""
  previous = os.environ.get("VLPJAX_DATA_DIR")
  os.environ["VLPJAX_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
  yield os.environ["VLPJAX_DATA_DIR"]
  if previous is None:
    del os.environ["VLPJAX_DATA_DIR"]
  else:
    os.environ["VLPJAX_DATA_DIR"] = previous


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
  """A params export of the tiny pretraining model (with its MLM head) and its params."""
  params = _init_params(albef.get_config("tiny"), seed=7)
  directory = tmp_path_factory.mktemp("export") / "params"
  checkpoint.export_params(params, directory)
  return str(directory), params


def test_evaluate_checkpoint_loads_the_checkpoint(random_export, tmp_path):
  path, params = random_export
  config = finetune_retrieval.get_config("tiny")
  config.init_from.path = path
  model, restored, report = evaluate.restore_params(config, path)
  assert "mlm_head" in {p.split("/")[0] for p in report.unused}   # retrieval has no MLM head
  assert not report.new and not report.skipped
  for name, value in traverse_util.flatten_dict(restored, sep="/").items():
    np.testing.assert_array_equal(value, traverse_util.flatten_dict(params, sep="/")[name])
  results = evaluate.evaluate_checkpoint(config, workdir=str(tmp_path / "eval"), verbose=False)
  assert results["num_images"] == 64 and results["num_texts"] == 320
  for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
    assert 0.0 <= results[key] <= 100.0
  assert results["txt_r1"] <= results["txt_r5"] <= results["txt_r10"]
  assert results["img_r1"] <= results["img_r5"] <= results["img_r10"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "eval" / "eval"))


def test_evaluate_checkpoint_errors_name_the_problem(random_export, tmp_path):
  config = finetune_retrieval.get_config("tiny")
  with pytest.raises(ValueError, match="config.init_from.path"):
    evaluate.evaluate_checkpoint(config)
  other = str(tmp_path / "other")
  checkpoint.export_params({"something": {"else": np.zeros(3, np.float32)}}, other)
  with pytest.raises(ValueError, match="no parameter of the model"):
    evaluate.restore_params(config, other)


def test_command_line_prints_and_writes_results(random_export, demo_data_dir, tmp_path):
  path, _ = random_export
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             VLPJAX_DATA_DIR=demo_data_dir)
  output = tmp_path / "results.json"
  result = subprocess.run(
      [sys.executable, "-m", "vlpjax.evaluate", "--config=configs/finetune_retrieval.py:tiny",
       f"--config.init_from.path={path}", f"--output={output}", "--config.eval.k_test=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TR@1" in result.stdout and "r_mean" in result.stdout
  assert "loaded" in result.stdout and "unused" in result.stdout
  saved = json.loads(output.read_text())
  assert saved["k_test"] == 4 and saved["num_images"] == 64 and saved["checkpoint"] == path
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed["r_mean"] == pytest.approx(saved["r_mean"], abs=1e-4)


# ----------------------------------------------------------------------------- init_from


def _fresh_state(config):
  mesh = sharding.make_mesh(config.sharding.mesh.to_dict())
  setup = state_lib.setup_state(config, mesh)
  return setup.create(0), setup.shardings


def _converter_dir(directory, params, ema, queues):
  """The layout `python -m vlpjax.convert` writes: params, ema_params, queues.npz."""
  checkpoint.export_params(params, os.path.join(directory, "params"))
  if ema is not None:
    checkpoint.export_params(ema, os.path.join(directory, "ema_params"))
  if queues is not None:
    np.savez(os.path.join(directory, "queues.npz"), **queues)
  return str(directory)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_init_from_converter_dir_loads_ema_and_queues(tmp_path):
  config = finetune_retrieval.get_config("tiny")
  state, shardings = _fresh_state(config)
  source = _init_params(albef.get_config("tiny"), seed=1)
  ema = jax.tree.map(lambda x: x + 1.0, source)
  del ema["itm_head"]   # ALBEF has no momentum ITM head: the EMA follows the online one there
  rng = np.random.default_rng(0)
  shape = state.objective_state["itc"]["image"].shape
  queues = dict(image=rng.normal(size=shape).astype(np.float32), text=rng.normal(size=shape).astype(np.float32),
                idx=np.arange(shape[0], dtype=np.int32), ptr=np.asarray(5, np.int32))
  path = _converter_dir(tmp_path / "converted", source, ema, queues)
  out = train.init_from(train.build_model(config), state, ml_collections.ConfigDict(dict(path=path, dont_load=())), shardings)

  got_params, got_ema, want_ema = _flat(out.params), _flat(out.ema_params), _flat(ema)
  want_params = _flat(source)
  for name, value in got_params.items():
    np.testing.assert_array_equal(value, want_params[name])
    np.testing.assert_array_equal(got_ema[name], want_ema[name] if name in want_ema else want_params[name])
  np.testing.assert_array_equal(np.asarray(out.objective_state["itc"]["image"]), queues["image"])
  np.testing.assert_array_equal(np.asarray(out.objective_state["itc"]["text"]), queues["text"])
  np.testing.assert_array_equal(np.asarray(out.objective_state["itc"]["idx"]), np.full(shape[0], -1))  # ids restart empty
  assert int(out.objective_state["itc"]["ptr"]) == 0
  assert out.objective_state["itc"]["image"].sharding == shardings.objective_state["itc"]["image"]


def test_init_from_keeps_fresh_queues_of_another_size_and_copies_params_without_ema(tmp_path):
  config = finetune_retrieval.get_config("tiny")
  state, shardings = _fresh_state(config)
  source = _init_params(albef.get_config("tiny"), seed=2)
  rows, width = state.objective_state["itc"]["image"].shape
  queues = dict(image=np.ones((2 * rows, width), np.float32), text=np.ones((2 * rows, width), np.float32),
                idx=np.zeros(2 * rows, np.int32), ptr=np.asarray(0, np.int32))
  path = _converter_dir(tmp_path / "converted", source, None, queues)
  out = train.init_from(train.build_model(config), state, ml_collections.ConfigDict(dict(path=path, dont_load=("itm_head/.*",))), shardings)
  got_params, got_ema, fresh = _flat(out.params), _flat(out.ema_params), _flat(state.params)
  for name, value in got_params.items():
    want = fresh[name] if name.startswith("itm_head/") else _flat(source)[name]
    np.testing.assert_array_equal(value, want)
    np.testing.assert_array_equal(got_ema[name], value)
  np.testing.assert_array_equal(np.asarray(out.objective_state["itc"]["image"]), np.asarray(state.objective_state["itc"]["image"]))


def test_init_from_train_checkpoint_takes_its_ema(tmp_path):
  pretrain = albef.get_config("tiny,steps=2")
  pretrain.input.synthetic = True
  pretrain.eval.every_steps = 0
  pretrain.teacher.momentum = 0.5   # an EMA visibly different from the params after two steps
  workdir = str(tmp_path / "pretrain")
  train.train_and_evaluate(pretrain, workdir)
  config = finetune_retrieval.get_config("tiny")
  state, shardings = _fresh_state(config)
  path = str(checkpoint.checkpoint_dir(workdir))
  out = train.init_from(train.build_model(config), state, ml_collections.ConfigDict(dict(path=path, dont_load=())), shardings)
  root, step = checkpoint.locate_checkpoint(path)
  assert step == 2
  saved = checkpoint.load_params(root / str(step) / "state")   # the whole saved TrainState
  got_params, got_ema = _flat(out.params), _flat(out.ema_params)
  want_params, want_ema = _flat(saved["params"]), _flat(saved["ema_params"])
  differs = 0
  for name, value in got_params.items():
    np.testing.assert_array_equal(value, want_params[name])
    np.testing.assert_array_equal(got_ema[name], want_ema[name])
    differs += not np.array_equal(want_ema[name], value)
  assert differs > len(got_params) // 2
  np.testing.assert_array_equal(np.asarray(out.objective_state["itc"]["text"]), saved["objective_state"]["itc"]["text"])
  np.testing.assert_array_equal(np.asarray(out.objective_state["itc"]["idx"]), np.full(config.objectives.itc.queue_size, -1))
