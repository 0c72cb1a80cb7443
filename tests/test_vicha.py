"""configs/vicha.py end to end: the tiny run trains on 8 simulated devices from the demo data
(concepts, MAE keep indices) and logs every term; the zero-shot retrieval eval feeds the concepts;
gradients reach the student only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tiny_runs
from vlpjax import config_lib, sharding, state as state_lib, step as step_lib, synthetic, train
from vlpjax.models import vlp
from vlpjax.objectives import registry


def test_tiny_run_on_8_devices_logs_each_term_and_evaluates_with_concepts(tmp_path, monkeypatch):
  monkeypatch.setenv("VLPJAX_DATA_DIR", str(tmp_path / "data"))
  config = tiny_runs.config("configs/vicha.py:tiny,steps=2", mesh=dict(data=8), eval_every=2, checkpoint_every=0)
  out = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert out["step"] == 2
  tags = tiny_runs.tags(str(tmp_path / "run"))
  for term in ("itc", "hitc", "itm", "mlm", "mae"):
    assert f"train/{term}/loss" in tags, (term, sorted(tags))
    assert np.isfinite(out[f"train/{term}/loss"]), term
  assert "train/hitc/level0_accuracy" in tags
  assert out["eval/num_images"] == 64 and 0 <= out["eval/r_mean"] <= 100


def test_gradients_reach_the_student_and_every_vicha_part():
  config = config_lib.load_config("configs/vicha.py:tiny")
  model = vlp.VLPModel(vlp.ModelConfig.from_config(config.model))
  specs = registry.objective_specs(config.objectives)
  params = state_lib.make_init_fn(model, optax.identity(), specs)(jax.random.PRNGKey(0)).params
  ema = jax.tree.map(lambda x: x + 0.01, params)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  batch = synthetic.make_batch_fn(config, mesh, 8)(jax.random.PRNGKey(1), 0)

  def total(params, ema_params, name):
    fn = step_lib.make_loss_fn(model, [s for s in specs if s.name == name], num_groups=1)
    return fn(params, ema_params, {}, batch, jax.random.PRNGKey(2), jnp.int32(10), 0.4)[0]

  norm = lambda tree: float(optax.global_norm(tree))
  grads = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)
  for name, parts in (("hitc", ("vision_proj_hidden_0", "text_proj_hidden_0", "image_tokens", "temp")),
                      ("mae", ("mae_decoder", "vision")), ("itm", ("image_tokens", "itm_head"))):
    student, teacher = grads(params, ema, name)
    assert norm(teacher) == 0.0, name
    for part in parts:
      assert norm(student[part]) > 0, (name, part)
    if name == "mae":  # the MAE branch sees no concepts
      assert norm(student["image_tokens"]) == 0.0
