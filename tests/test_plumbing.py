"""The method plumbing: a new objective with its own head and queue needs no core edit; the
teacher and the objectives' state exist only when the config asks for them."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_runs
from configs import albef
from vlpjax import checkpoint, config_lib, train
from vlpjax.models import heads, layers
from vlpjax.objectives import context, registry

TOY_QUEUE = 32


# ----------------------------------------------------------------------------- a toy method, all here


def _build_toy_head(model):
  model.toy_proj = layers.Dense(4, ("embed", None), dtype=model.config.compute_dtype)


def _init_toy_head(model, feats):
  return dict(toy=model.toy_proj(feats["text"]["states"][:, 0]))


def toy_project(model, states):
  """A head function outside the model class, called as `ctx.student.apply(toy_project, ...)`."""
  return layers.l2_normalize(model.toy_proj(states[:, 0]).astype(jnp.float32))


heads.register_head("toy_proj", build=_build_toy_head, init=_init_toy_head)


def _init_toy_queue(cfg, model_config, rng):
  del model_config
  return dict(rows=layers.l2_normalize(jax.random.normal(rng, (int(cfg.queue_size), 4))),
              ptr=jnp.zeros((), jnp.int32))


def _update_toy_queue(ctx, batch, queue):
  rows = ctx.toy_text_feat
  ptr = queue["ptr"]
  return dict(rows=jax.lax.dynamic_update_slice(queue["rows"], rows, (ptr, 0)),
              ptr=(ptr + rows.shape[0]) % queue["rows"].shape[0])


@context.feature("toy_text_feat")
def _toy_text_feat(ctx):
  return ctx.student.apply(toy_project, ctx.text["states"])


@registry.register("toy_contrast", heads=("toy_proj",), init_state=_init_toy_queue, update_state=_update_toy_queue)
def toy_contrast_loss(ctx, batch):
  """Pulls the toy text features away from the queue rows (mean cosine), a loss with a queue."""
  del batch
  sims = ctx.toy_text_feat @ ctx.state["rows"].T
  loss = jnp.mean(sims)
  return loss, {"loss": loss, "ptr": ctx.state["ptr"].astype(jnp.float32)}


def _tiny(steps=3):
  return tiny_runs.config(f"configs/albef.py:tiny,steps={steps}", synthetic=True, eval_every=0,
                          checkpoint_every=0)


def test_toy_objective_with_own_head_and_queue_trains_on_8_devices(tmp_path):
  config = _tiny()
  config.sharding.mesh = dict(data=8)
  config.model.heads = ("itc", "itm", "mlm", "toy_proj")
  config.objectives.toy_contrast = dict(weight=0.5, queue_size=TOY_QUEUE)
  workdir = str(tmp_path / "toy")
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 3 and np.isfinite(out["train/toy_contrast/loss"])
  # The queue pointer the loss saw at step 3 (after 2 writes of 16 rows) wrapped once.
  assert out["train/toy_contrast/ptr"] == (2 * config.batch_size) % TOY_QUEUE
  saved = checkpoint.load_params(checkpoint.checkpoint_dir(workdir) / "3" / "state")
  assert set(saved["objective_state"]) == {"itc", "toy_contrast"}
  assert int(saved["objective_state"]["toy_contrast"]["ptr"]) == (3 * config.batch_size) % TOY_QUEUE
  np.testing.assert_allclose(np.linalg.norm(saved["objective_state"]["toy_contrast"]["rows"], axis=-1), 1.0,
                             rtol=1e-5)
  assert "toy_proj" in saved["params"]


def test_missing_head_fails_naming_the_objective():
  config = _tiny()
  config.objectives.toy_contrast = dict(weight=1.0, queue_size=TOY_QUEUE)
  with pytest.raises(ValueError, match=r"toy_contrast needs head\(s\) \['toy_proj'\]"):
    config_lib.validate(config)


def test_config_without_teacher_has_no_ema_params(tmp_path):
  config = _tiny(steps=2)
  config.teacher.momentum = 0.0
  config.objectives = dict(mlm=dict(weight=1.0, distill=False))
  config.model.heads = ("itc", "itm", "mlm")
  workdir = str(tmp_path / "no_teacher")
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 2 and np.isfinite(out["train/loss"])
  assert "train/alpha" not in out
  step_dir = checkpoint.checkpoint_dir(workdir) / "2" / "state"
  saved = checkpoint.load_params(step_dir)
  assert "ema_params" not in saved or not jax.tree.leaves(saved["ema_params"])
  assert not glob.glob(os.path.join(str(step_dir), "ema_params*"))
  assert not saved.get("objective_state")


def test_objective_that_reads_the_teacher_needs_one():
  config = _tiny()
  config.teacher.momentum = 0.0
  with pytest.raises(ValueError, match=r"config.objectives.itc reads the EMA teacher"):
    config_lib.validate(config)
