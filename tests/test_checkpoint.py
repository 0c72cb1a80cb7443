"""Tests for vlpjax.checkpoint: sharded round trips, retention, resume precedence, params I/O."""
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlpjax import checkpoint, optim


@flax.struct.dataclass
class TrainState:
  """Stand-in with the fields of vlpjax.state.TrainState."""
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema_params: dict
  queues: dict
  rng: jax.Array


def _mesh(num_devices, shape):
  return Mesh(np.array(jax.devices()[:num_devices]).reshape(shape), ("data", "fsdp"))


def _spec(shape, transposed=False):
  """2-D leaves sharded over both axes (swapped when `transposed`), others replicated."""
  if len(shape) != 2:
    return P()
  return P("fsdp", "data") if transposed else P("data", "fsdp")


def _sharded_params(mesh, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"img": {"kernel": (8, 4), "bias": (4,)}, "txt": {"embedding": (16, 4)}, "temp": ()}
  return jax.tree.map(
      lambda s: jax.device_put(rng.normal(size=s).astype(np.float32),
                               NamedSharding(mesh, _spec(s))),
      shapes, is_leaf=lambda x: isinstance(x, tuple))


def _make_state(mesh):
  params = _sharded_params(mesh)
  cfg = ml_collections.ConfigDict({"name": "adamw", "lr": 0.1, "weight_decay": 0.02,
                                   "schedule": {"name": "constant"}, "freeze": ["txt/.*"]})
  tx, _ = optim.make_optimizer(cfg, params=params, total_steps=10, steps_per_epoch=5)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  replicated = NamedSharding(mesh, P())
  queue = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4),
                         NamedSharding(mesh, P("data", None)))
  return TrainState(
      step=jax.device_put(jnp.int32(7), replicated),
      params=optax.apply_updates(params, updates),
      opt_state=opt_state,
      ema_params=params,
      queues={"image_queue": queue, "ptr": jax.device_put(jnp.int32(3), replicated)},
      rng=jax.device_put(jax.random.key(42), replicated))


def _abstract_on(mesh, state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=NamedSharding(mesh, _spec(x.shape, True))),
      jax.eval_shape(lambda: state))


def _host_values(tree):
  def host(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(host, tree)


def _small_state(value):
  return {"w": jnp.full((4,), value, jnp.float32)}


def test_round_trip_from_8_devices_onto_4_devices(tmp_path):
  state = _make_state(_mesh(8, (4, 2)))
  meta = {"stage": "pretrain", "step": 7, "data_position": 56, "config": '{"lr": 0.1}'}
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(7, state, meta)
    ckpt.wait()

  mesh4 = _mesh(4, (2, 2))
  abstract = _abstract_on(mesh4, state)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    restored, restored_meta = ckpt.restore(abstract)
  assert isinstance(restored, TrainState)
  assert restored_meta == meta
  jax.tree.map(np.testing.assert_array_equal, _host_values(restored), _host_values(state))
  restored_leaves = jax.tree.leaves(restored)
  abstract_leaves = jax.tree.leaves(abstract)
  assert len(restored_leaves) == len(abstract_leaves) > 8
  for leaf, target in zip(restored_leaves, abstract_leaves):
    assert leaf.sharding == target.sharding
    assert len(leaf.sharding.device_set) == 4
  assert restored.params["img"]["kernel"].sharding.spec == P("fsdp", "data")
  assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)


def test_max_to_keep_interval_and_latest_step(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    assert ckpt.latest_step() is None
    saved = [ckpt.save(step, _small_state(step), {"step": step}) for step in range(1, 7)]
    # Orbax always writes the first save of a manager with no earlier step.
    assert saved == [True, True, False, True, False, True]
    assert ckpt.save(7, _small_state(7.0), {"step": 7}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.latest_step() == 7
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_async_save_is_complete_after_wait_and_seen_by_a_new_process(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=True)
  for step in (1, 2):
    ckpt.save(step, _small_state(float(step)), {"stage": "a", "step": step})
  ckpt.wait()
  assert (tmp_path / "2" / "state" / "_METADATA").exists()
  reopened = checkpoint.Checkpointer(tmp_path)
  assert reopened.latest_step() == 2
  assert reopened.read_meta() == {"stage": "a", "step": 2}
  state, meta = reopened.restore(jax.eval_shape(lambda: _small_state(0.0)), step=1)
  np.testing.assert_array_equal(state["w"], np.ones(4))
  assert meta["step"] == 1
  ckpt.close()
  reopened.close()


def test_bad_meta_and_missing_step_raise_clear_errors(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match=r"meta\['config'\]"):
      ckpt.save(1, _small_state(1.0), {"config": ml_collections.ConfigDict({"a": 1})})
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
      ckpt.read_meta()
    ckpt.save(1, _small_state(1.0), {})
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 5 .*\[1\]"):
      ckpt.restore(jax.eval_shape(lambda: _small_state(0.0)), step=5)


def test_resolve_start_precedence(tmp_path):
  other_run = tmp_path / "other"
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(other_run)) as ckpt:
    ckpt.save(4, _small_state(4.0), {})
  init_from = tmp_path / "export"
  checkpoint.export_params(_small_state(1.0), init_from)
  workdir = tmp_path / "run"
  resolve = checkpoint.resolve_start
  StartFrom = checkpoint.StartFrom

  assert resolve(workdir) == StartFrom.SCRATCH
  assert resolve(workdir, None, init_from) == StartFrom.INIT_FROM
  assert resolve(workdir, checkpoint.checkpoint_dir(other_run), init_from) == StartFrom.RESUME
  assert resolve(workdir, checkpoint.checkpoint_dir(other_run) / "4") == StartFrom.RESUME
  with pytest.raises(FileNotFoundError, match="no finished train checkpoint"):
    resolve(workdir, tmp_path / "missing", init_from)
  with pytest.raises(FileNotFoundError, match="init_from path"):
    resolve(workdir, None, tmp_path / "missing")
  # An unfinished (temporary) save does not count as our own checkpoint.
  os.makedirs(checkpoint.checkpoint_dir(workdir) / "9.orbax-checkpoint-tmp-1")
  assert resolve(workdir) == StartFrom.SCRATCH
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir)) as ckpt:
    ckpt.save(2, _small_state(2.0), {})
  assert resolve(workdir, checkpoint.checkpoint_dir(other_run), init_from) == StartFrom.WORKDIR
  assert resolve(workdir, tmp_path / "missing", tmp_path / "missing") == "workdir"


def test_export_and_load_params_from_export_and_train_checkpoint(tmp_path):
  state = _make_state(_mesh(8, (4, 2)))
  export = checkpoint.export_dir(tmp_path, "pretrain")
  checkpoint.export_params(state.params, export)
  checkpoint.export_params(state.params, export)  # re-export after a restart replaces it
  expected = _host_values(state.params)
  loaded = checkpoint.load_params(export)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  host_export = tmp_path / "host_export"
  checkpoint.export_params(jax.device_get(state.params), host_export)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(host_export), expected)

  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(tmp_path)) as ckpt:
    ckpt.save(7, state, {"stage": "pretrain"})
  for path in (checkpoint.checkpoint_dir(tmp_path), checkpoint.checkpoint_dir(tmp_path) / "7"):
    loaded = checkpoint.load_params(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  with pytest.raises(FileNotFoundError, match="no finished train checkpoint"):
    checkpoint.load_params(tmp_path / "nothing")


def _target_and_loaded():
  mesh = _mesh(8, (4, 2))
  sharding = NamedSharding(mesh, P("data", None))
  target = {
      "img": {"kernel": jax.device_put(jnp.zeros((8, 4)), sharding), "bias": jnp.zeros(4)},
      "head": {"kernel": jnp.full((4, 3), 5.0)},
      "new_layer": {"kernel": jnp.full((4, 4), 7.0)},
  }
  rng = np.random.default_rng(0)
  loaded = {
      "img": {"kernel": rng.normal(size=(8, 4)), "bias": rng.normal(size=4)},
      "head": {"kernel": rng.normal(size=(4, 2))},
      "mlm": {"bias": rng.normal(size=10)},
  }
  return target, loaded


def test_partial_restore_reports_and_merges():
  target, loaded = _target_and_loaded()
  params, report = checkpoint.partial_restore(target, loaded, dont_load=[r"head/.*"])
  assert report == checkpoint.RestoreReport(
      loaded=["img/kernel", "img/bias"], skipped=["head/kernel"], new=["new_layer/kernel"],
      unused=["mlm/bias"])
  np.testing.assert_allclose(params["img"]["kernel"], loaded["img"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(params["img"]["bias"], loaded["img"]["bias"], rtol=1e-6)
  assert params["img"]["kernel"].dtype == jnp.float32
  assert params["img"]["kernel"].sharding == target["img"]["kernel"].sharding
  np.testing.assert_array_equal(params["head"]["kernel"], target["head"]["kernel"])
  np.testing.assert_array_equal(params["new_layer"]["kernel"], target["new_layer"]["kernel"])
  assert set(params) == {"img", "head", "new_layer"}

  table = checkpoint.format_report(report)
  lines = table.splitlines()
  assert lines[0] == "loaded 2, skipped 1, new 1, unused 1"
  assert lines[1:] == ["loaded  img/kernel", "loaded  img/bias", "skipped head/kernel",
                       "new     new_layer/kernel", "unused  mlm/bias"]


def test_partial_restore_errors_name_the_leaf():
  target, loaded = _target_and_loaded()
  with pytest.raises(ValueError, match=r"'head/kernel'.*checkpoint \(4, 2\) vs model \(4, 3\)"):
    checkpoint.partial_restore(target, loaded)
  with pytest.raises(ValueError, match=r"\['itm/.\*'\] match no param path"):
    checkpoint.partial_restore(target, loaded, dont_load=["head/.*", "itm/.*"])
