"""Evaluators by kind (`config.eval.kind`, default 'retrieval').

Each evaluator module provides the contract the trainer and `python -m vlpjax.evaluate` use:

  EVAL_KEYS: tuple[str, ...]      its own `config.eval` keys (beyond every_steps, split,
                                  batch_size, kind), checked by `config_lib.validate`
  run(config, model, params, *, mesh=None) -> dict[str, float]
                                  metrics of `params` on `config.eval.split` of `config.input`
  format_results(results) -> str  a short human-readable table
"""
import importlib
from types import ModuleType

KINDS = {
    "retrieval": "vlpjax.evaluators.retrieval",
    "vqa": "vlpjax.evaluators.vqa",
    "classification": "vlpjax.evaluators.classification",
    "grounding": "vlpjax.evaluators.grounding",
}


def get(kind: str) -> ModuleType:
  """The evaluator module of `kind`; ValueError naming the known kinds otherwise."""
  if kind not in KINDS:
    raise ValueError(f"unknown config.eval.kind {kind!r}; known: {sorted(KINDS)}")
  return importlib.import_module(KINDS[kind])
