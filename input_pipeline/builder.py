"""Builds the per-process training iterator (and the eval data) from `config.input`.

Training, per process:

  source records (this process's part) -> repeat + deterministic shuffle -> position p
  -> read -> `_seed` = fold(seed, p * process_count + process_index) -> per-example ops
  -> drop elements that raised (`ignore_errors`) -> keep `_valid` -> batch(drop_remainder)
  -> per-batch ops (batch `_seed` = fold(seed, step)) -> prefetch -> numpy dicts

Batch k is a pure function of (seed, k): positions, seeds and ops are deterministic. Skipped
examples (bad images or captions, read errors) are counted from the positions: after step k,
skipped = (last position + 1) - (k + 1) * local_batch, exactly, across restarts.

Resume: `make_train_iterator(..., start_step=s, start_position=p)` with p the
`state()["data_position"]` saved at step s starts at stream position p directly (records are
skipped before any image is read or decoded). Without `start_position` the first s batches
are recomputed and dropped, which is exact but costs their preprocessing time.

The source, default ops and eval data come from the format `config.input.format` names
(`input_pipeline.formats`); the op strings from the config (`train_ops`; the rule is in
`input_pipeline.inputs`). Config fields: `FIELDS` (`input_pipeline.config_fields`).
"""
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

# Every format module, so that the registry is complete once this module is imported.
from input_pipeline import caption
from input_pipeline import config_fields
from input_pipeline import formats
from input_pipeline import pipeline
from input_pipeline import sources
from input_pipeline import tasks  # noqa: F401  registers vqa, nlvr2, snli_ve, refcoco
from input_pipeline import unpaired  # noqa: F401  registers text_only, image_only

AUTOTUNE = tf.data.AUTOTUNE
FIELDS = config_fields.FIELDS
_get = config_fields.get


def source_kinds() -> tuple[str, ...]:
  """Every `config.input.source` kind some registered format reads."""
  return tuple(dict.fromkeys(kind for name in formats.names()
                             for kind in formats.get(name).source_kinds))


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for unknown fields, an unknown source kind or format,
  a placeholder that names no knob, an unknown op name, or device_augment without device ops.

  Data paths are checked when the source is built (`make_source`), so configs whose paths
  are given on the command line, or that run on synthetic input, validate without them.
  """
  unknown = sorted(set(cfg.keys()) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown config.input field(s) {unknown}; known: {sorted(FIELDS)}")
  _validate_source(cfg, "config.input", require_paths=False)
  _validate_format(cfg)
  ops = train_ops(cfg)
  device_spec = ops.device_pp if _get(cfg, "device_augment") or _get(cfg, "device_pp") else ""
  if device_spec:
    from input_pipeline import device_ops  # JAX; builds the ops, which checks names and args
    try:
      device_ops.parse(device_spec)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"config.input.device_pp = {device_spec!r}: {e}") from e
  if _get(cfg, "device_augment") and not (ops.device_augment_pp and ops.device_pp):
    raise ValueError(
        f"config.input.device_augment needs config.input.device_augment_pp (the host's ops) and "
        f"config.input.device_pp (the accelerator's): set both, or leave config.input.pp '' for "
        f"the defaults of config.input.format = {_get(cfg, 'format')!r}, if it has them")
  host = "device_augment_pp" if _get(cfg, "device_augment") else "pp"
  specs = {host: _host_pp(ops, cfg), "batch_pp": ops.batch_pp,
           "eval_pp": _get(cfg, "eval_pp"), "eval_text_pp": _get(cfg, "eval_text_pp")}
  for field, spec in specs.items():
    pipeline.check_op_names(config_fields.fill(spec, cfg, field), field)


def _validate_format(cfg) -> formats.Format:
  fmt = formats.get(_get(cfg, "format"))
  kind = _get(cfg, "source")
  if kind not in fmt.source_kinds:
    raise ValueError(f"config.input.format = {fmt.name!r} reads sources {fmt.source_kinds}, not "
                     f"config.input.source = {kind!r}")
  return fmt


def _validate_source(cfg, where: str, require_paths: bool) -> None:
  kind = _get(cfg, "source")
  if kind not in source_kinds():
    raise ValueError(f"{where}.source = {kind!r}; known: {source_kinds()}")
  required = {"json": "annotations", "tfrecord": "tfrecord_pattern", "tfds": "tfds_name",
              "mixture": "mixture"}.get(kind)
  if required and require_paths and not _get(cfg, required):
    raise ValueError(f"{where}.source = {kind!r} needs {where}.{required}")
  if kind == "mixture":
    for i, part in enumerate(_get(cfg, "mixture")):
      if "weight" not in part:
        raise ValueError(f"{where}.mixture[{i}] needs a weight")
      _validate_source(part, f"{where}.mixture[{i}]", require_paths)


def check_data(cfg, where: str = "config.input") -> None:
  """Checks, before anything is built or compiled, that the data a run will read is there.

  Paths the source needs are set and exist, JSON annotation files parse, TFRecord globs match,
  the tokenizer file exists (WordPiece needs one). Demo, TFDS and synthetic inputs need no files.
  Fast: files are opened, not decoded as examples. Raises ValueError / FileNotFoundError naming
  the flag (`--config.input.<field>`) and the file.
  """
  import glob
  import json
  import os
  if _get(cfg, "synthetic"):
    return
  _validate_source(cfg, where, require_paths=True)
  kind = _get(cfg, "source")
  flag = f"--{where}"
  if kind == "json":
    files = config_fields.as_list(_get(cfg, "annotations"))
    if _get(cfg, "eval_annotations"):
      files += [("eval_annotations", f) for f in config_fields.as_list(_get(cfg, "eval_annotations"))]
    for item in files:
      field, path = item if isinstance(item, tuple) else ("annotations", item)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}.{field}: annotation file {path!r} does not exist")
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}.{field}: annotation file {path!r} is not valid JSON ({e})") from None
    root = _get(cfg, "image_root")
    if root and not os.path.isdir(root):
      raise FileNotFoundError(f"{flag}.image_root: folder {root!r} does not exist")
  elif kind == "tfrecord":
    pattern = _get(cfg, "tfrecord_pattern")
    if not glob.glob(pattern):
      raise FileNotFoundError(f"{flag}.tfrecord_pattern: no file matches {pattern!r}")
  elif kind == "mixture":
    for i, part in enumerate(_get(cfg, "mixture")):
      merged = ml_collections.ConfigDict(dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg))
      merged.update(dict(part))
      merged.pop("mixture", None)
      merged.source = part["source"]
      check_data(merged, f"{where}.mixture[{i}]")
    return
  tokenizer_kind, tokenizer_path = config_fields.tokenizer(cfg)
  if tokenizer_path and not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f"{flag}.tokenizer.path: tokenizer file {tokenizer_path!r} does not exist")
  if tokenizer_kind == "wordpiece" and not tokenizer_path:
    raise ValueError(f"config.input.tokenizer.kind='wordpiece' needs a vocabulary file: set "
                     f"{flag}.tokenizer.path=/path/to/vocab.txt (bert-base-uncased's vocab.txt)")


def make_source(cfg, *, split: str, process_index: int = 0, process_count: int = 1
                ) -> sources.Source:
  """The configured format's source for `split`, restricted to this process's part."""
  _validate_source(cfg, "config.input", require_paths=True)
  fmt = _validate_format(cfg)
  return fmt.make_source(cfg, split=split, process_index=process_index,
                         process_count=process_count)


# ----------------------------------------------------------------------------- op strings


def train_ops(cfg) -> formats.TrainOps:
  """The training op strings of `cfg`, placeholders filled (`config_fields.fill`).

  A config that writes `pp` owns all its ops: its `batch_pp`, `device_augment_pp` and
  `device_pp` are used as they are ('' = none). With `pp` = '' the format's defaults
  (`formats.Format.train_ops`) stand in for every field the config leaves ''.
  """
  own = formats.TrainOps(*(str(_get(cfg, field)) for field in formats.TrainOps._fields))
  if not own.pp:
    defaults = formats.get(_get(cfg, "format")).train_ops(cfg)
    own = formats.TrainOps(*(mine or default for mine, default in zip(own, defaults)))
  return formats.TrainOps(*(config_fields.fill(spec, cfg, field)
                            for spec, field in zip(own, formats.TrainOps._fields)))


def _host_pp(ops: formats.TrainOps, cfg) -> str:
  return ops.device_augment_pp if _get(cfg, "device_augment") else ops.pp


def train_pp_spec(cfg) -> str:
  """The per-example host ops: `pp`, or `device_augment_pp` with device_augment (filled)."""
  return _host_pp(train_ops(cfg), cfg)


def batch_pp_spec(cfg) -> str:
  """The per-batch host ops, run on each batch after batching ('' = none; filled)."""
  return train_ops(cfg).batch_pp


def device_pp_spec(cfg) -> str:
  """The JAX ops run on the global batch after transfer: `device_pp` with device_augment,
  else '' (filled; `input_pipeline.device_ops`)."""
  return train_ops(cfg).device_pp if _get(cfg, "device_augment") else ""


# ----------------------------------------------------------------------------- training


def _output_fields(example: dict, source_keys: set[str], passed: tuple[str, ...],
                   keep_strings: bool = False) -> dict:
  """The source fields in `passed` and every numeric field the ops added; `_*` dropped, and
  string fields, except scalar ones the ops added when `keep_strings` (the per-batch ops
  read them, e.g. `caption` for a per-batch tokenize)."""
  out = {}
  for key, value in example.items():
    if key.startswith("_"):
      continue
    if key in source_keys and key not in passed:
      continue
    if value.dtype == tf.string and not (keep_strings and value.shape.rank == 0):
      continue
    if not value.shape.is_fully_defined():
      raise ValueError(f"input field {key!r} has shape {value.shape} after the per-example ops; "
                       "batched fields need a fixed shape (pad or drop it in `pp`)")
    out[key] = tf.cast(value, tf.int32) if value.dtype == tf.int64 else value
  return out


def _prepare_fn(source: sources.Source, pp, seed: int, process_index: int, process_count: int,
                passed: tuple[str, ...], keep_strings: bool = False):
  """(position, record) -> output fields + `_valid` + `_position`."""

  def prepare(position, record):
    example = source.read(record)
    source_keys = set(example)
    example["_seed"] = pipeline.example_seed(seed, position * process_count + process_index)
    example = pp(example)
    out = _output_fields(example, source_keys, passed, keep_strings)
    out["_valid"] = example.get("_valid", tf.constant(True))
    out["_position"] = position
    return out

  return pipeline.no_autograph(prepare)


def _probe(source: sources.Source, pp, seed: int, num: int, passed: tuple[str, ...]) -> None:
  """Fails fast, naming the source, when none of its first `num` examples is usable.

  Without this, a source whose every example is skipped would make the repeated, filtered
  stream spin forever. `num` = 0 turns the check off.
  """
  if num <= 0:
    return
  prepare = _prepare_fn(source, pp, seed, 0, 1, passed)
  probe = (source.records.take(num).enumerate().map(prepare).ignore_errors()
           .filter(lambda e: e["_valid"]).take(1))
  if not any(True for _ in probe):
    raise ValueError(f"input source {source.name}: none of its first {num} examples is usable "
                     f"(undecodable images, empty captions or read errors); skipped while "
                     f"reading annotations: {source.skipped}")


class TrainIterator:
  """Iterator of local batches (dict of np.ndarray) with input statistics.

  `stats()` gives scalars for the trainer's log: `data_skipped` (examples skipped by the
  ops or read errors so far, cumulative over the whole run), `data_skipped_at_load`
  (annotation entries dropped before the run: missing files, bad captions), `data_position`
  (stream position after the last batch) and `data_epochs` (positions / examples of this
  process, when known). `state()` gives what a checkpoint should store to resume exactly
  without recomputation.
  """

  def __init__(self, dataset: tf.data.Dataset, *, local_batch: int, start_step: int,
               num_examples: int | None, start_position: int, skipped_at_load: int = 0):
    self._skipped_at_load = skipped_at_load
    self._iterator = dataset.as_numpy_iterator()
    self._local_batch = local_batch
    self._step = start_step
    self._position = start_position
    self._num_examples = num_examples

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._position = int(batch.pop("_position").max()) + 1
    self._step += 1
    return batch

  def stats(self) -> dict[str, float]:
    out = {"data_position": float(self._position),
           "data_skipped": float(self._position - self._step * self._local_batch),
           "data_skipped_at_load": float(self._skipped_at_load)}
    if self._num_examples:
      out["data_epochs"] = self._position / self._num_examples
    return out

  def state(self) -> dict[str, int]:
    return {"step": self._step, "data_position": self._position}

  def close(self) -> None:
    # A live tf.data iterator at interpreter exit can hang it (seen with TensorFlow 2.21).
    self._iterator = None


def make_train_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                        start_step: int = 0, start_position: int | None = None,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> TrainIterator:
  """Infinite iterator of this process's training batches.

  Args:
    cfg: `config.input` (see `FIELDS`).
    global_batch_size: examples per step over all processes (divisible by process_count).
    seed: run seed; batch k is a function of (seed, k) alone.
    start_step: index of the first batch to yield.
    start_position: `state()["data_position"]` saved at `start_step`, for an O(1) exact
      resume; None recomputes the first `start_step` batches.
    process_index, process_count: default to JAX's.

  Returns:
    A `TrainIterator` of dicts: `image` float32 [B, H, W, 3], `image_id` int32 [B],
    `text_ids`, `text_mask`, `mlm_ids`, `mlm_labels` int32 [B, L] and every other numeric
    field the ops add (`patch_mask` bool [B, N], `concept_ids` ...), B = global / processes.
  """
  process_index, process_count = pipeline.resolve_processes(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} "
                     "processes")
  local_batch = global_batch_size // process_count
  source = make_source(cfg, split=_get(cfg, "split"), process_index=process_index,
                       process_count=process_count)
  ops = train_ops(cfg)
  spec, batch_spec = _host_pp(ops, cfg), ops.batch_pp
  logging.info("input %s: %s examples in process %d/%d; skipped while reading: %s; ops: %s%s",
               source.name, source.num_examples, process_index, process_count, source.skipped,
               spec, f"; per batch: {batch_spec}" if batch_spec else "")
  pp = pipeline.build_ops(spec, cfg)
  passed = formats.get(_get(cfg, "format")).passed_fields
  _probe(source, pp, seed, int(_get(cfg, "probe_examples")), passed)

  shuffle_buffer = int(_get(cfg, "shuffle_buffer"))
  if source.num_examples:
    shuffle_buffer = min(shuffle_buffer, source.num_examples)
  records = source.stream(seed=seed, shuffle_buffer=shuffle_buffer)
  records = records.enumerate()
  replay = start_position is None and start_step > 0
  if start_position:
    records = records.skip(start_position)
  ds = records.map(_prepare_fn(source, pp, seed, process_index, process_count, passed,
                               keep_strings=bool(batch_spec)),
                   num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors().filter(lambda e: e["_valid"])
  ds = ds.map(pipeline.no_autograph(lambda e: {k: v for k, v in e.items() if k != "_valid"}))
  ds = ds.batch(local_batch, drop_remainder=True)
  first_step = 0 if replay else start_step
  batch_ops = pipeline.build_ops(batch_spec, cfg, "batch_pp")

  def apply_batch_ops(step, batch):
    batch["_seed"] = pipeline.batch_seed(seed, step)
    batch = batch_ops(batch)
    return {k: v for k, v in batch.items() if k != "_seed" and v.dtype != tf.string}

  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(first_step), ds).map(
      pipeline.no_autograph(apply_batch_ops), num_parallel_calls=AUTOTUNE, deterministic=True)
  if replay:
    logging.warning("input: resuming at step %d without a data position; recomputing %d "
                    "batches", start_step, start_step)
    ds = ds.skip(start_step)
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from processing several examples at once, not from within one op.
  options.threading.max_intra_op_parallelism = 1
  if int(_get(cfg, "threads")) > 0:
    options.threading.private_threadpool_size = int(_get(cfg, "threads"))
  ds = ds.with_options(options).prefetch(int(_get(cfg, "prefetch")))
  return TrainIterator(ds, local_batch=local_batch, start_step=start_step,
                       num_examples=source.num_examples, start_position=start_position or 0,
                       skipped_at_load=sum(v for k, v in source.skipped.items()
                                           if not k.startswith("dropped_")))


# ----------------------------------------------------------------------------- eval


def make_eval_data(cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                   process_index: int | None = None, process_count: int | None = None) -> Any:
  """The eval data of the format `config.input.format` for `split` (its `make_eval_data`)."""
  fmt = _validate_format(cfg)
  if fmt.make_eval_data is None:
    raise ValueError(f"config.input.format = {fmt.name!r} has no eval data")
  process_index, process_count = pipeline.resolve_processes(process_index, process_count)
  return fmt.make_eval_data(cfg, split=split, batch_size=batch_size,
                            process_index=process_index, process_count=process_count)


def make_eval_dataset(cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                      process_index: int | None = None, process_count: int | None = None
                      ) -> caption.EvalData:
  """Retrieval eval data for `split` (`caption.retrieval_eval_data`) of the configured source.

  Images are decoded with `eval_pp` (default decode|resize(image_size)|normalize('clip'));
  captions with `eval_text_pp` (default clean_caption(30)|tokenize(eval_max_len or max_len)).
  JSON and TFRecord sources read `eval_annotations` / `eval_tfrecord_pattern` for any split
  other than the training split.
  """
  process_index, process_count = pipeline.resolve_processes(process_index, process_count)
  return caption.retrieval_eval_data(cfg, make_source(cfg, split=split), batch_size=batch_size,
                                     process_index=process_index, process_count=process_count)
