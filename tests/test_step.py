"""The sharded train step: 8 simulated devices (dp and fsdp) match one device; EMA/queue rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import albef
from vlpjax import config_lib, sharding, state as state_lib, step as step_lib, synthetic


def _config():
  config = albef.get_config("tiny")
  config.input.synthetic = True
  config.objectives.itm.scope = "global"  # local scope depends on the number of shards by design
  return config


def _run(config, devices, mesh_shape, rules_name, num_steps=2):
  mesh = sharding.make_mesh(mesh_shape, devices)
  with config.unlocked():
    config.sharding.rules = rules_name
    config.teacher.alpha_ramp_steps = 4
  setup = state_lib.setup_state(config, mesh)
  state = setup.create(0)
  train_step = step_lib.train_step_for(setup)
  batches = synthetic.SyntheticIterator(config, mesh, config.batch_size, seed=1)
  losses = []
  for _ in range(num_steps):
    state, metrics = train_step(state, next(batches))
    losses.append(jax.device_get(metrics))
  return jax.device_get(state), losses, setup.shardings


@pytest.fixture(scope="module")
def single_device_run():
  return _run(_config(), jax.devices()[:1], dict(data=1), "dp")


@pytest.mark.parametrize("mesh_shape,rules", [(dict(data=8), "dp"), (dict(data=2, fsdp=4), "fsdp"),
                                              (dict(data=2, fsdp=2, tensor=2), "fsdp_tp")])
def test_sharded_step_matches_single_device(single_device_run, mesh_shape, rules):
  ref_state, ref_losses, _ = single_device_run
  state, losses, shardings = _run(_config(), jax.devices()[:8], mesh_shape, rules)
  for ref, got in zip(ref_losses, losses):
    for key in ("loss", "itc/loss", "itm/loss", "mlm/loss"):
      np.testing.assert_allclose(got[key], ref[key], rtol=2e-4, atol=2e-5, err_msg=key)
  flat_ref = jax.tree.leaves(ref_state.params)
  flat_got = jax.tree.leaves(state.params)
  for a, b in zip(flat_ref, flat_got):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(state.objective_state["itc"]["text"], ref_state.objective_state["itc"]["text"],
                             rtol=1e-3, atol=1e-5)
  if rules != "dp":
    specs = {str(s.spec) for s in jax.tree.leaves(shardings.params)}
    assert any("fsdp" in s for s in specs), specs


def test_ema_queue_and_temperature_rules(single_device_run):
  state, losses, _ = single_device_run
  config = _config()
  # Two steps of batch 16 written into a queue of 32: pointer wrapped to 0, ids of both batches present.
  queue = state.objective_state["itc"]
  assert int(queue["ptr"]) == (2 * config.batch_size) % config.objectives.itc.queue_size
  assert sorted(np.asarray(queue["idx"]).tolist()) == list(range(2 * config.batch_size))
  np.testing.assert_allclose(np.linalg.norm(queue["image"], axis=-1), 1.0, rtol=1e-5)
  assert config.model.get("temp_min", 0.001) <= float(state.params["temp"]) <= 0.5
  # alpha ramps linearly from 0 over alpha_ramp_steps=4.
  assert losses[0]["alpha"] == 0.0 and np.isclose(losses[1]["alpha"], 0.1)


def test_ema_update_uses_pre_step_params():
  ema = {"w": jnp.asarray([1.0, 2.0])}
  params = {"w": jnp.asarray([3.0, 6.0])}
  out = step_lib.ema_update(ema, params, 0.995)
  np.testing.assert_allclose(out["w"], 0.995 * np.array([1.0, 2.0]) + 0.005 * np.array([3.0, 6.0]), rtol=1e-6)


def test_queue_must_be_multiple_of_batch():
  config = _config()
  config.objectives.itc.queue_size = 100
  with pytest.raises(ValueError, match="queue_size"):
    config_lib.validate(config)
