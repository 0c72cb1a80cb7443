"""The trainer's input stream: host batches from `input_pipeline` (or synthetic ones) as global
jax.Arrays on the mesh, with the accelerator half of the input ops applied.

`make_train_stream` returns an iterator with `state()` (what a checkpoint stores to resume it
exactly), `stats()` (input counters for the log) and `close()`.
"""
from vlpjax import synthetic


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


def make_train_stream(config, mesh, global_batch: int, *, start_step: int, start_position, process_index: int,
                      process_count: int):
  """The training batches of `config.input` from batch `start_step` of its stream on.

  `start_position`: the `state()["data_position"]` saved with the checkpoint at `start_step`
  (O(1) exact resume), or None to recompute the skipped batches.
  """
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
