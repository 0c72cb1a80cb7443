"""Param layouts of the layer stacks: unrolled (`block_0 .. block_{n-1}`) or scanned (`blocks` [n, ...]).

`config.model.scan_layers` runs the ViT blocks, the text layers and the fusion layers as one
`nn.scan` stack each (`layers.scan_stack`), whose params carry a leading [layers] axis:

  unrolled                              scanned (scan_layers=True)
  vision/block_{i}/<leaf> [...]         vision/blocks/<leaf>  [depth, ...]
  text/layer_{i}/<leaf>   [...]         text/layers/<leaf>    [text_layers, ...]
  fusion/layer_{i}/<leaf> [...]         fusion/layers/<leaf>  [fusion_layers, ...]

The unrolled layout is the interchange layout: importers map reference checkpoints onto it, and
`checkpoint.load_params` returns it (so task remaps such as VQA's decoder-from-fusion read
`fusion/layer_i` whatever the checkpoint's layout); `checkpoint.partial_restore` then puts the
loaded params into the layout of the model being trained (`like`). A checkpoint of either layout
therefore restores into a model of either layout. Other layer lists (the MAE decoder, ViCHA's
concept encoder, VQA's answer decoder, CLIP) are never scanned.
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (top-level params key, name of the scanned stack, prefix of the unrolled layers)
STACKS = (("vision", "blocks", "block_"), ("text", "layers", "layer_"), ("fusion", "layers", "layer_"))


def _layer_names(tree: dict, prefix: str) -> list[str]:
  """The `prefix<i>` keys of `tree` in order; fails when the indices are not 0..n-1."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)")
  indices = sorted(int(m.group(1)) for m in map(pattern.fullmatch, tree) if m)
  if indices != list(range(len(indices))):
    raise ValueError(f"layers {[f'{prefix}{i}' for i in indices]} are not numbered 0..{len(indices) - 1}")
  return [f"{prefix}{i}" for i in indices]


def _stack_leaves(leaves):
  if all(isinstance(x, np.ndarray) or np.isscalar(x) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_root(tree: dict, stacked: str, prefix: str) -> dict:
  """One tower's params, unrolled -> scanned (a tower already scanned, or without layers, as is)."""
  names = _layer_names(tree, prefix)
  if not names:
    return tree
  if stacked in tree:
    raise ValueError(f"params have both {stacked!r} and {names[0]!r}...: mixed layouts")
  structures = {jax.tree.structure(tree[n]) for n in names}
  if len(structures) > 1:
    raise ValueError(f"layers {names} do not all have the same params; they cannot be stacked")
  out = {k: v for k, v in tree.items() if k not in names}
  out[stacked] = jax.tree.map(lambda *leaves: _stack_leaves(leaves), *[tree[n] for n in names])
  return out


def unroll_root(tree: dict, stacked: str, prefix: str) -> dict:
  """One tower's params, scanned -> unrolled (a tower already unrolled as is)."""
  if stacked not in tree or not isinstance(tree[stacked], dict):
    return tree
  lengths = {x.shape[0] for x in jax.tree.leaves(tree[stacked])}
  if len(lengths) != 1:
    raise ValueError(f"the {stacked!r} stack's params have different leading (layer) sizes {sorted(lengths)}")
  out = {k: v for k, v in tree.items() if k != stacked}
  for i in range(lengths.pop()):
    out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[stacked])
  return out


def _map_roots(params: dict, fn, roots=None) -> dict:
  out = dict(params)
  for root, stacked, prefix in STACKS:
    if root in out and isinstance(out[root], dict) and (roots is None or root in roots):
      out[root] = fn(dict(out[root]), stacked, prefix)
  return out


def stack(params: dict) -> dict:
  """Params (or EMA params) in the scanned layout."""
  return _map_roots(params, stack_root)


def unroll(params: dict) -> dict:
  """Params (or EMA params) in the unrolled (interchange) layout."""
  return _map_roots(params, unroll_root)


def is_scanned(params: dict) -> bool:
  return any(isinstance(params.get(root), dict) and stacked in params[root] for root, stacked, _ in STACKS)


def like(params: dict, target: dict) -> dict:
  """`params` in the layout of `target` (per tower: a tower `target` has scanned gets stacked)."""
  scanned = {root for root, stacked, _ in STACKS if isinstance(target.get(root), dict) and stacked in target[root]}
  out = _map_roots(params, unroll_root, roots={root for root, _, _ in STACKS} - scanned)
  return _map_roots(out, stack_root, roots=scanned)


def for_model(params: dict, model_config: Any) -> dict:
  """Interchange-layout params in the layout `model_config.scan_layers` asks for (importers)."""
  return stack(params) if getattr(model_config, "scan_layers", False) else unroll(params)
