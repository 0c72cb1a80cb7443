"""Pieces every format's pipeline shares: op strings -> op functions, seeds, padded eval rows.

Importing this module registers every tf.data op (`ops_image`, `ops_mask`, `ops_text`,
`ops_task`, `ops_concepts`, `ops_mix`, `ops_mvp`), so `build_ops` finds any op name an op string may use.
"""
import ast
import math
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from input_pipeline import config_fields
from input_pipeline import ops_concepts  # noqa: F401  registers the visual-concept ops
from input_pipeline import ops_image  # noqa: F401  registers the image ops
from input_pipeline import ops_mask  # noqa: F401  registers the masking ops
from input_pipeline import ops_mix  # noqa: F401  registers the unpaired (VLMixer) ops
from input_pipeline import ops_mvp  # noqa: F401  registers MVP's phrase and tag ops
from input_pipeline import ops_task  # noqa: F401  registers the task ops
from input_pipeline import ops_text  # noqa: F401  registers the text ops
from input_pipeline import registry

# Ops that take the configured tokenizer as kind= / model= when the spec leaves them out.
TOKENIZER_OPS = ("tokenize", "mask_tokens", "joint_mask", "tokenize_answers", "ground_words", "cmc", "mvp_text")

_EXAMPLE_SEED_STREAM = 0
_BATCH_SEED_STREAM = 1


# ----------------------------------------------------------------------------- op strings


def with_tokenizer(spec: str, kind: str, model: str | None) -> str:
  """Adds kind= (and model=) to every tokenizer-using op of `spec` that lacks them."""
  out = []
  for op in registry.split(spec):
    name = op.split("(")[0].strip()
    if name in TOKENIZER_OPS:
      call = ast.parse(op if "(" in op else f"{op}()", mode="eval").body
      given = {k.arg for k in call.keywords}
      defaults = {"kind": kind, "model": model} if model else {"kind": kind}
      if name == "mask_tokens" and {"mask_id", "vocab_size"} <= given:
        defaults = {}
      for key, value in defaults.items():
        if key not in given:
          call.keywords.append(ast.keyword(arg=key, value=ast.Constant(value)))
      op = ast.unparse(call)
    out.append(op)
  return "|".join(out)


def build_ops(spec: str, cfg, field: str = "pp") -> Callable[[dict], dict]:
  """The composed op function of `spec`, its placeholders filled from `cfg`
  (`config_fields.fill`; errors name `config.input.<field>`), with the configured tokenizer."""
  if not spec:
    return lambda example: example
  kind, model = config_fields.tokenizer(cfg)
  return registry.parse(with_tokenizer(config_fields.fill(spec, cfg, field), kind, model))


def check_op_names(spec: str, field: str) -> None:
  """ValueError naming `config.input.<field>` for an op name no module registered."""
  for op in registry.split(spec):
    name = op.split("(")[0].strip()
    if name not in registry.names():
      raise ValueError(f"config.input.{field} = {spec!r}: unknown op {name!r}; known: "
                       f"{', '.join(registry.names())}")


def no_autograph(fn):
  """Ops are written with explicit tf.cond / while_loop; skipping AutoGraph halves tracing."""
  return tf.autograph.experimental.do_not_convert(fn)


# ----------------------------------------------------------------------------- seeds


def _base_seed(seed: int, stream: int) -> tf.Tensor:
  return tf.constant([seed & 0x7FFFFFFF_FFFFFFFF, stream], tf.int64)


def example_seed(seed: int, global_index) -> tf.Tensor:
  """int64 [2]: the per-example seed of the example at `global_index`."""
  folded = tf.random.experimental.stateless_fold_in(
      _base_seed(seed, _EXAMPLE_SEED_STREAM), tf.cast(global_index, tf.int64))
  return tf.cast(folded, tf.int64)


def batch_seed(seed: int, step) -> tf.Tensor:
  """int64 [2]: the seed batch-level ops read as `batch['_seed']` at `step`."""
  folded = tf.random.experimental.stateless_fold_in(
      _base_seed(seed, _BATCH_SEED_STREAM), tf.cast(step, tf.int64))
  return tf.cast(folded, tf.int64)


# ----------------------------------------------------------------------------- processes, eval rows


def resolve_processes(process_index, process_count) -> tuple[int, int]:
  """(index, count), JAX's where not given."""
  if process_index is None or process_count is None:
    import jax  # only for the defaults
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def padded_process_rows(total: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's eval row indices `i::n` of `total`, padded with -1 to whole batches.

  Every process gets the same number of batches, so all run the same number of eval steps.
  """
  mine = np.arange(process_index, total, process_count)
  per_process = math.ceil(total / process_count)
  rows = np.full([math.ceil(per_process / batch_size) * batch_size], -1, np.int64)
  rows[:len(mine)] = mine
  return rows


def match_decoded(decoded: Iterator[dict], rows: np.ndarray, index_key: str) -> Iterator[dict | None]:
  """Lines the decoded eval examples up with the rows they belong to.

  Args:
    decoded: the examples that survived decoding, ascending by `index_key` (the ones whose
      decoding raised are missing from it).
    rows: this process's row indices, ascending, -1 for padding (`padded_process_rows`).
    index_key: the example field holding its row index.

  Yields:
    for each entry of `rows`, in order: the example of that index, or None for padding rows and
    for indices missing from `decoded`.
  """
  pending = next(decoded, None)
  for index in rows:
    if index >= 0 and pending is not None and pending[index_key] == index:
      yield pending
      pending = next(decoded, None)
    else:
      yield None
