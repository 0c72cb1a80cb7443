"""ViT key layouts: timm / DeiT / ALBEF `visual_encoder` (fused qkv) and Hugging Face `ViTModel`.

timm key (under a prefix such as `visual_encoder.`)   -> vlpjax leaf (under e.g. `params/vision`)
  cls_token, pos_embed                                -> cls, pos_embedding (resampled to the grid)
  patch_embed.proj                                    -> patch_embed (kernel HWIO)
  blocks.N.norm1 / norm2                              -> block_N/norm1/norm, block_N/norm2/norm
  blocks.N.attn.qkv (fused [3D, D])                   -> block_N/attn/{query,key,value}/dense
  blocks.N.attn.proj, mlp.fc1, mlp.fc2                -> block_N/attn/out/dense, mlp/fc1/dense, mlp/fc2/dense
  norm                                                -> norm/norm

HF ViTModel file key                                  -> the same leaves as the timm key
  embeddings.cls_token, position_embeddings           -> cls_token, pos_embed
  embeddings.patch_embeddings.projection              -> patch_embed.proj
  encoder.layer.N.layernorm_before / layernorm_after  -> blocks.N.norm1 / norm2
  encoder.layer.N.attention.attention.{query,key,value} -> the thirds of blocks.N.attn.qkv
  encoder.layer.N.attention.output.dense              -> blocks.N.attn.proj
  encoder.layer.N.intermediate.dense / output.dense   -> blocks.N.mlp.fc1 / fc2
  layernorm                                           -> norm
  embeddings.mask_token (when present)                -> mask_token
"""
import re
from typing import Mapping, Sequence

import numpy as np

from vlpjax.convert import mapping, resample

IGNORED_TIMM = ((r"head\.(weight|bias)", "ImageNet classifier head: unused"),)
IGNORED_HF = ((r"pooler\.dense\.(weight|bias)", "ViT pooler: unused"),
              (r"classifier\.(weight|bias)", "ImageNet classifier head: unused"))

# transformers >= 5 renames ViT modules in memory (files keep the names above).
_HF_IN_MEMORY_NAMES = (
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
)


def canonical_hf_key(key: str) -> str:
  """Maps a ViTModel / ViTFor* key to the file layout without the `vit.` prefix."""
  key = key[len("vit."):] if key.startswith("vit.") else key
  for pattern, replacement in _HF_IN_MEMORY_NAMES:
    new_key = re.sub(pattern, replacement, key)
    if new_key != key:
      return new_key
  return key


def pos_embedding_entry(key: str, dst: str, grid: int) -> mapping.Entry:
  """A [1, 1 + g*g, D] position table at `key`, resampled to `grid` x `grid`, into `dst`."""
  return mapping.Entry(key, lambda x: {dst: np.ascontiguousarray(
      resample.resample_pos_embedding(x.astype(np.float32), grid, key))})


def timm_block(src: str, dst: str) -> list[mapping.Entry]:
  """`src` = '<prefix>blocks.N', `dst` = '<root>/vision/block_N'."""
  entries = mapping.layer_norm(f"{src}.norm1", f"{dst}/norm1/norm")
  entries += mapping.fused_qkv(f"{src}.attn.qkv", f"{dst}/attn")
  entries += mapping.linear(f"{src}.attn.proj", f"{dst}/attn/out/dense")
  entries += mapping.layer_norm(f"{src}.norm2", f"{dst}/norm2/norm")
  entries += mapping.linear(f"{src}.mlp.fc1", f"{dst}/mlp/fc1/dense")
  entries += mapping.linear(f"{src}.mlp.fc2", f"{dst}/mlp/fc2/dense")
  return entries


def timm_vit(src: str, dst: str, depth: int, grid: int) -> list[mapping.Entry]:
  """A timm ViT under prefix `src` (e.g. 'visual_encoder.') into `dst` (e.g. 'params/vision')."""
  entries = [mapping.copy(f"{src}cls_token", f"{dst}/cls"),
             pos_embedding_entry(f"{src}pos_embed", f"{dst}/pos_embedding", grid)]
  entries += mapping.conv(f"{src}patch_embed.proj", f"{dst}/patch_embed")
  for i in range(depth):
    entries += timm_block(f"{src}blocks.{i}", f"{dst}/block_{i}")
  return entries + mapping.layer_norm(f"{src}norm", f"{dst}/norm/norm")


def hf_vit(dst: str, depth: int, grid: int, has_mask_token: bool) -> list[mapping.Entry]:
  """An HF ViTModel (canonical keys, see `canonical_hf_key`) into `dst`."""
  entries = [mapping.copy("embeddings.cls_token", f"{dst}/cls"),
             pos_embedding_entry("embeddings.position_embeddings", f"{dst}/pos_embedding", grid)]
  if has_mask_token:
    entries.append(mapping.copy("embeddings.mask_token", f"{dst}/mask_token"))
  entries += mapping.conv("embeddings.patch_embeddings.projection", f"{dst}/patch_embed")
  for i in range(depth):
    src, block = f"encoder.layer.{i}", f"{dst}/block_{i}"
    entries += mapping.layer_norm(f"{src}.layernorm_before", f"{block}/norm1/norm")
    for name in ("query", "key", "value"):
      entries += mapping.linear(f"{src}.attention.attention.{name}", f"{block}/attn/{name}/dense")
    entries += mapping.linear(f"{src}.attention.output.dense", f"{block}/attn/out/dense")
    entries += mapping.layer_norm(f"{src}.layernorm_after", f"{block}/norm2/norm")
    entries += mapping.linear(f"{src}.intermediate.dense", f"{block}/mlp/fc1/dense")
    entries += mapping.linear(f"{src}.output.dense", f"{block}/mlp/fc2/dense")
  return entries + mapping.layer_norm("layernorm", f"{dst}/norm/norm")


def timm_depth(keys: Sequence[str], prefix: str) -> int:
  indices = mapping.layer_indices(keys, re.escape(prefix) + r"blocks\.(\d+)\.")
  return indices[-1] + 1 if indices else 0


def hf_depth(keys: Sequence[str]) -> int:
  indices = mapping.layer_indices(keys, r"encoder\.layer\.(\d+)\.")
  return indices[-1] + 1 if indices else 0


def vision_config_from(state_dict: Mapping[str, np.ndarray], *, pos_key: str, patch_key: str,
                       fc1_key: str, depth: int, image_res: int | None = None,
                       hints: Mapping | None = None, layer_norm_eps: float = 1e-6) -> dict:
  """VisionConfig fields read from the shapes (and an HF config.json for heads / eps; `num_heads`
  is None without one).

  `image_res` (when given) replaces the resolution the position table was trained at.

  Raises:
    ValueError: a key the shapes are read from is absent, or the position table is not square.
  """
  hints = hints or {}
  for key in (pos_key, patch_key):
    if key not in state_dict:
      raise ValueError(f"checkpoint has no key {key!r}; is --source right? (first keys: "
                       f"{sorted(state_dict)[:5]})")
  width, _, patch_size, patch_width = state_dict[patch_key].shape
  if patch_size != patch_width:
    raise ValueError(f"{patch_key}: non-square patches {state_dict[patch_key].shape} are not supported")
  grid = resample.grid_size(state_dict[pos_key], pos_key)
  mlp_dim = state_dict[fc1_key].shape[0] if fc1_key in state_dict else 4 * width
  # Not in the weights' shapes: None unless a config says it (the importer then refuses to write
  # without one, rather than guess).
  heads = hints.get("num_attention_heads")
  return dict(
      image_size=int(image_res or grid * patch_size), patch_size=int(patch_size), width=int(width),
      depth=int(depth), num_heads=None if heads is None else int(heads),
      mlp_ratio=float(mlp_dim / width),
      layer_norm_eps=float(hints.get("layer_norm_eps", layer_norm_eps)))


def resample_note(state_dict, pos_key: str, grid: int) -> list[str]:
  """A report line when the position table at `pos_key` is resampled to `grid`."""
  old = resample.grid_size(state_dict[pos_key], pos_key)
  if old == grid:
    return []
  return [f"{pos_key}: position grid resampled {old}x{old} -> {grid}x{grid} (torch bicubic, a=-0.75)"]


def _grid(cfg: dict) -> int:
  return cfg["image_size"] // cfg["patch_size"]


def plan_timm_vit(state_dict: Mapping[str, np.ndarray], target=None, *, image_res: int | None = None,
                  hints: Mapping | None = None, **unused) -> mapping.Plan:
  """Plans a timm / DeiT ViT state dict (fused qkv; the classifier `head` is dropped)."""
  del unused
  sd, origin = mapping.canonicalize(state_dict, lambda k: k)
  keys = list(sd)
  source_depth = timm_depth(keys, "")
  depth = target.vision.depth if target is not None else source_depth
  cfg = vision_config_from(sd, pos_key="pos_embed", patch_key="patch_embed.proj.weight",
                           fc1_key="blocks.0.mlp.fc1.weight", depth=source_depth, image_res=image_res,
                           hints=hints)
  layout = mapping.Layout(entries=timm_vit("", "params/vision", depth, _grid(cfg)),
                          ignored=list(IGNORED_TIMM))
  return mapping.Plan(layout=layout, state_dict=sd, origin=origin, model_config=dict(vision=cfg),
                      scope=("vision",), notes=resample_note(sd, "pos_embed", _grid(cfg)))


def plan_hf_vit(state_dict: Mapping[str, np.ndarray], target=None, *, image_res: int | None = None,
                hints: Mapping | None = None, **unused) -> mapping.Plan:
  """Plans an HF ViTModel / ViTForImageClassification state dict (file or in-memory names)."""
  del unused
  sd, origin = mapping.canonicalize(state_dict, canonical_hf_key)
  keys = list(sd)
  source_depth = hf_depth(keys)
  depth = target.vision.depth if target is not None else source_depth
  # transformers' ViTConfig defaults to LayerNorm eps 1e-12 (timm / ALBEF use 1e-6).
  cfg = vision_config_from(sd, pos_key="embeddings.position_embeddings",
                           patch_key="embeddings.patch_embeddings.projection.weight",
                           fc1_key="encoder.layer.0.intermediate.dense.weight", depth=source_depth,
                           image_res=image_res, hints=hints, layer_norm_eps=1e-12)
  entries = hf_vit("params/vision", depth, _grid(cfg), has_mask_token="embeddings.mask_token" in sd)
  layout = mapping.Layout(entries=entries, ignored=list(IGNORED_HF))
  notes = resample_note(sd, "embeddings.position_embeddings", _grid(cfg))
  return mapping.Plan(layout=layout, state_dict=sd, origin=origin, model_config=dict(vision=cfg),
                      scope=("vision",), notes=notes)
