"""Logging for the train loop: TensorBoard writers, a progress line, overviews, the NaN guard."""
import datetime
import math
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from clu import metric_writers
from clu import parameter_overview as clu_parameter_overview
import jax
import numpy as np


def create_writer(workdir, *, process_index: int, collection: str | None = None):
  """A clu metric writer of TensorBoard event files under `workdir` (or `workdir/<collection>`).

  Only process 0 writes event files (every process computes the same global metrics); the
  console gets the trainer's one progress line per log step instead of every scalar. Writes
  happen on a background thread; call `flush()` to be sure they are on disk and `close()` at the end.
  """
  if process_index > 0:
    return metric_writers.MultiWriter([])
  import os
  logdir = os.path.join(str(workdir), collection) if collection else str(workdir)
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


def read_scalars(workdir, *, recursive: bool = True) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in the TensorBoard event files of `workdir` (and of its
  subdirectories with `recursive`), as `create_writer` writes them (tensor or simple values)."""
  import glob
  import os
  import tensorflow as tf
  pattern = os.path.join(str(workdir), "**", "events.out.tfevents.*") if recursive else \
      os.path.join(str(workdir), "events.out.tfevents.*")
  values: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(pattern, recursive=recursive)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
        values.setdefault(value.tag, {})[event.step] = number
  return values


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
  """Reports throughput and time left every `every_steps` steps (and at the last step).

  Rates are measured over the window since the previous report, so each report shows the
  current speed; only the first window carries the step's compilation time.
  """

  def __init__(self, total_steps: int, *, every_steps: int, global_batch: int, start_step: int = 0,
               writer=None, log_fn: Callable[[str], None] = logging.info,
               clock: Callable[[], float] = time.monotonic):
    """Starts the clock.

    Args:
      total_steps: the step at which training ends.
      every_steps: report period in steps.
      global_batch: examples per step over all processes, for img/s.
      start_step: the step training starts (or resumes) from.
      writer: optional metric writer that receives `perf/steps_per_sec`, `perf/img_per_sec`
        and `perf/eta_hours` at each report.
      log_fn: where the text line goes.
      clock: seconds since some fixed point (monotonic).
    """
    self.total_steps = total_steps
    self.every_steps = every_steps
    self.global_batch = global_batch
    self._writer = writer
    self._log_fn = log_fn
    self._clock = clock
    self._start_time = self._last_time = clock()
    self._last_step = start_step

  def should_report(self, step: int) -> bool:
    return step % self.every_steps == 0 or step == self.total_steps

  def __call__(self, step: int, metrics: Mapping[str, float] | None = None) -> str | None:
    """Reports at `step` (the number of steps done) if it is a report step.

    Args:
      step: steps completed so far.
      metrics: scalars to show in the line, e.g. averaged loss terms of the window.

    Returns:
      The text logged, or None when `step` is not a report step.
    """
    if not self.should_report(step):
      return None
    now = self._clock()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else math.inf
    self._last_step, self._last_time = step, now
    fields = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%)"]
    fields += [f"{k}={float(v):.4g}" for k, v in sorted((metrics or {}).items())]
    text = (f"{' '.join(fields)} | "
            f"{steps_per_sec:.3g} steps/s, {steps_per_sec * self.global_batch:.4g} img/s | "
            f"elapsed {_format_duration(now - self._start_time)}, ETA {_format_duration(eta)}")
    self._log_fn(text)
    if self._writer is not None:
      self._writer.write_scalars(step, {
          "perf/steps_per_sec": steps_per_sec,
          "perf/img_per_sec": steps_per_sec * self.global_batch,
          "perf/eta_hours": eta / 3600,
      })
    return text


def parameter_overview(params, *, include_stats: bool = False) -> str:
  """clu's table of every param: name, shape, dtype, size (and mean/std with `include_stats`,
  which needs fully addressable arrays, i.e. not on a multi-host run)."""
  return clu_parameter_overview.get_parameter_overview(params, include_stats=include_stats)


def _spec_text(sharding) -> str:
  spec = getattr(sharding, "spec", None)
  return str(spec) if spec is not None else type(sharding).__name__


def sharding_overview(tree) -> str:
  """A table of how a (possibly abstract) state is laid out on the mesh.

  Args:
    tree: a pytree whose leaves are jax.Arrays or `jax.ShapeDtypeStruct`s carrying shardings
      (then shapes, shard shapes and per-device bytes are shown), or bare `jax.sharding.Sharding`s
      (then only the partitioning is).

  Returns:
    Rows of path, global shape, PartitionSpec and per-device shard shape, then the number of
    arrays and the bytes each device holds.
  """
  rows, device_bytes = [], 0
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = jax.tree_util.keystr(key_path, simple=True, separator="/")
    if isinstance(leaf, jax.sharding.Sharding):
      rows.append((path, "-", _spec_text(leaf), "-"))
      device_bytes = None
      continue
    shard = leaf.sharding.shard_shape(leaf.shape)
    if device_bytes is not None:
      device_bytes += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    rows.append((path, str(leaf.shape), _spec_text(leaf.sharding), str(shard)))
  header = ("path", "shape", "partition", "per-device shard")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
  summary = f"{len(rows)} arrays"
  if device_bytes is not None:
    summary += f", {device_bytes / 2**20:.2f} MiB per device"
  return "\n".join(lines + [summary])


def check_finite(metrics: Mapping[str, Any], step: int):
  """The NaN guard: raises if any metric holds a NaN or an infinity.

  Raises:
    FloatingPointError: naming the step, the first objective with a non-finite loss (the
      objective order of the metrics: `<objective>/...` keys) and every non-finite metric.
  """
  host = jax.device_get(dict(metrics))
  bad = [k for k in metrics if not np.all(np.isfinite(np.asarray(host[k])))]  # host's keys are sorted
  if bad:
    objectives = [k.split("/")[0] for k in bad if "/" in k]
    first = f"objective {objectives[0]!r}" if objectives else f"metric {bad[0]!r}"
    values = ", ".join(f"{k}={np.asarray(host[k]).tolist()}" for k in bad)
    raise FloatingPointError(f"non-finite values at step {step}, first in {first}: {values}")


def check_finite_window(window: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
  """`check_finite` over the (step, metrics) of the steps since the last check, in step order,
  fetched to the host at once: the error names the first step that went non-finite."""
  host = jax.device_get(list(window))
  for (_, metrics), (step, values) in zip(window, host):
    check_finite({k: values[k] for k in metrics}, step)  # device_get sorts keys: keep the objectives' order


def average_metrics(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Mean of each scalar metric over a logging window (keys missing from an entry are skipped).

  Args:
    window: per-step metric dicts (device or host scalars); fetched to the host at once.
  """
  sums, counts = {}, {}
  for metrics in jax.device_get(list(window)):
    for key, value in metrics.items():
      sums[key] = sums.get(key, 0.0) + float(value)
      counts[key] = counts.get(key, 0) + 1
  return {key: sums[key] / counts[key] for key in sums}
