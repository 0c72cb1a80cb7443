"""Objectives, one pure loss function per module, registered by name.

Importing this package registers every objective (pretraining and task losses); look them up
with `registry.get(name)`.
"""
import importlib

from vlpjax.objectives import itc, itm, mim, mlm, mrm  # noqa: F401  (registration)
from vlpjax.objectives import hitc, mae  # noqa: F401  (registration; ViCHA)
from vlpjax.objectives import cmc, cmcl, gallery, mixed_mlm, tag_contrast, tag_match, tag_mlm  # noqa: F401  (VLMixer)
from vlpjax.objectives import mcr, vsc, wpg  # noqa: F401  (MVP)
from vlpjax.objectives.registry import get, names, register

# Task (finetuning) objectives; optional modules register themselves when present.
for _name in ("vqa", "classify"):
  try:
    importlib.import_module(f"vlpjax.objectives.{_name}")
  except ModuleNotFoundError as _e:
    if _e.name != f"vlpjax.objectives.{_name}":
      raise

__all__ = ["get", "names", "register"]
