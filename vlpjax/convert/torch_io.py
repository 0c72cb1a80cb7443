"""Reading checkpoints into flat `{key: np.ndarray}` dicts.

`.safetensors` files are read with NumPy alone. PyTorch pickles (`.bin`, `.pth`, `.pt`) need torch,
an optional dependency: `pip install 'vlpjax[convert]'` (or `pip install torch==2.13.0`).
"""
import json
import os
import pickle
from typing import Any, Mapping

import numpy as np

TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Training scripts wrap the weights: ALBEF / ViCHA / DeiT save {'model': state_dict, 'optimizer':
# ..., ...}; Lightning-style files use 'state_dict'.
_WRAPPER_KEYS = ("model", "state_dict")


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"reading {path} needs PyTorch, which is not installed: run "
        "`pip install 'vlpjax[convert]'` (or `pip install torch==2.13.0`), or save the state "
        "dict as .safetensors first") from None
  return torch


def unwrap_state_dict(obj: Any, where: str) -> Mapping[str, Any]:
  """The state dict inside a checkpoint object: bare, or under 'model' / 'state_dict'.

  A DistributedDataParallel 'module.' prefix on every key is removed.

  Raises:
    ValueError: `obj` is not a mapping (`where` names the file in the message).
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where}: expected a state dict (a mapping of names to tensors), "
                     f"got {type(obj).__name__}")
  for key in _WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if obj and all(key.startswith("module.") for key in obj):
    return {key[len("module."):]: value for key, value in obj.items()}
  return obj


def as_numpy(value: Any, key: str) -> np.ndarray:
  """A NumPy array from a NumPy array or a torch tensor; floating values become float32.

  Raises:
    ValueError: `value` is neither (e.g. an optimizer-state dict), naming `key`.
  """
  if hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # a torch tensor
    tensor = value.detach().cpu()
    value = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
  elif not isinstance(value, (np.ndarray, np.generic)):
    raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not an array or tensor")
  value = np.asarray(value)
  return value.astype(np.float32) if value.dtype.kind == "f" and value.dtype != np.float32 else value


def as_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {key: as_numpy(value, key) for key, value in state_dict.items()}


def read_checkpoint(path: str, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict | None]:
  """`read_state_dict`, plus the training config stored beside the weights, if any.

  ALBEF / ViCHA save `{'model': state_dict, 'optimizer': ..., 'lr_scheduler': ..., 'config':
  <their YAML config as a dict>, 'epoch': ...}`; the second value is that `config` (None when
  the file has none, and for .safetensors).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        return read_checkpoint(os.path.join(path, name), trust_pickle)
    raise FileNotFoundError(f"{path}: directory has no model.safetensors or pytorch_model.bin")
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    obj = load_file(path)
  elif path.endswith(TORCH_SUFFIXES):
    torch = _import_torch(path)
    try:
      obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: torch refused to load it with weights_only=True ({e}). If you "
                       "trust the file, pass --trust_pickle") from None
  else:
    raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors or one of {TORCH_SUFFIXES}")
  stored = obj.get("config") if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else None
  state_dict = unwrap_state_dict(obj, path)
  try:
    arrays = as_numpy_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return arrays, (dict(stored) if isinstance(stored, Mapping) else None)


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into `{key: np.ndarray}` (floating tensors as float32).

  Args:
    path: a `.safetensors` file, or a torch pickle (`.bin`, `.pth`, `.pt`, `.ckpt`) holding a bare
      state dict or `{'model': state_dict, ...}`; a directory is searched for `model.safetensors`
      then `pytorch_model.bin` (the Hugging Face layout).
    trust_pickle: load torch pickles with `weights_only=False`. Only for files you trust:
      unpickling can run arbitrary code.

  Raises:
    FileNotFoundError; ImportError (torch missing, with the install command); ValueError (not a
    state dict, or an entry that is not a tensor).
  """
  return read_checkpoint(path, trust_pickle)[0]


def read_json_beside(path: str, name: str = "config.json") -> dict | None:
  """The Hugging Face `config.json` next to a checkpoint file (or inside its directory), if any."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  candidate = os.path.join(folder, name)
  if not os.path.exists(candidate):
    return None
  with open(candidate) as f:
    return json.load(f)
