"""Checkpoint importers: ALBEF / ViCHA PyTorch checkpoints, HF BERT, HF ViT, timm ViT -> vlpjax.

Command line: `python -m vlpjax.convert --source=albef --input=ALBEF_4M.pth --output=DIR`
(see docs/checkpoints.md). Python:

  params, ema_params, report = convert_state_dict("hf_bert", state_dict, model_config)
"""
from vlpjax.convert.importer import (SOURCES, ConversionError, ConversionReport, convert_checkpoint,
                                     convert_state_dict, write_outputs)
from vlpjax.convert.torch_io import read_state_dict

__all__ = ["SOURCES", "ConversionError", "ConversionReport", "convert_checkpoint", "convert_state_dict",
           "read_state_dict", "write_outputs"]
