"""A registry of small preprocessing ops composed by a string, in the big_vision manner.

An op is registered under a name with a factory: `factory(*args, **kwargs) -> fn`, where
`fn(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]` is written in TensorFlow ops
so it runs inside `tf.data.Dataset.map`. A spec string chains ops with `|`:

    "decode|random_resized_crop(256, scale=(0.2, 1.0))|flip|normalize('clip')"

Arguments are Python literals. Ops that need randomness read the per-example stateless seed
`example['_seed']` (an int64 [2] tensor) and derive their own sub-seed from a fixed salt,
so a batch is a pure function of (run seed, example position).
"""
import ast
from typing import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
  """Registers `factory` under `name`; re-registering the same name is an error."""

  def wrap(factory):
    if name in _REGISTRY and _REGISTRY[name] is not factory:
      raise ValueError(f"preprocessing op {name!r} is registered twice")
    _REGISTRY[name] = factory
    return factory

  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


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


def _split_top_level(spec: str) -> list[str]:
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


def get_op(spec: str) -> Callable:
  """Builds one op from a spec such as `"tokenize(25)"`."""
  _import_ops()
  name, args, kwargs = _parse_call(spec)
  if name not in _REGISTRY:
    raise KeyError(f"unknown preprocessing op {name!r} in {spec!r}; known: {', '.join(names())}")
  return _REGISTRY[name](*args, **kwargs)


def parse(spec: str) -> Callable:
  """Builds the composition of all ops in a `|`-separated spec string."""
  ops = [get_op(s) for s in _split_top_level(spec)]

  def apply(example):
    for op in ops:
      example = op(example)
    return example

  return apply


def _import_ops():
  # Importing the op modules registers their ops. Local import avoids a cycle.
  from input_pipeline import ops_image, ops_mask, ops_text  # noqa: F401
