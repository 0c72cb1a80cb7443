"""Tests for vlpjax.metrics: event files, the progress line, overviews and the NaN guard."""
import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlpjax import metrics


def _read_scalars(directory) -> dict[tuple[str, int], float]:
  """{(tag, step): value} from every TensorBoard event file directly in `directory`."""
  return {(tag, step): value for tag, steps in metrics.read_scalars(directory, recursive=False).items()
          for step, value in steps.items()}


def test_scalars_land_in_an_event_file_in_the_workdir(tmp_path):
  writer = metrics.create_writer(tmp_path, process_index=0)
  writer.write_scalars(1, {"train/loss": 2.5, "train/itc": jnp.float32(0.75)})
  writer.write_scalars(2, {"train/loss": 1.25})
  writer.close()
  assert _read_scalars(tmp_path) == {("train/loss", 1): 2.5, ("train/itc", 1): 0.75,
                                     ("train/loss", 2): 1.25}


def test_eval_collection_and_other_processes(tmp_path):
  eval_writer = metrics.create_writer(tmp_path, process_index=0, collection="eval")
  eval_writer.write_scalars(5, {"r_mean": 0.5})
  eval_writer.close()
  assert _read_scalars(tmp_path / "eval") == {("r_mean", 5): 0.5}

  other = metrics.create_writer(tmp_path / "p1", process_index=1)
  other.write_scalars(1, {"train/loss": 1.0})
  other.close()
  assert not glob.glob(str(tmp_path / "p1" / "**" / "events.out.tfevents*"), recursive=True)


class _Clock:
  """A settable time source, so rates are exact."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_reports_rates_eta_and_elapsed(tmp_path):
  clock, lines = _Clock(), []
  writer = metrics.create_writer(tmp_path, process_index=0)
  progress = metrics.Progress(100, every_steps=10, global_batch=32, start_step=0, writer=writer,
                              log_fn=lines.append, clock=clock)
  clock.now += 3.0
  assert progress(7, {"loss": 1.0}) is None
  clock.now += 2.0
  text = progress(10, {"loss": 2.345678, "itc": 0.5})
  assert text == ("step 10/100 (10.0%) itc=0.5 loss=2.346 | 2 steps/s, 64 img/s | "
                  "elapsed 0:00:05, ETA 0:00:45")
  clock.now += 3600.0
  text = progress(20)
  assert "0.00278 steps/s" in text and "ETA 8:00:00" in text and "elapsed 1:00:05" in text
  clock.now += 1.0
  assert progress(100, {}).endswith("ETA 0:00:00")
  assert lines[0] == ("step 10/100 (10.0%) itc=0.5 loss=2.346 | 2 steps/s, 64 img/s | "
                      "elapsed 0:00:05, ETA 0:00:45")
  assert len(lines) == 3
  writer.close()
  scalars = _read_scalars(tmp_path)
  assert scalars[("perf/steps_per_sec", 10)] == pytest.approx(2.0)
  assert scalars[("perf/img_per_sec", 10)] == pytest.approx(64.0)
  assert scalars[("perf/eta_hours", 20)] == pytest.approx(8.0)
  assert scalars[("perf/steps_per_sec", 100)] == pytest.approx(80.0)


def test_progress_after_resume_counts_from_the_start_step():
  clock, lines = _Clock(), []
  progress = metrics.Progress(1000, every_steps=100, global_batch=8, start_step=500,
                              log_fn=lines.append, clock=clock)
  clock.now += 50.0
  assert progress(600).startswith("step 600/1000 (60.0%) | 2 steps/s, 16 img/s")
  assert lines[0].endswith("ETA 0:03:20")


def test_check_finite_names_step_and_bad_keys():
  metrics.check_finite({"loss": jnp.float32(1.0), "itc": 0.5}, step=3)
  with pytest.raises(FloatingPointError) as error:
    metrics.check_finite({"loss": jnp.float32(jnp.nan), "itc": 0.5, "itm": np.inf,
                          "grad_norm": jnp.array([1.0, -jnp.inf])}, step=12)
  message = str(error.value)
  assert "step 12" in message
  assert "grad_norm=[1.0, -inf]" in message and "itm=inf" in message and "loss=nan" in message
  assert "itc" not in message


def test_average_metrics_over_a_window():
  window = [{"loss": jnp.float32(1.0), "itc": 2.0}, {"loss": jnp.float32(3.0)},
            {"loss": 5.0, "itc": 4.0}]
  assert metrics.average_metrics(window) == {"loss": 3.0, "itc": 3.0}
  assert metrics.average_metrics([]) == {}


def test_parameter_overview_lists_params():
  params = {"img": {"kernel": jnp.ones((3, 4))}, "temp": jnp.float32(0.07)}
  text = metrics.parameter_overview(params)
  assert "img/kernel" in text and "(3, 4)" in text and "Total: 13" in text
  abstract = jax.eval_shape(lambda: params)
  assert "img/kernel" in metrics.parameter_overview(abstract)
  assert "Mean" in metrics.parameter_overview(params, include_stats=True)


def test_sharding_overview_shows_specs_and_device_bytes():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  state = {
      "params": {"kernel": jax.ShapeDtypeStruct((8, 64), jnp.float32,
                                                sharding=NamedSharding(mesh, P("data", "fsdp")))},
      "queues": {"ptr": jax.device_put(jnp.int32(0), NamedSharding(mesh, P()))},
  }
  lines = metrics.sharding_overview(state).splitlines()
  assert lines[0].split() == ["path", "shape", "partition", "per-device", "shard"]
  assert lines[1].split() == ["params/kernel", "(8,", "64)", "P('data',", "'fsdp')",
                              "(2,", "32)"]
  assert lines[2].split() == ["queues/ptr", "()", "P()", "()"]
  # 2·32 float32 + one int32 per device.
  assert lines[3] == f"2 arrays, {(2 * 32 * 4 + 4) / 2**20:.2f} MiB per device"


def test_sharding_overview_of_bare_shardings():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  shardings = {"kernel": NamedSharding(mesh, P(None, "fsdp")), "temp": NamedSharding(mesh, P())}
  lines = metrics.sharding_overview(shardings).splitlines()
  assert lines[1].split() == ["kernel", "-", "P(None,", "'fsdp')", "-"]
  assert lines[2].split() == ["temp", "-", "P()", "-"]
  assert lines[3] == "2 arrays"


def test_check_finite_window_names_first_bad_step_and_objective():
  window = [(4, {"loss": jnp.float32(1.0), "itc/loss": 0.5}),
            (5, {"loss": jnp.float32(jnp.nan), "itc/loss": 0.5, "mrm/loss": np.nan, "mim/loss": np.inf}),
            (6, {"loss": jnp.float32(jnp.nan), "itc/loss": np.nan})]
  metrics.check_finite_window(window[:1])
  with pytest.raises(FloatingPointError, match=r"step 5, first in objective 'mrm'"):
    metrics.check_finite_window(window)
