"""The training loop end to end: TensorBoard events, checkpoints, exports, resume, smaller mesh."""
import os

import jax
import numpy as np
import pytest

import tiny_runs
from configs import albef
from vlpjax import checkpoint, train


def _synthetic_tiny(steps=4):
  return tiny_runs.config(f"configs/albef.py:tiny,steps={steps}", synthetic=True, eval_every=0,
                          checkpoint_every=2)


def test_resume_matches_uninterrupted_run(tmp_path):
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(_synthetic_tiny(), straight)
  interrupted = str(tmp_path / "interrupted")
  train.train_and_evaluate(_synthetic_tiny(), interrupted, stop_after=2)
  assert checkpoint.Checkpointer(checkpoint.checkpoint_dir(interrupted)).latest_step() == 2
  train.train_and_evaluate(_synthetic_tiny(), interrupted)
  want = tiny_runs.scalars(straight, "train/loss")
  got = tiny_runs.scalars(interrupted, "train/loss")
  assert sorted(want) == [1, 2, 3, 4] and sorted(got) == [1, 2, 3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
  for term in ("train/itc/loss", "train/itm/loss", "train/mlm/loss", "train/learning_rate"):
    assert tiny_runs.scalars(straight, term), term
  a = checkpoint.load_params(checkpoint.export_dir(straight, "pretrain"))
  b = checkpoint.load_params(checkpoint.export_dir(interrupted, "pretrain"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_restore_on_smaller_mesh_without_queue(tmp_path):
  """FSDP on 8 devices, then resumed on 4; with the layers under nn.scan (their stacked params
  shard `embed` over fsdp and keep the `layers` axis whole), exported in the scanned layout."""
  workdir = str(tmp_path / "run")
  config = _synthetic_tiny()
  config.objectives.itc.queue_size = 0
  config.model.scan_layers = True
  config.sharding.mesh = dict(data=4, fsdp=2, tensor=1)
  config.sharding.rules = "fsdp"
  train.train_and_evaluate(config, workdir, stop_after=2)
  config = _synthetic_tiny()
  config.objectives.itc.queue_size = 0
  config.model.scan_layers = True
  config.sharding.mesh = dict(data=2, fsdp=2, tensor=1)  # 4 of the 8 devices
  config.sharding.rules = "fsdp"
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 4
  assert np.isfinite(out["train/loss"])
  exported = checkpoint._read_items(checkpoint.export_dir(workdir, "pretrain"))
  assert exported["fusion"]["layers"]["output"]["dense"]["kernel"].shape[0] == config.model.text.fusion_layers


def test_bad_config_key_fails_before_compute(tmp_path):
  config = _synthetic_tiny()
  with config.unlocked():
    config.model.vision.widht = 3
  with pytest.raises(ValueError, match="widht"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


@pytest.mark.parametrize("device_augment", [False, True])
def test_resume_on_demo_data_sees_the_same_batches(tmp_path, monkeypatch, device_augment):
  monkeypatch.setenv("VLPJAX_DATA_DIR", str(tmp_path / "data"))

  def config():
    c = albef.get_config("tiny")
    c.eval.every_steps = 0
    c.total_steps = 3
    if device_augment:  # ALBEF's ops, the pixel ones on the (CPU) devices
      c.input.pp = ""
      c.input.device_augment = True
    return c

  train.train_and_evaluate(config(), str(tmp_path / "straight"))
  train.train_and_evaluate(config(), str(tmp_path / "resumed"), stop_after=1)
  meta = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(tmp_path / "resumed"))).read_meta()
  assert meta["data"]["data_position"] == 16  # one batch of 16 consumed, none skipped
  train.train_and_evaluate(config(), str(tmp_path / "resumed"))
  want = tiny_runs.scalars(str(tmp_path / "straight"), "train/loss")
  got = tiny_runs.scalars(str(tmp_path / "resumed"), "train/loss")
  for step in (2, 3):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
  assert tiny_runs.scalars(str(tmp_path / "straight"), "train/data_skipped")


def test_stage_with_its_own_input_reads_its_own_stream_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setenv("VLPJAX_DATA_DIR", str(tmp_path / "data"))
  from input_pipeline import builder
  calls = []
  make = builder.make_train_iterator

  def recording(cfg, **kwargs):
    calls.append((cfg.pp, kwargs["start_step"], kwargs["start_position"]))
    return make(cfg, **kwargs)

  monkeypatch.setattr(builder, "make_train_iterator", recording)
  other_pp = ("decode|resize(32)|normalize('clip')|choose_caption|clean_caption(30)|tokenize(16)"
              "|mask_tokens(0.15)")

  def config():
    c = albef.get_config("tiny")
    c.eval.every_steps = 0
    c.stages = [dict(name="a", steps=2, input=dict(pp=other_pp)), dict(name="b", steps=2)]
    return c

  base_pp = config().input.pp
  train.train_and_evaluate(config(), str(tmp_path / "straight"))
  assert calls == [(other_pp, 0, None), (base_pp, 0, None)]
  calls.clear()
  train.train_and_evaluate(config(), str(tmp_path / "resumed"), stop_after=3)
  train.train_and_evaluate(config(), str(tmp_path / "resumed"))
  # The resumed run continues stage b's stream after its first batch, without replaying it.
  assert calls == [(other_pp, 0, None), (base_pp, 0, None), (base_pp, 1, 16)]
  want = tiny_runs.scalars(str(tmp_path / "straight"), "train/loss")
  got = tiny_runs.scalars(str(tmp_path / "resumed"), "train/loss")
  np.testing.assert_allclose(got[4], want[4], rtol=1e-5)


def test_stage_input_override_with_an_unknown_field_fails_naming_it(tmp_path):
  config = _synthetic_tiny()
  config.stages = [dict(name="a", steps=2, input=dict(pp_typo="decode"))]
  with pytest.raises(ValueError, match=r"config.stages\[0\].input.pp_typo"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
