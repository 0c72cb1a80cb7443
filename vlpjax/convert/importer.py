"""Checkpoint import: a state dict (or a file) -> vlpjax params, EMA params, queues, and a report.

`convert_state_dict` is the pure part; `convert_checkpoint` reads a file, refuses to write when
keys are unmapped or missing (unless allowed), and writes

  DIR/params          Orbax params (`vlpjax.checkpoint.load_params(DIR)` reads it), in the layer
                      layout of the target config (stacked with `config.model.scan_layers`,
                      `vlpjax.models.layout`; either layout restores into either model)
  DIR/ema_params      Orbax EMA (momentum) params, when the source has or implies them
  DIR/queues.npz      image [Q, E], text [Q, E], idx [Q] int32, ptr int32, when the source has queues
  DIR/conversion.json source, the per-key report, the model config read from the shapes
"""
import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vlpjax import checkpoint
from vlpjax.convert import albef, bert, mapping, mvp, torch_io, vit
from vlpjax.models import layout, vlp

PLANNERS = {
    "hf_bert": bert.plan_hf_bert,
    "hf_vit": vit.plan_hf_vit,
    "timm_vit": vit.plan_timm_vit,
    "albef": albef.plan_albef,
    "vicha": albef.plan_vicha,
    "mvp": mvp.plan_mvp,
}
SOURCES = tuple(PLANNERS)
# Stand-ins for the tower a single-tower source does not describe; only its own subtrees are checked.
_PLACEHOLDER_VISION = dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=1, mlp_ratio=1.0)
_PLACEHOLDER_TEXT = dict(vocab_size=8, width=32, num_heads=1, mlp_dim=32, text_layers=1, fusion_layers=0,
                         max_positions=8)


class ConversionError(ValueError):
  """A conversion left keys unmapped or missing (the message holds the report table)."""


@dataclasses.dataclass
class ConversionReport:
  """What happened to every key. Source keys are named as in the file; missing keys canonically.

  Attributes:
    source: the importer (`albef`, `hf_bert`, ...).
    converted: source key -> the leaves it became ('params/...', 'ema_params/...', 'queues/...').
    tied: source key -> the key it repeats (BERT's MLM decoder = word embedding).
    ignored: source key -> why it is dropped on purpose (buffers, poolers, classifiers).
    unmapped: source key -> why it could not be converted.
    missing: expected keys (canonical names) absent from the source.
    not_in_model: converted params/ leaves under a subtree of the target model that the model
      lacks (e.g. ALBEF cross-attention into a `merged` fusion); counted as unmapped.
    not_converted: leaves of the target model, in the source's subtrees, that nothing filled:
      they keep their initialisation at `init_from` (e.g. fusion cross-attention from HF BERT).
    extra_subtrees: top-level params subtrees the target model does not have (ViCHA's parts), kept.
    ema: 'checkpoint', 'synthesised' (EMA = online) or 'none'.
    notes: resampling and other non-renaming steps.
    model_config: the target's ModelConfig fields, or those read from the shapes (and a stored
      or HF config, and `model_overrides`); fields nothing determines are None.
    queues: the converted ITC queues (arrays; not part of `to_json`), or None.
    undetermined: `model.<tower>.num_heads` fields that neither the target, the overrides nor a
      config in or beside the checkpoint give (head counts are not in the weights' shapes).
  """
  source: str
  converted: dict[str, list[str]]
  tied: dict[str, str]
  ignored: dict[str, str]
  unmapped: dict[str, str]
  missing: list[str]
  not_in_model: list[str]
  not_converted: list[str]
  extra_subtrees: list[str]
  ema: str
  notes: list[str]
  model_config: dict
  queues: dict | None = dataclasses.field(default=None, repr=False)
  undetermined: list[str] = dataclasses.field(default_factory=list)

  def failures(self, allow_unmapped: bool = False, allow_missing: bool = False) -> list[str]:
    """Why the conversion should not be used as is (empty when it is clean or allowed)."""
    problems = []
    if not allow_unmapped and (self.unmapped or self.not_in_model):
      problems.append(f"{len(self.unmapped) + len(self.not_in_model)} unmapped key(s) or leaf(s) "
                      "(pass --allow_unmapped to drop them)")
    if not allow_missing and self.missing:
      problems.append(f"{len(self.missing)} missing key(s) (pass --allow_missing to keep those "
                      "params at their initialisation)")
    if self.undetermined:
      problems.append(f"{', '.join(self.undetermined)}: not stored in the checkpoint (head counts "
                      "are not in the weights' shapes); pass --config=FILE[:ARG] with the model's "
                      "config, or " + " ".join(f"--config.{name}=N" for name in self.undetermined))
    return problems

  def table(self) -> str:
    """A text report: counts, notes, then one row per key that was not a plain conversion."""
    lines = [f"source {self.source}: {len(self.converted)} converted, {len(self.tied)} tied, "
             f"{len(self.ignored)} ignored, {len(self.unmapped)} unmapped, {len(self.missing)} missing, "
             f"{len(self.not_in_model)} not in model, {len(self.not_converted)} model leaves not converted; "
             f"EMA: {self.ema}"]
    lines += [f"note          {note}" for note in self.notes]
    lines += [f"undetermined  config.{name}" for name in self.undetermined]
    lines += [f"unmapped      {key}  ({reason})" for key, reason in sorted(self.unmapped.items())]
    lines += [f"not-in-model  {path}" for path in self.not_in_model]
    lines += [f"missing       {key}" for key in self.missing]
    lines += [f"ignored       {key}  ({reason})" for key, reason in sorted(self.ignored.items())]
    lines += [f"tied          {key} = {other}" for key, other in sorted(self.tied.items())]
    lines += [f"initialised   {path}" for path in self.not_converted]
    lines += [f"extra         {name}/ (not in the target model; kept)" for name in self.extra_subtrees]
    return "\n".join(lines)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out.pop("queues")
    out["queue_shapes"] = ({name: list(np.shape(value)) for name, value in self.queues.items()}
                           if self.queues else None)
    return out


def as_model_config(model_config) -> vlp.ModelConfig | None:
  """A ModelConfig from a ModelConfig, a `config.model` ConfigDict / dict, or None."""
  if model_config is None or isinstance(model_config, vlp.ModelConfig):
    return model_config
  return vlp.build_config(model_config)


def complete_model_config(partial: Mapping[str, Any]) -> vlp.ModelConfig:
  """A ModelConfig from the fields an importer read; absent towers get tiny stand-ins."""
  fields = dict(partial)
  fields.setdefault("vision", _PLACEHOLDER_VISION)
  fields.setdefault("text", _PLACEHOLDER_TEXT)
  return vlp.build_config(fields)


def merge_fields(fields: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
  """`fields` with `overrides` merged in, nested dicts key by key (`{'text': {'num_heads': 4}}`)."""
  out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in fields.items()}
  for key, value in (overrides or {}).items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = merge_fields(out[key], value)
    else:
      out[key] = dict(value) if isinstance(value, Mapping) else value
  return out


def undetermined_fields(fields: Mapping[str, Any]) -> list[str]:
  """`model.<tower>.num_heads` names whose value is None (not read, not given)."""
  return [f"model.{tower}.num_heads" for tower in ("vision", "text")
          if isinstance(fields.get(tower), Mapping) and fields[tower].get("num_heads") is None]


def model_param_shapes(cfg: vlp.ModelConfig) -> dict[str, tuple[int, ...]]:
  """'/'-joined param path -> shape of the model of `cfg` (`VLPModel` or the task model whose
  config class it is), without allocating any parameter."""
  # Importers map onto the unrolled (interchange) layout; `convert_checkpoint` stacks it after.
  model = vlp.model_for_config(dataclasses.replace(cfg, scan_layers=False))
  inputs = vlp.init_inputs(cfg, batch_size=1, text_len=2)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(lambda: model.init({"params": rng, "dropout": rng}, *inputs))
  flat = traverse_util.flatten_dict(nn.unbox(variables["params"]), sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_against_model(params: Mapping[str, np.ndarray], cfg: vlp.ModelConfig,
                        scope: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
  """Compares flat converted params with the params of `VLPModel(cfg)`.

  Returns:
    (not_in_model, not_converted, extra_subtrees); see `ConversionReport`.

  Raises:
    ValueError: a converted leaf whose shape differs from the model's, naming both shapes.
  """
  shapes = model_param_shapes(cfg)
  model_subtrees = {path.split("/")[0] for path in shapes}
  not_in_model, extra = [], set()
  for path, value in sorted(params.items()):
    top = path.split("/")[0]
    if top not in model_subtrees:
      extra.add(top)
    elif path not in shapes:
      not_in_model.append(path)
    elif tuple(np.shape(value)) != shapes[path]:
      raise ValueError(f"converted leaf {path!r} has shape {tuple(np.shape(value))} but the model "
                       f"expects {shapes[path]}; check --config (or --image_res)")
  not_converted = [path for path in sorted(shapes) if path.split("/")[0] in scope and path not in params]
  return not_in_model, not_converted, sorted(extra)


def _split_roots(leaves: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  roots = {"params": {}, "ema_params": {}, "queues": {}}
  for path, value in leaves.items():
    root, _, rest = path.partition("/")
    roots[root][rest] = value
  return roots


def convert_state_dict(source: str, state_dict: Mapping[str, Any], model_config=None, *,
                       image_res: int | None = None, fusion_from_bert: bool | None = None,
                       hints: Mapping | None = None, model_overrides: Mapping | None = None
                       ) -> tuple[dict, dict | None, ConversionReport]:
  """Converts a PyTorch / Hugging Face state dict into vlpjax params.

  Args:
    source: one of `SOURCES`.
    state_dict: key -> array (NumPy, or CPU torch tensors); ALBEF's `{'model': sd}` wrapper is
      accepted.
    model_config: the target (`ModelConfig`, or a `config.model` ConfigDict); None reads it from
      the shapes. With a target, leaf shapes are checked and its resolution and layer split apply.
    image_res: resample position embeddings to this resolution (default: the target's, else
      the checkpoint's).
    fusion_from_bert: hf_bert only; fill fusion self-attention / FFN from the BERT layers after
      the text layers (default: when the target has fusion layers).
    hints: an HF `config.json` dict (attention heads, LayerNorm eps), or for ALBEF / ViCHA the
      BERT config their stored training config names, when one is available.
    model_overrides: without `model_config`, `config.model` fields (nested dict) that replace or
      complete those read from the checkpoint, e.g. `{'text': {'num_heads': 4}}`.

  Returns:
    (params, ema_params, report): nested dicts of float32 arrays (ema_params is None for sources
    without momentum weights; for ALBEF / ViCHA files without `_m` keys it repeats params); the
    ITC queues are in `report.queues`.

  Fields nothing determines (head counts without a config) are None in `report.model_config`
  and listed in `report.undetermined`, which makes `report.failures()` non-empty.

  Raises:
    ValueError: an unknown source, an `image_res` that disagrees with the target, two keys for
      one parameter, a shape the target model does not accept, or an unknown override key.
  """
  if source not in PLANNERS:
    raise ValueError(f"unknown --source {source!r}; known: {list(SOURCES)}")
  if model_overrides and model_config is not None:
    raise ValueError("model_overrides complete the fields read from the checkpoint; with a "
                     "model_config, set the fields in it instead")
  target = as_model_config(model_config)
  has_vision = source != "hf_bert"
  if image_res and target is not None and has_vision and image_res != target.vision.image_size:
    raise ValueError(f"--image_res={image_res} disagrees with the model config's "
                     f"vision.image_size={target.vision.image_size}")
  if has_vision and target is not None:
    image_res = target.vision.image_size
  arrays = torch_io.as_numpy_state_dict(torch_io.unwrap_state_dict(state_dict, "state_dict"))
  plan = PLANNERS[source](arrays, target, image_res=image_res or None,
                          fusion_from_bert=fusion_from_bert, hints=hints)
  result = mapping.apply_layout(plan.layout, plan.state_dict)
  roots = _split_roots(result.leaves)
  params = roots["params"]
  if plan.momentum == "checkpoint":
    for path, value in roots["ema_params"].items():
      if path in params and value.shape != params[path].shape:
        raise ValueError(f"momentum leaf {path!r} has shape {value.shape} but the online one "
                         f"{params[path].shape}")
    ema = {**params, **roots["ema_params"]}
  elif plan.momentum == "synthesised":
    ema = dict(params)
  else:
    ema = None
  queues = roots["queues"] or None
  if queues is not None and "idx" not in queues and "image" in queues:
    queues["idx"] = np.full((queues["image"].shape[0],), -1, np.int32)

  if target is None:
    fields = merge_fields(plan.model_config, model_overrides)
    undetermined = undetermined_fields(fields)
    # Head counts do not change any parameter shape: 1 stands in for the shape check only.
    check_config = complete_model_config(merge_fields(
        fields, {name.split(".")[1]: {"num_heads": 1} for name in undetermined}))
  else:
    fields, undetermined, check_config = dataclasses.asdict(target), [], target
  not_in_model, not_converted, extra = check_against_model(params, check_config, plan.scope)
  original = plan.origin
  report = ConversionReport(
      source=source,
      converted={original[key]: paths for key, paths in result.mapping.items()},
      tied={original[key]: original.get(other, other) for key, other in result.tied.items()},
      ignored={original[key]: reason for key, reason in result.ignored.items()},
      unmapped={original[key]: reason for key, reason in result.unmapped.items()},
      missing=list(result.missing), not_in_model=not_in_model, not_converted=not_converted,
      extra_subtrees=extra, ema=plan.momentum, notes=list(plan.notes), model_config=fields,
      queues=queues, undetermined=undetermined)
  ema_tree = traverse_util.unflatten_dict(ema, sep="/") if ema is not None else None
  return traverse_util.unflatten_dict(params, sep="/"), ema_tree, report


def write_outputs(directory: str, params: dict, ema_params: dict | None, report: ConversionReport,
                  extra_json: Mapping[str, Any] | None = None) -> None:
  """Writes DIR/params, DIR/ema_params, DIR/queues.npz and DIR/conversion.json (see module doc)."""
  os.makedirs(directory, exist_ok=True)
  checkpoint.export_params(params, os.path.join(directory, "params"))
  if ema_params is not None:
    checkpoint.export_params(ema_params, os.path.join(directory, "ema_params"))
  if report.queues:
    np.savez(os.path.join(directory, "queues.npz"), **report.queues)
  with open(os.path.join(directory, "conversion.json"), "w") as f:
    json.dump({**(extra_json or {}), **report.to_json()}, f, indent=1)


def convert_checkpoint(source: str, input_path: str, output_dir: str, *, model_config=None,
                       model_overrides: Mapping | None = None,
                       image_res: int | None = None, fusion_from_bert: bool | None = None,
                       allow_unmapped: bool = False, allow_missing: bool = False,
                       trust_pickle: bool = False) -> ConversionReport:
  """Reads `input_path`, converts it, and writes `output_dir` (see module doc).

  Head counts come from `model_config`, `model_overrides`, an HF `config.json` beside the file
  (hf_bert, hf_vit) or the BERT config an ALBEF / ViCHA file's stored training config names
  (text only); never from a guess.

  Raises:
    ConversionError: unmapped or missing keys that were not allowed, or a head count nothing
      determines (naming the `--config.model...` flag to set); nothing is written.
  """
  state_dict, stored_config = torch_io.read_checkpoint(input_path, trust_pickle=trust_pickle)
  notes = []
  if source in ("hf_bert", "hf_vit", "mvp"):
    hints = torch_io.read_json_beside(input_path)
  elif source in ("albef", "vicha"):
    hints, notes = albef.stored_config_hints(stored_config, input_path)
  else:
    hints = None
  params, ema_params, report = convert_state_dict(
      source, state_dict, model_config, image_res=image_res, fusion_from_bert=fusion_from_bert, hints=hints,
      model_overrides=model_overrides)
  if model_config is None:
    report.notes += notes
  problems = report.failures(allow_unmapped, allow_missing)
  if problems:
    raise ConversionError(f"{input_path}: " + "; ".join(problems) + "\n" + report.table())
  if getattr(as_model_config(model_config), "scan_layers", False):   # the layout the target model uses
    params = layout.stack(params)
    ema_params = layout.stack(ema_params) if ema_params is not None else None
  write_outputs(output_dir, params, ema_params, report,
                extra_json=dict(input=os.path.abspath(input_path), image_res=image_res))
  return report
