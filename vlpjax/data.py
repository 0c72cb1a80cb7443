"""The trainer's input stream: host batches from `input_pipeline` (or synthetic ones) as global
jax.Arrays on the mesh, with the accelerator half of the input ops applied.

`make_train_stream` returns an iterator with `state()` (what a checkpoint stores to resume it
exactly), `stats()` (input counters for the log) and `close()`.

Several input streams per step (`config.input.streams = {name: {overrides..., batch_size}}`,
e.g. VLMixer's unpaired text-only and image-only data): each stream is `config.input` with its
overrides, read by its own iterator with its own global batch size (`batch_size`, default
`config.batch_size`) and seed (`stream_seed`), and a step's batch is {name: that stream's batch}.
The ratio of the streams is the ratio of their batch sizes: every step takes one batch of each.
Each stream is deterministic and resumable on its own: `state()["data_position"]` is
{name: position}, and a resumed run restarts each stream at its own position. `stats()` prefixes
each stream's counters with its name (`text/data_skipped`, ...).
"""
import zlib

import ml_collections

from vlpjax import synthetic

STREAM_KEYS = ("batch_size",)  # stream fields beyond config.input's


class GlobalIterator:
  """Wraps a host iterator of local numpy batches into global jax.Arrays on the mesh.

  `augment(batch, step)`, when given, runs the accelerator half of the input ops
  (`config.input.device_pp`) on each global batch, keyed by the host iterator's batch count so
  a resumed run sees the same pixels.
  """

  def __init__(self, host_iter, mesh, augment=None):
    from input_pipeline import device as device_lib  # TensorFlow is imported only with real input
    self._it = device_lib.prefetch_to_device(host_iter, 2, mesh)
    self._host = host_iter
    self._augment = augment

  def __next__(self):
    batch = next(self._it)
    if self._augment is not None:
      batch = self._augment(batch, self._it.state()["step"])
    return batch

  def __iter__(self):
    return self

  def stats(self):
    return self._it.stats()

  def state(self):
    """Data position of the batch last returned (not of the batches prefetched ahead)."""
    return self._it.state()

  def close(self):
    if hasattr(self._host, "close"):
      self._host.close()


class MultiStream:
  """One batch of each named stream per step: {name: batch}; state and stats per stream."""

  def __init__(self, iterators: dict):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    return {name: next(it) for name, it in self._iterators.items()}

  def stats(self) -> dict:
    return {f"{name}/{k}": v for name, it in self._iterators.items() for k, v in it.stats().items()}

  def state(self) -> dict:
    states = {name: it.state() for name, it in self._iterators.items()}
    steps = {s.get("step") for s in states.values()}
    return {"step": steps.pop() if len(steps) == 1 else None,
            "data_position": {name: s.get("data_position") for name, s in states.items()}}

  def close(self):
    for it in self._iterators.values():
      if hasattr(it, "close"):
        it.close()


def stream_seed(seed: int, name: str) -> int:
  """The data seed of stream `name`: two streams of one source draw different orders."""
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


def stream_configs(config) -> dict[str, tuple[ml_collections.ConfigDict, int]]:
  """{name: (config.input with the stream's overrides, its global batch)}; {} for one stream."""
  streams = config.input.get("streams") or {}
  out = {}
  for name, stream in streams.items():
    overrides = dict(stream)
    batch = int(overrides.pop("batch_size", 0) or config.batch_size)
    merged = ml_collections.ConfigDict(config.input.to_dict())
    merged.streams = {}
    merged.update(overrides)
    out[name] = (merged, batch)
  return out


def validate_streams(config) -> None:
  """Each stream's fields are input fields (or `batch_size`), its batch is positive, and its merged
  `config.input` validates (`input_pipeline.builder.validate_config`); errors name the stream."""
  from input_pipeline import builder
  for name, stream in (config.input.get("streams") or {}).items():
    where = f"config.input.streams.{name}"
    if not hasattr(stream, "keys"):
      raise ValueError(f"{where} must be a dict of config.input overrides (and batch_size)")
    unknown = sorted(set(stream.keys()) - set(builder.FIELDS) - set(STREAM_KEYS) | ({"streams"} & set(stream.keys())))
    if unknown:
      raise ValueError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; allowed: config.input "
                       f"fields (but streams) and {list(STREAM_KEYS)}")
    if int(stream.get("batch_size", 0) or config.batch_size) <= 0:
      raise ValueError(f"{where}.batch_size must be > 0")
  for name, (stream_cfg, _) in stream_configs(config).items():
    try:
      builder.validate_config(stream_cfg)
    except ValueError as e:
      raise ValueError(f"config.input.streams.{name}: {e}") from e


def make_train_stream(config, mesh, global_batch: int, *, start_step: int, start_position, process_index: int,
                      process_count: int):
  """The training batches of `config.input` from batch `start_step` of its stream on.

  `start_position`: the `state()["data_position"]` saved with the checkpoint at `start_step`
  (O(1) exact resume), or None to recompute the skipped batches. With several streams it is
  {name: position} (a stream without one replays).
  """
  streams = stream_configs(config)
  if streams:
    positions = start_position if isinstance(start_position, dict) else {}
    iterators = {}
    for name, (stream_cfg, batch) in streams.items():
      view = ml_collections.ConfigDict(config.to_dict())
      view.input = stream_cfg
      view.seed = stream_seed(int(config.seed), name)
      iterators[name] = make_train_stream(view, mesh, batch, start_step=start_step,
                                          start_position=positions.get(name), process_index=process_index,
                                          process_count=process_count)
    return MultiStream(iterators)
  if config.input.get("synthetic", False):
    return synthetic.SyntheticIterator(config, mesh, global_batch, seed=int(config.seed), start_step=start_step)
  from input_pipeline import builder
  host_iter = builder.make_train_iterator(config.input, global_batch_size=global_batch, seed=int(config.seed),
                                          start_step=start_step, start_position=start_position,
                                          process_index=process_index, process_count=process_count)
  device_spec = builder.device_pp_spec(config.input)
  augment = None
  if device_spec:
    from input_pipeline import device_ops
    augment = device_ops.make_augment(device_spec, int(config.seed))
  return GlobalIterator(host_iter, mesh, augment)
