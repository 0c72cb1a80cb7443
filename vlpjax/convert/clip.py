"""CLIP checkpoints -> `vlpjax.models.clip.CLIP` params, with the importers' strict key accounting.

Two layouts are read (`detect_layout` tells them apart by their keys):

Hugging Face `CLIPModel` (a directory: config.json + model.safetensors, sharded safetensors with
`model.safetensors.index.json`, or pytorch_model.bin). The shapes come from config.json.
  text_model.embeddings.token_embedding / position_embedding   -> text/token_embedding, pos_embedding
  {text,vision}_model.encoder.layers.N.layer_norm1 / layer_norm2 -> block_N/ln_1, ln_2
  ... .self_attn.{q,k,v,out}_proj                              -> block_N/attn/{query,key,value,out}
  ... .mlp.fc1 / fc2                                           -> block_N/fc1, fc2
  text_model.final_layer_norm                                  -> text/ln_final
  vision_model.embeddings.class_embedding / patch_embedding / position_embedding
                                                               -> vision/cls, patch_embed, pos_embedding
  vision_model.pre_layrnorm / post_layernorm (sic)             -> vision/ln_pre, ln_post
  visual_projection.weight / text_projection.weight [E, W]     -> {vision,text}/proj/dense/kernel [W, E] (transposed)
  logit_scale                                                  -> logit_scale

OpenAI `clip` / open_clip (one file: .pt/.pth/.bin/.safetensors; OpenAI's released `.pt` files
are TorchScript archives, read with `trust_pickle=True`). Nothing but the weights is stored, so
the shapes are read from the tensors, as OpenAI's `build_model` does:
  visual.conv1.weight [W, 3, p, p] (no bias)    -> vision/patch_embed (width, patch size)
  visual.class_embedding [W], visual.positional_embedding [1 + g*g, W] -> vision/cls, pos_embedding (grid)
  visual.ln_pre, visual.ln_post                 -> vision/ln_pre, ln_post
  visual.proj [W, E]                            -> vision/proj/dense/kernel, NOT transposed (used as x @ proj)
  {visual.,}transformer.resblocks.N.ln_1 / ln_2 -> block_N/ln_1, ln_2
  ... .attn.in_proj_weight [3W, W] / in_proj_bias [3W]  (fused q, k, v thirds) -> block_N/attn/{query,key,value}
  ... .attn.out_proj, .mlp.c_fc, .mlp.c_proj    -> block_N/attn/out, fc1, fc2
  token_embedding.weight [V, W], positional_embedding [L, W] -> text/token_embedding, pos_embedding (vocab, context)
  ln_final, text_projection [W, E] (NOT transposed), logit_scale
Attention heads are not in the weights: OpenAI's `build_model` uses width / 64 for both towers
(ViT-B/16: 768 / 64 = 12 image heads, 512 / 64 = 8 text heads); that is the default here, an
`open_clip_config.json` beside the file overrides it (text_cfg.heads, vision_cfg.head_width),
and a width that is not a multiple of 64 is refused unless the heads are given. The MLP
activation is not in the weights either: OpenAI's models use quick_gelu (the default), open_clip's
own models (LAION) the exact GELU unless their config says `quick_gelu` (read from
open_clip_config.json when present, else pass `act="gelu"`). Pooling: the end-of-text token has
the largest id, so the text embedding is read at argmax(ids) (`text_pool='argmax'`).
ResNet image towers (RN50, ...) and open_clip models with other text or pooling heads are
refused with the keys that have no rule.
"""
import dataclasses
import json
import math
import os
import re
import zipfile
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util

from vlpjax.convert import mapping, torch_io
from vlpjax.convert.importer import ConversionError
from vlpjax.models import clip as clip_model

LAYOUTS = ("hf", "openai")
OPENAI_HEAD_WIDTH = 64
IGNORED_HF = ((r"(text|vision)_model\.embeddings\.position_ids", "buffer: arange(positions)"),)
IGNORED_OPENAI = ((r"input_resolution|context_length|vocab_size", "scalars of OpenAI's TorchScript archives"),
                  (r"attn_mask", "causal mask buffer (rebuilt from the length)"))


# ----------------------------------------------------------------------------- entries


# np.asarray(order="C"), not np.ascontiguousarray, which turns the 0-d logit_scale into [1].
def _checked(key: str, x: np.ndarray, ndim: int) -> np.ndarray:
  if x.ndim != ndim:
    raise ValueError(f"checkpoint key {key!r}: expected a {ndim}-D array, got shape {x.shape}")
  return x


def _as_is(key: str, dst: str, ndim: int) -> mapping.Entry:
  return mapping.Entry(key, lambda x: {dst: np.asarray(_checked(key, x, ndim), np.float32, order="C")})


def _transposed(key: str, dst: str) -> mapping.Entry:
  """A bias-free Linear weight [out, in] -> `dst` [in, out]."""
  return mapping.Entry(key, lambda x: {dst: np.asarray(_checked(key, x, 2).T, np.float32, order="C")})


def _patch_conv(key: str, dst: str) -> mapping.Entry:
  """Conv2d weight [out, in, kh, kw] without bias -> HWIO `dst`."""
  return mapping.Entry(key, lambda x: {dst: np.asarray(_checked(key, x, 4).transpose(2, 3, 1, 0), np.float32,
                                                      order="C")})


def _hf_tower(src: str, dst: str, depth: int) -> list[mapping.Entry]:
  entries = []
  for i in range(depth):
    layer, block = f"{src}.encoder.layers.{i}", f"{dst}/block_{i}"
    entries += mapping.layer_norm(f"{layer}.layer_norm1", f"{block}/ln_1/norm")
    for name, target in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
      entries += mapping.linear(f"{layer}.self_attn.{name}", f"{block}/attn/{target}/dense")
    entries += mapping.layer_norm(f"{layer}.layer_norm2", f"{block}/ln_2/norm")
    entries += mapping.linear(f"{layer}.mlp.fc1", f"{block}/fc1/dense")
    entries += mapping.linear(f"{layer}.mlp.fc2", f"{block}/fc2/dense")
  return entries


def hf_layout(cfg: clip_model.ClipConfig) -> mapping.Layout:
  """The keys of a transformers CLIPModel of `cfg` and where each goes."""
  v, t = "params/vision", "params/text"
  entries = [
      _as_is("vision_model.embeddings.class_embedding", f"{v}/cls", 1),
      _patch_conv("vision_model.embeddings.patch_embedding.weight", f"{v}/patch_embed/kernel"),
      _as_is("vision_model.embeddings.position_embedding.weight", f"{v}/pos_embedding", 2),
      *mapping.layer_norm("vision_model.pre_layrnorm", f"{v}/ln_pre/norm"),
      *_hf_tower("vision_model", v, cfg.vision.depth),
      *mapping.layer_norm("vision_model.post_layernorm", f"{v}/ln_post/norm"),
      _transposed("visual_projection.weight", f"{v}/proj/dense/kernel"),
      _as_is("text_model.embeddings.token_embedding.weight", f"{t}/token_embedding/embedding", 2),
      _as_is("text_model.embeddings.position_embedding.weight", f"{t}/pos_embedding", 2),
      *_hf_tower("text_model", t, cfg.text.depth),
      *mapping.layer_norm("text_model.final_layer_norm", f"{t}/ln_final/norm"),
      _transposed("text_projection.weight", f"{t}/proj/dense/kernel"),
      _as_is("logit_scale", "params/logit_scale", 0),
  ]
  return mapping.Layout(entries=entries, ignored=list(IGNORED_HF))


def _openai_tower(src: str, dst: str, depth: int) -> list[mapping.Entry]:
  entries = []
  for i in range(depth):
    layer, block = f"{src}transformer.resblocks.{i}", f"{dst}/block_{i}"
    entries += mapping.layer_norm(f"{layer}.ln_1", f"{block}/ln_1/norm")
    entries += mapping.fused_qkv(f"{layer}.attn.in_proj", f"{block}/attn")
    entries += mapping.linear(f"{layer}.attn.out_proj", f"{block}/attn/out/dense")
    entries += mapping.layer_norm(f"{layer}.ln_2", f"{block}/ln_2/norm")
    entries += mapping.linear(f"{layer}.mlp.c_fc", f"{block}/fc1/dense")
    entries += mapping.linear(f"{layer}.mlp.c_proj", f"{block}/fc2/dense")
  return entries


def openai_layout(cfg: clip_model.ClipConfig) -> mapping.Layout:
  """The keys (canonical: `attn.in_proj.weight` for `attn.in_proj_weight`) of an OpenAI / open_clip
  ViT CLIP of `cfg` and where each goes."""
  v, t = "params/vision", "params/text"
  entries = [
      _patch_conv("visual.conv1.weight", f"{v}/patch_embed/kernel"),
      _as_is("visual.class_embedding", f"{v}/cls", 1),
      _as_is("visual.positional_embedding", f"{v}/pos_embedding", 2),
      *mapping.layer_norm("visual.ln_pre", f"{v}/ln_pre/norm"),
      *_openai_tower("visual.", v, cfg.vision.depth),
      *mapping.layer_norm("visual.ln_post", f"{v}/ln_post/norm"),
      _as_is("visual.proj", f"{v}/proj/dense/kernel", 2),
      _as_is("token_embedding.weight", f"{t}/token_embedding/embedding", 2),
      _as_is("positional_embedding", f"{t}/pos_embedding", 2),
      *_openai_tower("", t, cfg.text.depth),
      *mapping.layer_norm("ln_final", f"{t}/ln_final/norm"),
      _as_is("text_projection", f"{t}/proj/dense/kernel", 2),
      _as_is("logit_scale", "params/logit_scale", 0),
  ]
  return mapping.Layout(entries=entries, ignored=list(IGNORED_OPENAI))


def canonical_openai_key(key: str) -> str:
  """`...attn.in_proj_weight` / `_bias` -> `...attn.in_proj.weight` / `.bias` (the fused-qkv rule's names)."""
  return re.sub(r"\.in_proj_(weight|bias)$", r".in_proj.\1", key)


# ----------------------------------------------------------------------------- configs


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'hf' or 'openai' from the keys.

  Raises:
    ValueError: neither layout's marker keys, or a ResNet image tower, naming the first keys.
  """
  keys = set(state_dict)
  if "vision_model.embeddings.class_embedding" in keys or "text_model.embeddings.token_embedding.weight" in keys:
    return "hf"
  if "visual.attnpool.c_proj.weight" in keys or "visual.layer1.0.conv1.weight" in keys:
    raise ValueError("CLIP checkpoint has a ResNet image tower (visual.attnpool / visual.layerN): only ViT "
                     "CLIP models are supported")
  if "visual.class_embedding" in keys or "token_embedding.weight" in keys:
    return "openai"
  raise ValueError(f"not a CLIP checkpoint (neither Hugging Face CLIPModel nor OpenAI / open_clip keys); "
                   f"first keys: {sorted(keys)[:6]}")


def _depth(keys, prefix: str) -> int:
  indices = mapping.layer_indices(keys, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
  return indices[-1] + 1 if indices else 0


def _heads(width: int, given: Optional[int], what: str) -> int:
  if given:
    return int(given)
  if width % OPENAI_HEAD_WIDTH:
    raise ValueError(f"cannot infer the {what} attention heads: the weights do not store them and width "
                     f"{width} is not a multiple of {OPENAI_HEAD_WIDTH} (OpenAI's rule heads = width / 64); "
                     f"pass {what}_heads")
  return width // OPENAI_HEAD_WIDTH


def config_from_openai(state_dict: Mapping[str, np.ndarray], *, vision_heads: Optional[int] = None,
                       text_heads: Optional[int] = None, act: Optional[str] = None,
                       open_clip_config: Optional[Mapping] = None) -> tuple[clip_model.ClipConfig, list[str]]:
  """The ClipConfig of an OpenAI-layout state dict (canonical keys), and notes on what was assumed.

  Args:
    state_dict: the weights.
    vision_heads, text_heads: attention heads; default from `open_clip_config` or width / 64.
    act: 'quick_gelu' or 'gelu'; default from `open_clip_config` (its `quick_gelu` flag, which
      open_clip defaults to False) or, without one, 'quick_gelu' (OpenAI's models).
    open_clip_config: the `open_clip_config.json` dict of an open_clip model, when available.

  Raises:
    ValueError: a key the shapes are read from is missing, a non-square position grid, or heads
      that cannot be inferred.
  """
  needed = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
            "positional_embedding", "ln_final.weight", "text_projection")
  absent = [key for key in needed if key not in state_dict]
  if absent:
    raise ValueError(f"OpenAI / open_clip CLIP checkpoint lacks {absent}; cannot read its shapes")
  notes = []
  model_cfg = dict((open_clip_config or {}).get("model_cfg", open_clip_config or {}))
  vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
  keys = list(state_dict)
  width, _, patch, patch_w = state_dict["visual.conv1.weight"].shape
  if patch != patch_w:
    raise ValueError(f"visual.conv1.weight: non-square patches {state_dict['visual.conv1.weight'].shape}")
  positions = state_dict["visual.positional_embedding"].shape[0] - 1
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ValueError(f"visual.positional_embedding: {positions} patch positions are not a square grid")
  text_width = state_dict["ln_final.weight"].shape[0]
  if vision_heads is None and "head_width" in vision_cfg:
    vision_heads = width // int(vision_cfg["head_width"])
  if text_heads is None and "heads" in text_cfg:
    text_heads = int(text_cfg["heads"])
  if vision_heads is None or text_heads is None:
    notes.append("attention heads are not stored in the weights: width / 64 assumed (OpenAI's rule)")
  if act is None:
    if open_clip_config is not None:
      act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
      notes.append(f"activation {act} from open_clip_config.json")
    else:
      act = "quick_gelu"
      notes.append("activation quick_gelu assumed (OpenAI's models; open_clip's LAION models need act='gelu')")
  fc1 = "visual.transformer.resblocks.0.mlp.c_fc.weight"
  text_fc1 = "transformer.resblocks.0.mlp.c_fc.weight"
  vision = clip_model.ClipVisionConfig(
      image_size=int(grid * patch), patch_size=int(patch), width=int(width), depth=_depth(keys, "visual."),
      num_heads=_heads(int(width), vision_heads, "vision"),
      mlp_dim=int(state_dict[fc1].shape[0]) if fc1 in state_dict else 4 * int(width), act=act)
  text = clip_model.ClipTextConfig(
      vocab_size=int(state_dict["token_embedding.weight"].shape[0]),
      context_length=int(state_dict["positional_embedding"].shape[0]), width=int(text_width),
      depth=_depth(keys, ""), num_heads=_heads(int(text_width), text_heads, "text"),
      mlp_dim=int(state_dict[text_fc1].shape[0]) if text_fc1 in state_dict else 4 * int(text_width), act=act,
      text_pool="argmax", eos_token_id=int(state_dict["token_embedding.weight"].shape[0]) - 1,
      bos_token_id=int(state_dict["token_embedding.weight"].shape[0]) - 2)
  return clip_model.ClipConfig(vision=vision, text=text, embed_dim=int(state_dict["text_projection"].shape[1])), notes


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class ClipConversionReport:
  """What happened to every key (source names as in the file; missing keys canonically).

  Attributes:
    layout: 'hf' or 'openai'.
    converted: source key -> the param leaves it became.
    ignored: source key -> why it is dropped (buffers).
    unmapped: source key -> why it could not be converted.
    missing: expected keys absent from the source.
    not_converted: params of `CLIP(config)` that nothing filled.
    notes: what was assumed (heads, activation).
  """
  layout: str
  converted: dict[str, list[str]]
  ignored: dict[str, str]
  unmapped: dict[str, str]
  missing: list[str]
  not_converted: list[str]
  notes: list[str]

  def failures(self) -> list[str]:
    problems = []
    if self.unmapped:
      problems.append(f"{len(self.unmapped)} unmapped key(s)")
    if self.missing or self.not_converted:
      problems.append(f"{len(self.missing)} missing key(s), {len(self.not_converted)} param(s) not filled")
    return problems

  def table(self) -> str:
    lines = [f"CLIP ({self.layout} layout): {len(self.converted)} converted, {len(self.ignored)} ignored, "
             f"{len(self.unmapped)} unmapped, {len(self.missing)} missing"]
    lines += [f"note          {note}" for note in self.notes]
    lines += [f"unmapped      {key}  ({reason})" for key, reason in sorted(self.unmapped.items())]
    lines += [f"missing       {key}" for key in self.missing]
    lines += [f"not-filled    {path}" for path in self.not_converted]
    lines += [f"ignored       {key}  ({reason})" for key, reason in sorted(self.ignored.items())]
    return "\n".join(lines)


def convert_state_dict(state_dict: Mapping[str, Any], config: Optional[clip_model.ClipConfig] = None, *,
                       layout: Optional[str] = None, vision_heads: Optional[int] = None,
                       text_heads: Optional[int] = None, act: Optional[str] = None,
                       open_clip_config: Optional[Mapping] = None
                       ) -> tuple[clip_model.ClipConfig, dict, ClipConversionReport]:
  """A CLIP state dict -> (config, nested float32 params of `CLIP(config)`, report).

  Args:
    state_dict: key -> NumPy array or torch tensor (a `{'state_dict': ...}` / `{'model': ...}`
      wrapper and a DDP `module.` prefix are removed).
    config: the model (required for 'hf', whose heads and activation live in config.json; read
      from the shapes for 'openai' when None).
    layout: 'hf' / 'openai' (default: `detect_layout`).
    vision_heads, text_heads, act, open_clip_config: see `config_from_openai`.

  Raises:
    ValueError: unknown layout, a converted leaf whose shape differs from the model's (naming
      both), or a config that cannot be read.
  """
  arrays = torch_io.as_numpy_state_dict(torch_io.unwrap_state_dict(state_dict, "CLIP state dict"))
  layout = layout or detect_layout(arrays)
  notes = []
  if layout == "hf":
    if config is None:
      raise ValueError("a Hugging Face CLIP state dict needs its config (config.json)")
    sd, origin = mapping.canonicalize(arrays, lambda k: k)
    plan = hf_layout(config)
  elif layout == "openai":
    sd, origin = mapping.canonicalize(arrays, canonical_openai_key)
    if config is None:
      config, notes = config_from_openai(sd, vision_heads=vision_heads, text_heads=text_heads, act=act,
                                         open_clip_config=open_clip_config)
    plan = openai_layout(config)
  else:
    raise ValueError(f"unknown CLIP layout {layout!r}; known: {LAYOUTS}")
  result = mapping.apply_layout(plan, sd)
  shapes = clip_model.param_shapes(config)
  params = {}
  for path, value in result.leaves.items():
    path = path[len("params/"):]
    if path not in shapes:
      result.unmapped[next(k for k, paths in result.mapping.items() if f"params/{path}" in paths)] = (
          f"no param {path!r} in the model")
      continue
    if tuple(value.shape) != shapes[path]:
      source = next(k for k, paths in result.mapping.items() if f"params/{path}" in paths)
      raise ValueError(f"CLIP checkpoint key {origin[source]!r} gives {path!r} shape {tuple(value.shape)}, "
                       f"but the model (from the config) expects {shapes[path]}")
    params[path] = value
  report = ClipConversionReport(
      layout=layout,
      converted={origin[key]: paths for key, paths in result.mapping.items()},
      ignored={origin[key]: reason for key, reason in result.ignored.items()},
      unmapped={origin.get(key, key): reason for key, reason in result.unmapped.items()},
      missing=list(result.missing), not_converted=sorted(set(shapes) - set(params)), notes=notes)
  return config, traverse_util.unflatten_dict(params, sep="/"), report


# ----------------------------------------------------------------------------- files


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The state dict of a CLIP file or Hugging Face directory (float32 NumPy arrays).

  Besides `torch_io.read_state_dict`'s formats: sharded safetensors (`model.safetensors.index.json`)
  and TorchScript archives (OpenAI's released `.pt` files; only with `trust_pickle`, since loading
  one runs its code).

  Raises:
    FileNotFoundError; ValueError (a TorchScript archive without `trust_pickle`, an unknown format).
  """
  path = os.fspath(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(index):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    arrays = {}
    for shard in shards:
      arrays.update(load_file(os.path.join(path, shard)))
    return torch_io.as_numpy_state_dict(arrays)
  if os.path.isfile(path) and path.endswith(torch_io.TORCH_SUFFIXES) and _is_torchscript(path):
    if not trust_pickle:
      raise ValueError(f"{path} is a TorchScript archive (OpenAI's released CLIP files are); loading it runs "
                       "its code: pass --trust_pickle (trust_pickle=True) if you trust the file")
    torch = torch_io._import_torch(path)  # pylint: disable=protected-access
    state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    return torch_io.as_numpy_state_dict(state_dict)
  return torch_io.read_state_dict(path, trust_pickle=trust_pickle)


def load_clip(path: str, *, trust_pickle: bool = False, vision_heads: Optional[int] = None,
              text_heads: Optional[int] = None, act: Optional[str] = None
              ) -> tuple[clip_model.ClipConfig, dict]:
  """Reads a CLIP checkpoint and returns (config, params) for `vlpjax.models.clip.CLIP`.

  Args:
    path: a Hugging Face CLIPModel directory (config.json + weights), or an OpenAI / open_clip
      weights file (an `open_clip_config.json` next to it is read when present).
    trust_pickle: allow torch pickles / TorchScript archives that need full unpickling.
    vision_heads, text_heads, act: OpenAI layout only; see `config_from_openai`.

  Raises:
    ConversionError: keys without a rule, or params the checkpoint does not fill (the message
      holds the per-key report).
    ValueError / FileNotFoundError: an unreadable file or config, naming it.
  """
  path = os.fspath(path)
  state_dict = read_checkpoint(path, trust_pickle)
  layout = detect_layout(state_dict)
  config, open_clip_config = None, None
  if layout == "hf":
    hf_config = torch_io.read_json_beside(path)
    if hf_config is None:
      raise ValueError(f"{path}: a Hugging Face CLIP checkpoint needs its config.json beside it")
    config = clip_model.config_from_hf(hf_config, where=os.path.join(
        path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), "config.json"))
  else:
    open_clip_config = torch_io.read_json_beside(path, "open_clip_config.json")
  config, params, report = convert_state_dict(state_dict, config, layout=layout, vision_heads=vision_heads,
                                              text_heads=text_heads, act=act, open_clip_config=open_clip_config)
  problems = report.failures()
  if problems:
    raise ConversionError(f"{path}: " + "; ".join(problems) + "\n" + report.table())
  return config, params
