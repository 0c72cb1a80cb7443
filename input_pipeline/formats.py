"""The registry of input formats: `config.input.format` -> how its data becomes batches.

A format is one kind of annotation and the batch fields it gives: `caption` (image-caption pairs,
pretraining and retrieval; `input_pipeline.caption`), `vqa`, `nlvr2`, `snli_ve`, `refcoco`
(downstream tasks; `input_pipeline.tasks`). Each registers a `Format`, which gives

  source_kinds    the `config.input.source` kinds it reads;
  make_source     its training (and eval) source: examples as raw fields, this process's part;
  train_ops       its default training op strings (`TrainOps`), used when `config.input.pp` is
                  '' (see `input_pipeline.inputs` for the rule);
  eval_pp         its default eval op string (`config.input.eval_pp` replaces it);
  make_eval_data  its eval data (retrieval's `caption.EvalData`, the tasks' `TaskEvalData`), or
                  None for a format that is only trained on;
  passed_fields   the source fields that reach the batch as they are (the ops add the others).

Adding a format is a new module that calls `register(Format(...))`, plus one import line in
`input_pipeline/builder.py` (the builder imports every format module, so a lookup never depends
on import order). The unpaired streams of VLMixer fit this shape: a text-only format (source:
text corpora; ops: clean|tokenize|mask_tokens; no image field, `passed_fields=()`; no eval data)
and an image-only one (source: image folders or TFRecords, with tags; image ops and tag
tokenization); a step that reads both takes two `config.input`-like blocks, one iterator each.

This module imports nothing of the pipeline, so any module may register here without a cycle.
"""
import dataclasses
from typing import Any, Callable, NamedTuple


class TrainOps(NamedTuple):
  """The op strings of one training pipeline (placeholders allowed, `config_fields.fill`).

  pp: per example on the host; batch_pp: per batch on the host, after batching;
  device_augment_pp: per example on the host instead of `pp` with `device_augment`;
  device_pp: on the accelerator, with `device_augment`.
  """
  pp: str
  batch_pp: str = ""
  device_augment_pp: str = ""
  device_pp: str = ""


@dataclasses.dataclass(frozen=True)
class Format:
  """One input format (see the module docstring). Callables take `config.input` first."""
  name: str
  source_kinds: tuple[str, ...]
  # (cfg, *, split, process_index, process_count) -> sources.Source
  make_source: Callable[..., Any]
  # cfg -> TrainOps
  train_ops: Callable[[Any], TrainOps]
  # cfg -> str
  eval_pp: Callable[[Any], str]
  # (cfg, *, split, batch_size, process_index, process_count) -> eval data; None: no eval data
  make_eval_data: Callable[..., Any] | None = None
  passed_fields: tuple[str, ...] = ("image", "image_id")


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
  """Registers `fmt` under `fmt.name`; a second, different format of that name is an error."""
  if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
    raise ValueError(f"input format {fmt.name!r} is registered twice")
  _FORMATS[fmt.name] = fmt
  return fmt


def names() -> list[str]:
  return sorted(_FORMATS)


def get(name: str) -> Format:
  """The format `name`; ValueError naming `config.input.format` when none is registered."""
  if name not in _FORMATS:
    raise ValueError(f"config.input.format = {name!r}; known: {tuple(names())} (formats register "
                     "when input_pipeline.builder imports their modules)")
  return _FORMATS[name]
