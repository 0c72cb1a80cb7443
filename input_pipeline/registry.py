"""A registry of small preprocessing ops composed by a string, in the big_vision manner.

An op is registered under a name with a factory: `factory(*args, **kwargs) -> fn`, where
`fn(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]` is written in TensorFlow ops
so it runs inside `tf.data.Dataset.map`. A spec string chains ops with `|`:

    "decode|random_resized_crop(256, scale=(0.2, 1.0))|flip|normalize('clip')"

Arguments are Python literals. Ops that need randomness read the per-example stateless seed
`example['_seed']` (an int64 [2] tensor) and derive their own sub-seed from a fixed salt,
so a batch is a pure function of (run seed, example position).

Modules register their ops when imported; this module imports none of them (that would make
an import cycle), so a caller imports the op modules it uses (`input_pipeline.pipeline`
imports them all).
"""
import ast
from typing import Callable


class OpRegistry:
  """Op factories by name; `what` names the kind of op in error messages."""

  def __init__(self, what: str):
    self._what = what
    self._factories: dict[str, Callable] = {}

  def register(self, name: str):
    """Registers `factory` under `name`; re-registering the same name is an error."""

    def wrap(factory):
      if name in self._factories and self._factories[name] is not factory:
        raise ValueError(f"{self._what} {name!r} is registered twice")
      self._factories[name] = factory
      return factory

    return wrap

  def names(self) -> list[str]:
    return sorted(self._factories)

  def get_op(self, spec: str) -> Callable:
    """Builds one op from a spec such as `"tokenize(25)"`."""
    name, args, kwargs = _parse_call(spec)
    if name not in self._factories:
      raise KeyError(f"unknown {self._what} {name!r} in {spec!r}; known: "
                     f"{', '.join(self.names())}")
    return self._factories[name](*args, **kwargs)


def _parse_call(spec: str):
  spec = spec.strip()
  if "(" not in spec:
    return spec, (), {}
  expr = ast.parse(spec, mode="eval").body
  if not isinstance(expr, ast.Call) or not isinstance(expr.func, ast.Name):
    raise ValueError(f"cannot parse preprocessing op {spec!r}")
  args = tuple(ast.literal_eval(a) for a in expr.args)
  kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
  return expr.func.id, args, kwargs


def split(spec: str) -> list[str]:
  """Splits on '|' that are not inside parentheses, brackets or quotes."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(spec):
    if quote:
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "|" and depth == 0:
      parts.append(spec[start:i])
      start = i + 1
  parts.append(spec[start:])
  return [p for p in (p.strip() for p in parts) if p]


def parse(spec: str) -> Callable:
  """Builds the composition of all ops in a `|`-separated spec string."""
  ops = [get_op(s) for s in split(spec)]

  def apply(example):
    for op in ops:
      example = op(example)
    return example

  return apply


# The tf.data ops (per example and per batch).
_TF_OPS = OpRegistry("preprocessing op")
register, names, get_op = _TF_OPS.register, _TF_OPS.names, _TF_OPS.get_op
