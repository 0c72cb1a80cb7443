r"""Converts a checkpoint into vlpjax params (see docs/checkpoints.md).

  python -m vlpjax.convert --source=albef --input=ALBEF_4M.pth --output=/ckpt/albef_4m \
    [--image_res=384] [--model_config=configs/albef.py] [--allow_unmapped] [--allow_missing]

Writes DIR/params (and DIR/ema_params, DIR/queues.npz when the source has them) and
DIR/conversion.json, then prints the key report. Exits non-zero, writing nothing, when keys are
unmapped or missing and that was not allowed.
"""
import sys

from absl import app, flags, logging

from vlpjax import config_lib
from vlpjax.convert import importer

_SOURCE = flags.DEFINE_enum("source", None, list(importer.SOURCES), "Checkpoint layout.")
_INPUT = flags.DEFINE_string("input", None, ".safetensors / .bin / .pth file, or an HF model folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_IMAGE_RES = flags.DEFINE_integer("image_res", 0, "Resample position embeddings to this resolution "
                                  "(0: the model config's, else the checkpoint's).")
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "Target config, `configs/albef.py[:ARG]`: its "
                                    "`model` is checked against the converted shapes.")
_FUSION_FROM_BERT = flags.DEFINE_bool("fusion_from_bert", None, "hf_bert: fill fusion self-attention/FFN "
                                      "from the BERT layers after the text layers (default: when the "
                                      "model config has fusion layers).")
_ALLOW_UNMAPPED = flags.DEFINE_bool("allow_unmapped", False, "Drop source keys that map to nothing.")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False, "Accept expected keys that are absent.")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "Load torch pickles with weights_only=False "
                                  "(only for files you trust).")
flags.mark_flags_as_required(["source", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  try:
    model_config = config_lib.load_config(_MODEL_CONFIG.value).model if _MODEL_CONFIG.value else None
    report = importer.convert_checkpoint(
        _SOURCE.value, _INPUT.value, _OUTPUT.value, model_config=model_config,
        image_res=_IMAGE_RES.value or None, fusion_from_bert=_FUSION_FROM_BERT.value,
        allow_unmapped=_ALLOW_UNMAPPED.value, allow_missing=_ALLOW_MISSING.value,
        trust_pickle=_TRUST_PICKLE.value)
  except (ValueError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
    sys.exit(f"error: {e}")
  print(report.table())
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
