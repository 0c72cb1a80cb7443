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


class Scheduled:
  """One periodic evaluation of a run: `evaluator(params) -> metrics`, logged under `prefix`."""

  def __init__(self, name: str, prefix: str, every_steps: int, evaluator):
    self.name, self.prefix, self.every_steps, self.evaluator = name, prefix, every_steps, evaluator


def build_all(config, model, mesh=None) -> list[Scheduled]:
  """`config.eval` (prefix 'eval') and each `config.evals.<name>` (prefix 'eval_<name>')."""
  import ml_collections
  blocks = [("eval", "eval", config.get("eval"))]
  blocks += [(name, f"eval_{name}", block) for name, block in (config.get("evals") or {}).items()]
  out = []
  for name, prefix, block in blocks:
    if not block or not block.get("every_steps"):
      continue
    view = ml_collections.ConfigDict(config.to_dict())
    view.eval = ml_collections.ConfigDict(dict(block))
    module = get(view.eval.get("kind") or "retrieval")
    out.append(Scheduled(name, prefix, int(block.every_steps),
                         lambda params, m=module, v=view: m.run(v, model, params)))
  return out
