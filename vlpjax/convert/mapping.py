"""Key-mapping machinery shared by the importers.

An importer describes a checkpoint as a `Layout`: the list of keys it expects (each an `Entry`
that turns one source array into one or more target leaves), the keys it drops on purpose
(`ignored`, with a reason) and the keys that duplicate another key (`tied`, e.g. BERT's MLM
decoder, which is the word embedding). `apply_layout` then sorts every key of a state dict into
exactly one of: converted, tied, ignored, unmapped; and every expected key absent from the state
dict into missing.

Target leaves are '/'-joined paths under a root: `params/...`, `ema_params/...` or `queues/...`.
Conversions of PyTorch tensors:
  Linear weight [out, in]           -> Dense kernel [in, out] (transpose)
  LayerNorm weight / bias           -> scale / bias
  Conv2d weight [out, in, kh, kw]   -> Conv kernel [kh, kw, in, out] (HWIO)
  timm fused qkv weight [3D, D]     -> query / key / value kernels [D, D] (thirds of the output axis)
"""
import collections
import dataclasses
import re
from typing import Callable, Mapping, Sequence

import numpy as np

Converter = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One expected source key and how it becomes target leaves."""
  key: str
  convert: Converter


@dataclasses.dataclass
class Layout:
  """What a checkpoint holds: expected keys, keys dropped on purpose, and tied duplicates."""
  entries: list[Entry] = dataclasses.field(default_factory=list)
  ignored: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (regex, reason)
  tied: list[tuple[str, str]] = dataclasses.field(default_factory=list)     # (key, key it repeats)

  def extend(self, other: "Layout") -> "Layout":
    self.entries += other.entries
    self.ignored += other.ignored
    self.tied += other.tied
    return self


@dataclasses.dataclass
class MappingResult:
  leaves: dict[str, np.ndarray]          # target path -> array
  mapping: dict[str, list[str]]          # source key -> target paths it wrote
  unmapped: dict[str, str]               # source key -> why it could not be converted
  missing: list[str]                     # expected keys absent from the source
  ignored: dict[str, str]                # source key -> why it is dropped
  tied: dict[str, str]                   # source key -> the key it duplicates


def _contiguous(x: np.ndarray) -> np.ndarray:
  """A C-ordered copy when needed (a transpose), float32 for floats; 0-d arrays stay 0-d."""
  return np.asarray(x, dtype=np.float32 if x.dtype.kind == "f" else x.dtype, order="C")


def _checked(key: str, x: np.ndarray, ndim: int) -> np.ndarray:
  if x.ndim != ndim:
    raise ValueError(f"checkpoint key {key!r}: expected a {ndim}-D array, got shape {x.shape}")
  return x


def copy(key: str, dst: str) -> Entry:
  return Entry(key, lambda x: {dst: _contiguous(x)})


def linear(src: str, dst: str) -> list[Entry]:
  """`src.weight` [out, in] / `src.bias` -> `dst/kernel` [in, out] / `dst/bias`."""
  key = f"{src}.weight"
  return [Entry(key, lambda x: {f"{dst}/kernel": _contiguous(_checked(key, x, 2).T)}),
          copy(f"{src}.bias", f"{dst}/bias")]


def layer_norm(src: str, dst: str) -> list[Entry]:
  """`src.weight` / `src.bias` -> `dst/scale` / `dst/bias`."""
  return [copy(f"{src}.weight", f"{dst}/scale"), copy(f"{src}.bias", f"{dst}/bias")]


def conv(src: str, dst: str) -> list[Entry]:
  """Conv2d `src.weight` [out, in, kh, kw] -> HWIO `dst/kernel`; `src.bias` -> `dst/bias`."""
  key = f"{src}.weight"
  return [Entry(key, lambda x: {f"{dst}/kernel": _contiguous(_checked(key, x, 4).transpose(2, 3, 1, 0))}),
          copy(f"{src}.bias", f"{dst}/bias")]


def fused_qkv(src: str, dst: str) -> list[Entry]:
  """timm `src.weight` [3D, D] / `src.bias` [3D] -> `dst/{query,key,value}/dense/{kernel,bias}`."""
  names = ("query", "key", "value")

  def split_weight(x, key=f"{src}.weight"):
    x = _checked(key, x, 2)
    if x.shape[0] % 3:
      raise ValueError(f"checkpoint key {key!r}: fused qkv rows {x.shape[0]} are not divisible by 3")
    return {f"{dst}/{n}/dense/kernel": _contiguous(part.T) for n, part in zip(names, np.split(x, 3))}

  def split_bias(x, key=f"{src}.bias"):
    x = _checked(key, x, 1)
    if x.shape[0] % 3:
      raise ValueError(f"checkpoint key {key!r}: fused qkv bias {x.shape[0]} is not divisible by 3")
    return {f"{dst}/{n}/dense/bias": _contiguous(part) for n, part in zip(names, np.split(x, 3))}

  return [Entry(f"{src}.weight", split_weight), Entry(f"{src}.bias", split_bias)]


def apply_layout(layout: Layout, state_dict: Mapping[str, np.ndarray]) -> MappingResult:
  """Sorts every source key into converted / tied / ignored / unmapped, and finds missing keys.

  Raises:
    ValueError: two source keys write the same target leaf, an entry is listed twice, or a
      tied key differs from the key it repeats.
  """
  result = MappingResult(leaves={}, mapping={}, unmapped={}, missing=[], ignored={}, tied={})
  counts = collections.Counter(entry.key for entry in layout.entries)
  duplicates = sorted(key for key, count in counts.items() if count > 1)
  if duplicates:
    raise ValueError(f"importer layout lists keys more than once: {duplicates[:5]}")
  writer = {}
  for entry in layout.entries:
    if entry.key not in state_dict:
      result.missing.append(entry.key)
      continue
    outputs = entry.convert(state_dict[entry.key])
    for path, value in outputs.items():
      if path in writer:
        raise ValueError(f"checkpoint keys {writer[path]!r} and {entry.key!r} both map to {path!r}")
      writer[path] = entry.key
      result.leaves[path] = value
    result.mapping[entry.key] = sorted(outputs)
  for key, original in layout.tied:
    if key not in state_dict:
      continue
    if original in state_dict and not np.array_equal(state_dict[key], state_dict[original]):
      # An untied copy cannot be represented (the target ties it): report it, never drop it.
      result.unmapped[key] = f"differs from {original!r}, which it should repeat (tied weights)"
      continue
    result.tied[key] = original
  ignore_rules = [(re.compile(pattern), reason) for pattern, reason in layout.ignored]
  known = set(result.mapping) | set(result.tied) | set(result.unmapped)
  for key in state_dict:
    if key in known:
      continue
    reason = next((reason for pattern, reason in ignore_rules if pattern.fullmatch(key)), None)
    if reason is None:
      result.unmapped[key] = "no rule for this key"
    else:
      result.ignored[key] = reason
  return result


def layer_indices(keys: Sequence[str], pattern: str) -> list[int]:
  """Sorted distinct integers captured by `pattern` (one group) over `keys` (re.match)."""
  compiled = re.compile(pattern)
  return sorted({int(m.group(1)) for m in map(compiled.match, keys) if m})


@dataclasses.dataclass
class Plan:
  """What an importer decided about one state dict, before any array is converted.

  Attributes:
    layout: the expected keys (under canonical names) and how they convert.
    state_dict: the source arrays under canonical names.
    origin: canonical name -> the name in the file (for reports).
    model_config: `ModelConfig` fields as nested dicts: read from the shapes, or the target's.
    scope: top-level param subtrees this source fills (`text`, `vision`, ...).
    momentum: 'checkpoint' (the `_m` weights become EMA params), 'synthesised' (EMA = online,
      the source implies momentum weights but has none) or 'none' (no EMA output).
    notes: what was done beyond renaming (resampling, synthesised parts).
  """
  layout: Layout
  state_dict: dict[str, np.ndarray]
  origin: dict[str, str]
  model_config: dict
  scope: tuple[str, ...]
  momentum: str = "none"
  notes: list[str] = dataclasses.field(default_factory=list)


def canonicalize(state_dict: Mapping[str, np.ndarray],
                 rename: Callable[[str], str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Renames every key with `rename`; returns (renamed dict, canonical -> original).

  Raises:
    ValueError: two keys get the same canonical name (e.g. both `text_encoder.bert.X` and
      `text_encoder.X`), naming both.
  """
  renamed, origin = {}, {}
  for key, value in state_dict.items():
    canonical = rename(key)
    if canonical in origin:
      raise ValueError(f"checkpoint keys {origin[canonical]!r} and {key!r} are the same parameter "
                       f"({canonical!r}); keep one of them")
    renamed[canonical], origin[canonical] = value, key
  return renamed, origin
