"""MAMO end to end: gradients reach the student only, a tiny run on 8 devices logs every term."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tiny_runs
from vlpjax import sharding, state as state_lib, step as step_lib, synthetic, train
from vlpjax.models import vlp
from vlpjax.objectives import registry


def _tiny():
  return tiny_runs.config("configs/mamo.py:tiny", synthetic=True)


def test_gradients_reach_student_never_teacher():
  config = _tiny()
  model = vlp.VLPModel(vlp.ModelConfig.from_config(config.model))
  specs = registry.objective_specs(config.objectives)
  state = state_lib.make_init_fn(model, optax.identity(), specs)(jax.random.PRNGKey(0))
  ema = jax.tree.map(lambda x: x + 0.01, state.params)  # teacher differs from student
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  batch = synthetic.make_batch_fn(config, mesh, 8)(jax.random.PRNGKey(1), 0)
  assert "patch_mask" in batch and bool(jnp.any(batch["patch_mask"]))
  loss_fn = step_lib.make_loss_fn(model, specs, num_groups=1)

  def total(params, ema_params, name):
    one = [s for s in specs if s.name == name]
    fn = step_lib.make_loss_fn(model, one, num_groups=1)
    return fn(params, ema_params, state.objective_state, batch, jax.random.PRNGKey(2), jnp.int32(10), 0.4)[0]

  for name in ("mrm", "mim", "mlm"):
    g_student, g_teacher = jax.grad(total, argnums=(0, 1))(state.params, ema, name)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_teacher)), name
    assert float(optax.global_norm(g_student)) > 0, name
  head = jax.grad(total)(state.params, ema, "mrm")["mrm_head"]
  assert float(optax.global_norm(head)) > 0
  head = jax.grad(total)(state.params, ema, "mim")["mim_head"]
  assert float(optax.global_norm(head)) > 0
  value, (metrics, _) = loss_fn(state.params, ema, state.objective_state, batch, jax.random.PRNGKey(2), jnp.int32(10), 0.4)
  assert np.isfinite(float(value))
  assert {"mrm/loss", "mim/loss", "mlm/loss", "itc/loss", "itm/loss"} <= set(metrics)


def test_tiny_run_on_8_devices_logs_each_term(tmp_path):
  config = _tiny()
  config.sharding.mesh = dict(data=8)
  config.eval.every_steps = 0
  train.train_and_evaluate(config, str(tmp_path))
  tags = tiny_runs.tags(tmp_path)
  for term in ("itc", "itm", "mlm", "mrm", "mim"):
    assert f"train/{term}/loss" in tags, (term, sorted(tags))
