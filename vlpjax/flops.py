"""Model FLOPs of a train step, counted from its jaxpr.

Every `dot_general` and convolution in the traced step counts 2 * (multiply-adds); that covers
the student's forward and backward and the teacher's forward exactly as written, for any
method, without a hand-kept formula per model. Elementwise work (softmax, LayerNorm, GELU) is
not counted, as is usual for MFU. Count with `remat=False`: rematerialised forwards are hardware
FLOPs, not model FLOPs.
"""
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  size = lambda shape, dims: int(np.prod([shape[d] for d in dims]))
  free = lambda shape, used: int(np.prod([s for d, s in enumerate(shape) if d not in used]))
  return (2 * size(lhs.shape, lhs_batch) * size(lhs.shape, lhs_contract)
          * free(lhs.shape, (*lhs_contract, *lhs_batch)) * free(rhs.shape, (*rhs_contract, *rhs_batch)))


def _conv_flops(eqn) -> int:
  out = eqn.outvars[0].aval
  rhs = eqn.invars[1].aval
  dn = eqn.params["dimension_numbers"]
  kernel_spatial = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]]))
  in_features = rhs.shape[dn.rhs_spec[1]]
  # The kernel's in-feature dimension is already per feature group.
  return 2 * int(np.prod(out.shape)) * kernel_spatial * in_features


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    values = value if isinstance(value, (list, tuple)) else (value,)
    for v in values:
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "while":
      total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
    else:
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
  return total


def count_flops(fn: Callable, *args: Any) -> int:
  """Matmul + conv FLOPs of `fn(*args)`; args may be `jax.ShapeDtypeStruct`s (nothing runs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
