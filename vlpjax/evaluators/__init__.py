"""Evaluators by kind (`kind` of an eval block, default 'retrieval'), and the run's eval schedule.

Each evaluator module provides the contract the trainer and `python -m vlpjax.evaluate` use:

  EVAL_KEYS: tuple[str, ...]      its own eval-block keys (beyond every_steps, split, batch_size,
                                  kind), checked by `validate`
  Evaluator(config, model, mesh=None, *, data=None)
                                  checks `config.eval`, builds the eval data of `config.eval.split`
                                  of `config.input` and the jitted functions, once;
                                  `evaluator(params) -> dict[str, float]` evaluates, compiling
                                  nothing after the first call; params keep their sharding
  run(config, model, params, *, mesh=None) -> dict[str, float]
                                  one-off `Evaluator(config, model, mesh)(params)`
  format_results(results) -> str  a short human-readable table

A run's evaluations (`build_all`): `config.eval` is the primary one (metrics prefix 'eval');
`config.evals` (optional) = {name: {kind, every_steps, split, batch_size, input?, ...}} adds
named ones (prefix 'eval_<name>'), each built with a copy of the config whose `eval` is its
block and whose `input` is `config.input` updated with the block's optional `input` overrides
(e.g. another eval annotation file). The trainer builds them once and calls each one every
`every_steps` steps and at the last step:

  scheduled = evaluators.build_all(config, model, mesh)
  for s in scheduled:
    if s.every_steps and (step % s.every_steps == 0 or step == total_steps):
      results = s.evaluator(state.params)          # log under f"{s.prefix}/{key}"
"""
import dataclasses
import importlib
import re
from types import ModuleType
from typing import Callable

import ml_collections

KINDS = {
    "retrieval": "vlpjax.evaluators.retrieval",
    "vqa": "vlpjax.evaluators.vqa",
    "classification": "vlpjax.evaluators.classification",
    "grounding": "vlpjax.evaluators.grounding",
}
# The keys every eval block has (beyond its kind's EVAL_KEYS); a named block may also set `input`.
BASE_KEYS = ("every_steps", "split", "batch_size", "kind")
REQUIRED_NAMED_KEYS = ("every_steps", "split", "batch_size")
PRIMARY = "eval"
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def get(kind: str) -> ModuleType:
  """The evaluator module of `kind`; ValueError naming the known kinds otherwise."""
  if kind not in KINDS:
    raise ValueError(f"unknown config.eval.kind {kind!r}; known: {sorted(KINDS)}")
  return importlib.import_module(KINDS[kind])


def kind_of(block) -> str:
  return block.get("kind") or "retrieval"


@dataclasses.dataclass(frozen=True)
class Scheduled:
  """One evaluation of a run.

  name: 'eval' for `config.eval`, else its key in `config.evals`; prefix: the metrics prefix
  ('eval', 'eval_<name>'); kind: the evaluator kind; every_steps: > 0; evaluator: params ->
  dict[str, float] (an `Evaluator` of `kind`, built once).
  """
  name: str
  prefix: str
  kind: str
  every_steps: int
  evaluator: Callable[..., dict]

  def format_results(self, results: dict[str, float]) -> str:
    return get(self.kind).format_results(results)


def _keys(block) -> list[str]:
  return list(block.keys()) if hasattr(block, "keys") else []


def _check_block(block, where: str, extra: tuple[str, ...] = ()) -> None:
  if not hasattr(block, "keys"):
    raise ValueError(f"{where} must be a dict of eval settings, got {type(block).__name__}")
  kind = kind_of(block)
  if kind not in KINDS:
    raise ValueError(f"unknown {where}.kind {kind!r}; known: {sorted(KINDS)}")
  allowed = set(BASE_KEYS) | set(extra) | set(get(kind).EVAL_KEYS)
  unknown = sorted(set(_keys(block)) - allowed)
  if unknown:
    raise ValueError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                     f"allowed in {where}: {sorted(allowed)}")


def named_blocks(config) -> dict:
  """`config.evals` as {name: block}; empty when absent, None or {}."""
  evals = config.get("evals") if hasattr(config, "get") else None
  if not evals:
    return {}
  if not hasattr(evals, "keys"):
    raise ValueError(f"config.evals must be a dict {{name: eval block}}, got {type(evals).__name__}")
  return {name: evals[name] for name in evals.keys()}


def validate(config) -> None:
  """Checks `config.eval` and every `config.evals.<name>` (keys, kind, required keys, name).

  Runs no computation; each error names the full key path.
  """
  if "eval" in config and config.eval is not None:
    _check_block(config.eval, "config.eval")
  for name, block in named_blocks(config).items():
    where = f"config.evals.{name}"
    if not _NAME.match(str(name)):
      raise ValueError(f"{where}: an eval name may use letters, digits and '_' only (it names the metrics "
                       f"prefix 'eval_<name>')")
    _check_block(block, where, extra=("input",))
    missing = [k for k in REQUIRED_NAMED_KEYS if k not in _keys(block)]
    if missing:
      raise ValueError(f"{where} lacks {', '.join(f'{where}.{k}' for k in missing)}")
    overrides = block.get("input") or {}
    if overrides and "input" in config:
      from input_pipeline import builder
      fields = getattr(builder, "FIELDS", None)
      if fields is not None:
        unknown = sorted(set(dict(overrides)) - set(fields))
        if unknown:
          raise ValueError(f"unknown config key(s) {', '.join(f'{where}.input.{k}' for k in unknown)}")


def config_for(config, name: str) -> ml_collections.ConfigDict:
  """The config the evaluator `config.evals.<name>` is built with: `eval` = its block (without
  `input`), `input` = `config.input` updated with the block's `input` overrides."""
  block = dict(named_blocks(config)[name])
  overrides = dict(block.pop("input", None) or {})
  out = ml_collections.ConfigDict(config.to_dict())
  with out.unlocked():
    out.eval = ml_collections.ConfigDict(block)
    if overrides:
      out.input.update(overrides)
    if "evals" in out:
      del out["evals"]
  return out


def build_all(config, model, mesh=None) -> list[Scheduled]:
  """The run's evaluations, each built once (data read, functions wrapped; compiled on first use).

  Evaluations whose every_steps is 0 (or unset) are left out, and all of them when
  `config.input.synthetic` is on (synthetic training data has no eval split).

  Args:
    config: the run config; model: the model the trainer trains; mesh: the training mesh (params
      keep their training sharding; eval batches are split over its batch axes).

  Returns:
    [Scheduled]: the primary `config.eval` first, then `config.evals` in name order.
  """
  validate(config)
  if "input" in config and config.input.get("synthetic", False):
    return []
  blocks = []
  if "eval" in config and config.eval is not None:
    blocks.append((PRIMARY, PRIMARY, config.eval, lambda: config))
  for name, block in named_blocks(config).items():
    blocks.append((name, f"{PRIMARY}_{name}", block, lambda name=name: config_for(config, name)))
  scheduled = []
  for name, prefix, block, make_config in blocks:
    every_steps = int(block.get("every_steps", 0) or 0)
    if every_steps <= 0:
      continue
    kind = kind_of(block)
    evaluator = get(kind).Evaluator(make_config(), model, mesh)
    scheduled.append(Scheduled(name=name, prefix=prefix, kind=kind, every_steps=every_steps, evaluator=evaluator))
  return scheduled
