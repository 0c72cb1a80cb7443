r"""Converts a checkpoint into vlpjax params (see docs/checkpoints.md).

  python -m vlpjax.convert --source=albef --input=ALBEF_4M.pth --output=/ckpt/albef_4m \
    [--config=configs/albef.py[:ARG]] [--config.model.x.y=V ...] [--image_res=384] \
    [--allow_unmapped] [--allow_missing]

The target model: `--config=FILE[:ARG]` (its `model`, with `--config.model.*` overrides, as in
`vlpjax.main` and `vlpjax.evaluate`; `--model_config=FILE[:ARG]` is the older name of the same)
is checked against the converted shapes. Without a config file the dims come from the checkpoint
(shapes, an HF config.json beside it, the BERT config an ALBEF / ViCHA file's stored config
names), and `--config.model.*` overrides complete them: head counts are not in the weights, so
e.g. `--config.model.text.num_heads=12` where nothing in or beside the file says it. Nothing is
guessed: a value nothing determines fails the command, naming the flag to set.

Writes DIR/params (and DIR/ema_params, DIR/queues.npz when the source has them) and
DIR/conversion.json, then prints the key report. Exits non-zero, writing nothing, when keys are
unmapped or missing and that was not allowed, or a head count is unknown.
"""
import os
import sys

from absl import app, flags, logging

from vlpjax import config_lib
from vlpjax.convert import importer

_SOURCE = flags.DEFINE_enum("source", None, list(importer.SOURCES), "Checkpoint layout.")
_INPUT = flags.DEFINE_string("input", None, ".safetensors / .bin / .pth file, or an HF model folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_IMAGE_RES = flags.DEFINE_integer("image_res", 0, "Resample position embeddings to this resolution "
                                  "(0: the model config's, else the checkpoint's).")
# The default holds no model: only `--config.model.*` overrides (new keys are accepted there and
# checked by the model config, which names an unknown one).
NO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_config.py")
_CONFIG = config_lib.define_config_flag(
    "config", NO_CONFIG,
    "Target config `configs/albef.py[:ARG]`: its `model` is checked against the converted shapes. "
    "`--config.model.a.b=V` overrides it, or, without a config file, sets fields the checkpoint "
    "does not hold (e.g. --config.model.text.num_heads=12).",
    lock_config=False, accept_new_attributes=True)
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "Older name of --config=FILE[:ARG] (the "
                                    "`--config.model.*` overrides apply to it too).")
_FUSION_FROM_BERT = flags.DEFINE_bool("fusion_from_bert", None, "hf_bert: fill fusion self-attention/FFN "
                                      "from the BERT layers after the text layers (default: when the "
                                      "model config has fusion layers).")
_ALLOW_UNMAPPED = flags.DEFINE_bool("allow_unmapped", False, "Drop source keys that map to nothing.")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False, "Accept expected keys that are absent.")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "Load torch pickles with weights_only=False "
                                  "(only for files you trust).")
flags.mark_flags_as_required(["source", "input", "output"])


def _prune(tree: dict) -> dict:
  """`tree` without empty sub-dicts (the default config's empty towers)."""
  out = {}
  for key, value in tree.items():
    value = _prune(value) if isinstance(value, dict) else value
    if value != {}:
      out[key] = value
  return out


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def target_from_flags():
  """(model_config, model_overrides) for `importer.convert_checkpoint` from the flags."""
  return resolve_target(_CONFIG.value, flags.FLAGS["config"].present, _MODEL_CONFIG.value)


def resolve_target(config, config_file_given: bool, model_config_spec: str = ""):
  """(model_config, model_overrides) for `importer.convert_checkpoint`.

  Args:
    config: the --config flag's value: a config file's config with its overrides applied, or
      (no file) `no_config.py`'s with the `--config.model.*` overrides added.
    config_file_given: whether --config=FILE was on the command line.
    model_config_spec: the --model_config value ("" when absent).

  Returns:
    (the file's `model` with the overrides, None), or (None, the overrides as a nested dict or
    None) without a config file.

  Raises:
    app.UsageError: both --config=FILE and --model_config, an override outside config.model, or
      one naming a field the --model_config file's model lacks.
  """
  if config_file_given and model_config_spec:
    raise app.UsageError("give the config file once: --config=FILE[:ARG] or --model_config=FILE[:ARG]")
  if config_file_given:
    return config.model, None
  overrides = _prune(config.to_dict())
  outside = sorted(set(overrides) - {"model"})
  if outside:
    raise app.UsageError(f"convert reads only --config.model.* overrides; got --config.{outside[0]}...")
  overrides = overrides.get("model", {})
  if not model_config_spec:
    return None, overrides or None
  model = config_lib.load_config(model_config_spec).model
  for name, value in _flatten(overrides).items():
    *parents, leaf = name.split(".")
    node = model
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if not hasattr(node, "get") or leaf not in node:
      raise app.UsageError(f"--config.model.{name}: the model of {model_config_spec} has no field {name!r}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise app.UsageError(f"--config.model.{name}={value!r}: {e}") from None
  return model, None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  try:
    model_config, model_overrides = target_from_flags()
    report = importer.convert_checkpoint(
        _SOURCE.value, _INPUT.value, _OUTPUT.value, model_config=model_config,
        model_overrides=model_overrides, image_res=_IMAGE_RES.value or None,
        fusion_from_bert=_FUSION_FROM_BERT.value, allow_unmapped=_ALLOW_UNMAPPED.value,
        allow_missing=_ALLOW_MISSING.value, trust_pickle=_TRUST_PICKLE.value)
  except (ValueError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
    sys.exit(f"error: {e}")
  print(report.table())
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  from vlpjax import cli
  cli.run(main)
