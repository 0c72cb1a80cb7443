"""MVP end to end on the tiny demo data (phrases parsed with spaCy once, cached): the joint recipe
and the curriculum train on 8 simulated devices, log each loss, keep no EMA params, and resume
across the stage boundary. The runs share their compiled steps through the compile cache."""
import glob
import os

import jax
import numpy as np
import pytest

import tiny_runs
from configs import mvp
from vlpjax import checkpoint, config_lib, train

LOSSES = ("vsc", "mcr", "itm", "mlm", "wpg")


def _config(arg="tiny"):
  return tiny_runs.config(f"configs/mvp.py:{arg}", mesh=dict(data=8), eval_every=0)


def test_tiny_trains_on_8_devices_logs_each_loss_and_keeps_no_teacher(tmp_path):
  config = _config("tiny,steps=2")
  config.eval.every_steps = 2  # retrieval with the MVP eval text ops (phrases looked up by caption)
  workdir = str(tmp_path / "run")
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 2
  for name in LOSSES:
    assert np.isfinite(out[f"train/{name}/loss"]), name
    assert sorted(tiny_runs.scalars(workdir, f"train/{name}/loss")) == [1, 2], name
  assert out["train/wpg/with_phrases"] > 0.5  # the demo captions have phrases
  assert out["train/mcr/tags_masked"] > 0
  np.testing.assert_allclose(out["train/vsc/logit_scale"], 1 / 0.07, rtol=0.05)
  assert "train/alpha" not in out and "eval/r_mean" in out
  state_dir = checkpoint.checkpoint_dir(workdir) / "2" / "state"
  saved = checkpoint.load_params(state_dir)
  assert "ema_params" not in saved or not jax.tree.leaves(saved["ema_params"])
  assert not glob.glob(os.path.join(str(state_dir), "ema_params*"))
  assert not saved.get("objective_state")
  params = saved["params"]
  table = params["text"]["embeddings"]["word"]["embedding"]
  assert table.shape[0] == config.model.text.vocab_size + config.model.phrase_vocab_size
  assert {"vsc_head", "mcr_head", "mlm_head", "itm_head", "pooler"} <= set(params)
  assert "vision_proj" not in params and "temp" not in params


def test_curriculum_switches_objectives_at_the_step_and_resumes_across_it(tmp_path):
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(_config("tiny,steps=4,curriculum=2"), straight)
  for name in ("vsc", "mcr"):
    assert sorted(tiny_runs.scalars(straight, f"train/{name}/loss")) == [1, 2, 3, 4], name
  for name in ("itm", "mlm", "wpg"):
    assert sorted(tiny_runs.scalars(straight, f"train/{name}/loss")) == [3, 4], name
  assert os.path.isdir(checkpoint.export_dir(straight, "unimodal"))
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(_config("tiny,steps=4,curriculum=2"), resumed, stop_after=1)
  train.train_and_evaluate(_config("tiny,steps=4,curriculum=2"), resumed)
  want, got = tiny_runs.scalars(straight, "train/loss"), tiny_runs.scalars(resumed, "train/loss")
  assert sorted(got) == [1, 2, 3, 4]
  for step in (2, 3, 4):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5)


def test_config_checks_name_the_problem():
  config = mvp.get_config("tiny")
  config.model.fusion = "cross"
  with pytest.raises(ValueError, match="fusion must be 'merged'"):
    config_lib.validate(config)
  config = mvp.get_config("tiny")
  config.model.image_tokens = dict(kind="")
  with pytest.raises(ValueError, match="mcr predicts masked object tags"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="curriculum=9"):
    mvp.get_config("tiny,curriculum=9")
  config = mvp.get_config("tiny")
  config.objectives.wpg.negatives = "fuse"
  with pytest.raises(ValueError, match="'negatives' is 'fuse'"):
    config_lib.validate(config)
  config = mvp.get_config("tiny")
  config.objectives.itm.sims = "itc_sims"  # ALBEF's similarities need a teacher MVP does not have
  with pytest.raises(ValueError, match="reads the EMA teacher"):
    config_lib.validate(config)


def test_full_recipe_is_the_released_one():
  config = mvp.get_config()
  config_lib.validate(config)
  assert config.batch_size == 1024 and config.optim.lr == 5e-5 and config.optim.eps == 1e-8
  assert config.optim.grad_clip_norm == 10.0 and config.optim.schedule.warmup_steps == 0
  assert config.teacher.momentum == 0.0
  assert config.model.phrase_vocab_size == mvp.MVPTR_PHRASES and config.model.text.vocab_size == 30522
  assert set(config.objectives) == set(LOSSES)
  assert all(config.objectives[name].weight == 1.0 for name in LOSSES)
  assert "flip" not in config.input.pp and "mvp_text" in config.input.pp and "{annotations!r}" in config.input.pp


@pytest.mark.parametrize("size", ["demo", ""])
def test_ablation_arguments_drop_mcr_or_the_tags(size):
  base = mvp.get_config(size)
  assert "mcr" in base.objectives and "mcr" in base.model.heads and "key='tags'" in base.input.pp
  no_mcr = mvp.get_config(f"{size},mcr=0".lstrip(","))
  config_lib.validate(no_mcr)
  assert set(no_mcr.objectives) == set(LOSSES) - {"mcr"} and "mcr" not in no_mcr.model.heads
  assert no_mcr.model.image_tokens.kind == "mvp_tags"
  assert "key='tags'" in no_mcr.input.pp and "key='concept')" not in no_mcr.input.pp  # tags kept, unmasked
  no_tags = mvp.get_config(f"{size},tags=0".lstrip(","))
  config_lib.validate(no_tags)
  assert set(no_tags.objectives) == set(LOSSES) - {"mcr"} and "mcr" not in no_tags.model.heads
  assert not no_tags.model.image_tokens and "tags" not in no_tags.input.pp
  assert no_tags.input.pp == base.input.pp.split("|drop_tags(")[0]  # the caption ops unchanged
  staged = mvp.get_config(f"{size},tags=0,curriculum=2".lstrip(","))
  assert list(staged.stages[0]["objectives"]) == ["vsc"]
