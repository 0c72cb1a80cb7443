"""Checkpoints: Orbax train-state saves, resume precedence, params export and partial restore.

Layout of a work directory:

  <workdir>/checkpoints/<step>/state   the full TrainState (Orbax StandardSave)
  <workdir>/checkpoints/<step>/meta    JSON: stage, step, data position, the config as JSON
  <workdir>/export/<stage>             params only (an Orbax PyTree checkpoint), end of each stage

Where a run starts from (`resolve_start`), first match wins:

  1. WORKDIR    <workdir>/checkpoints holds a finished step: the run was interrupted; continue it
                (full state, data position from meta). This wins so a preempted job that is
                restarted with its original flags never goes back to its starting point.
  2. RESUME     an explicit resume path (another run's checkpoints dir or one of its step dirs):
                full state, as if it were our own.
  3. INIT_FROM  a params source (an export, a train checkpoint, or a converted import): params
                only, merged into freshly initialised params by `partial_restore`, which reports
                what was loaded, skipped, newly initialised and left unused. Fine-tuning.
  4. SCRATCH    nothing given: random init.
"""
import dataclasses
import enum
import json
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from vlpjax.models import layout

CHECKPOINTS_SUBDIR = "checkpoints"
EXPORT_SUBDIR = "export"
_STATE, _META = "state", "meta"


def _abspath(path) -> epath.Path:
  """Orbax wants absolute paths; cloud paths (gs://...) already are."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def checkpoint_dir(workdir) -> epath.Path:
  """The Orbax CheckpointManager root of a run: `<workdir>/checkpoints`."""
  return _abspath(workdir) / CHECKPOINTS_SUBDIR


def export_dir(workdir, stage: str) -> epath.Path:
  """Where the params of a finished stage are exported: `<workdir>/export/<stage>`."""
  return _abspath(workdir) / EXPORT_SUBDIR / stage


def _finished_steps(root: epath.Path) -> list[int]:
  return sorted(ocp.utils.checkpoint_steps(root)) if root.is_dir() else []


def locate_checkpoint(path) -> tuple[epath.Path, int]:
  """Splits a train-checkpoint path into (manager root, step).

  Args:
    path: a manager root (`.../checkpoints`, its latest finished step is taken) or one step
      directory (`.../checkpoints/<step>`).

  Raises:
    FileNotFoundError: `path` is neither.
  """
  path = _abspath(path)
  if (path / _STATE).is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  steps = _finished_steps(path)
  if not steps:
    raise FileNotFoundError(f"no finished train checkpoint at {path} (expected a checkpoints "
                            f"directory with <step>/{_STATE} inside, or one <step> directory)")
  return path, steps[-1]


class StartFrom(str, enum.Enum):
  """Where a run takes its initial state from; see the module docstring for the precedence."""
  WORKDIR = "workdir"
  RESUME = "resume"
  INIT_FROM = "init_from"
  SCRATCH = "scratch"


def resolve_start(workdir, resume_path=None, init_from_path=None) -> StartFrom:
  """Decides where a run starts: own checkpoint > resume path > init_from > scratch.

  Args:
    workdir: this run's work directory.
    resume_path: optional train checkpoint (manager root or step directory) to continue from.
    init_from_path: optional params source (export dir or train checkpoint) for fine-tuning.

  Raises:
    FileNotFoundError: a path that is given (and needed) does not exist.
  """
  if _finished_steps(checkpoint_dir(workdir)):
    return StartFrom.WORKDIR
  if resume_path:
    locate_checkpoint(resume_path)
    return StartFrom.RESUME
  if init_from_path:
    if not _abspath(init_from_path).exists():
      raise FileNotFoundError(f"init_from path {init_from_path} does not exist")
    return StartFrom.INIT_FROM
  return StartFrom.SCRATCH


def _check_json(meta: Mapping[str, Any]):
  for key, value in meta.items():
    try:
      json.dumps(value)
    except TypeError as e:
      raise TypeError(f"checkpoint meta[{key!r}] is not JSON-serialisable ({e}); store configs "
                      "as config.to_json_best_effort()") from None


class Checkpointer:
  """Saves and restores the TrainState plus JSON metadata with an Orbax CheckpointManager.

  Every process of a multi-host run must call `save`, `restore`, `wait` and `close` together.
  With `async_save`, `save` returns once the arrays are copied off the devices and writes in the
  background; call `wait()` before reading the files and `close()` at the end.
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    """Opens (creating if needed) the checkpoint root `directory`.

    Args:
      directory: the manager root, usually `checkpoint_dir(workdir)`.
      max_to_keep: newest steps kept on disk; None keeps all.
      save_interval_steps: `save` writes only when step % this == 0, when forced, or when the
        directory holds no step yet (Orbax always writes a first save).
      async_save: write in a background thread.
    """
    self.directory = _abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, meta: Mapping[str, Any], force: bool = False) -> bool:
    """Saves `state` (a pytree of jax.Arrays) and `meta` (JSON) as `step`.

    Returns:
      Whether a save was started (False when the interval says skip and `force` is off).
    """
    _check_json(meta)
    return self._manager.save(
        int(step), force=force,
        args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                   _META: ocp.args.JsonSave(dict(meta))}))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _step_or_latest(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None and not steps:
      raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
      raise FileNotFoundError(f"no checkpoint step {chosen} in {self.directory}; "
                              f"finished steps: {steps}")
    return chosen

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON metadata of `step` (default latest), e.g. to find the stage before restoring."""
    restored = self._manager.restore(
        self._step_or_latest(step), args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    return restored[_META]

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
    """Restores `step` (default latest) into the layout of `abstract_state`.

    Args:
      abstract_state: the state's pytree (e.g. from `jax.eval_shape`) whose leaves are
        `jax.ShapeDtypeStruct`s carrying the target `sharding`. The shardings may differ from
        the ones saved: a checkpoint from an 8-device mesh restores onto 4 devices.

    Returns:
      (state, meta): state has the type and shardings of `abstract_state`.
    """
    restored = self._manager.restore(
        self._step_or_latest(step),
        args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state),
                                   _META: ocp.args.JsonRestore()}))
    return restored[_STATE], restored[_META]

  def wait(self):
    """Blocks until a background save has finished (and raises its error, if any)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


MODEL_CONFIG_FILE = "model_config.json"


def export_params(params, directory, model_config=None):
  """Writes `params` alone as an Orbax PyTree checkpoint at `directory` (replacing it), and the
  `config.model` they belong to beside it (`<directory>.model_config.json`), for `init_from`'s
  architecture check."""
  directory = _abspath(directory)
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  checkpointer.save(directory, args=ocp.args.StandardSave(params), force=True)
  checkpointer.close()
  if model_config is not None and jax.process_index() == 0:
    model = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    (directory.parent / f"{directory.name}.{MODEL_CONFIG_FILE}").write_text(json.dumps(model, indent=1, default=str))


def stored_model_config(path) -> dict | None:
  """The `config.model` a checkpoint was trained or converted with, when it says: an export's
  `<dir>.model_config.json`, a train checkpoint's meta config, a converter directory's
  `conversion.json`. None when it does not say."""
  path = _abspath(path)
  sidecar = path.parent / f"{path.name}.{MODEL_CONFIG_FILE}"
  if sidecar.exists():
    return json.loads(sidecar.read_text())
  conversion = path / "conversion.json"
  if conversion.exists():
    return json.loads(conversion.read_text()).get("model_config")
  try:
    root, step = locate_checkpoint(path)
  except (FileNotFoundError, ValueError):
    return None
  meta = root / str(step) / _META / "metadata"
  if meta.exists():
    return (json.loads(meta.read_text()).get("config") or {}).get("model")
  return None


# Architecture fields a checkpoint and a config must agree on for `init_from` (task fields,
# heads and dtype may differ: a finetune adds or drops heads).
_ARCHITECTURE = {
    "": ("fusion", "embed_dim"),
    "vision": ("patch_size", "width", "depth", "num_heads", "mlp_ratio"),
    "text": ("vocab_size", "width", "num_heads", "mlp_dim", "text_layers", "fusion_layers"),
}


def model_mismatches(stored: dict, wanted) -> list[str]:
  """`config.model.<field>: checkpoint X, config Y` for each architecture field that differs
  (fields the stored config lacks are not compared)."""
  wanted = wanted.to_dict() if hasattr(wanted, "to_dict") else dict(wanted)
  out = []
  for section, names in _ARCHITECTURE.items():
    have = stored.get(section, {}) if section else stored
    want = wanted.get(section, {}) if section else wanted
    for name in names:
      if isinstance(have, dict) and name in have and name in want and have[name] != want[name]:
        key = f"{section}.{name}" if section else name
        out.append(f"config.model.{key}: checkpoint {have[name]!r}, config {want[name]!r}")
  have_tokens = (stored.get("image_tokens") or {}).get("kind", "") if isinstance(stored.get("image_tokens"), dict) else ""
  want_tokens = (wanted.get("image_tokens") or {}).get("kind", "") if isinstance(wanted.get("image_tokens"), dict) else ""
  if "image_tokens" in stored and have_tokens != want_tokens:
    out.append(f"config.model.image_tokens.kind: checkpoint {have_tokens!r}, config {want_tokens!r}")
  return out


def check_model_compatible(path, model_config, *, allow: bool = False) -> None:
  """Refuses an `init_from` checkpoint whose architecture differs from `config.model`.

  Loading such a checkpoint silently re-initialises the mismatched parts (e.g. a `merged`-fusion
  MAMO export into a `cross`-fusion finetune loses every fusion layer's cross-attention), so the
  run stops and says which fields differ and how to fit them, unless `allow`
  (`--config.init_from.allow_mismatch=True`) accepts it with a warning.
  """
  stored = stored_model_config(path)
  if not stored:
    return
  mismatches = model_mismatches(stored, model_config)
  if not mismatches:
    return
  fix = ", ".join(f"--{m.split(':')[0]}={_flag_value(m)}" for m in mismatches)
  message = (f"init_from {path}: the checkpoint's model differs from this config's ({'; '.join(mismatches)}). "
             f"A config that fits sets {fix}; or accept the partial load with "
             "--config.init_from.allow_mismatch=True")
  if not allow:
    raise ValueError(message)
  logging.warning("%s (allowed)", message)


def take_model_from_checkpoint(config) -> None:
  """With `config.init_from.model_from_checkpoint`, sets config.model's architecture fields (the
  ones `check_model_compatible` compares, and `image_tokens`) to the checkpoint's stored ones, in
  place; a finetune config then fits any pretraining export. No-op otherwise."""
  init = config.get("init_from") or {}
  if not init.get("model_from_checkpoint") or not init.get("path"):
    return
  stored = stored_model_config(init.path)
  if not stored:
    raise ValueError(f"--config.init_from.model_from_checkpoint: {init.path} does not say which model it holds "
                     "(no export sidecar, train checkpoint meta or conversion.json)")
  with config.unlocked():
    for section, names in _ARCHITECTURE.items():
      source = stored.get(section, {}) if section else stored
      target = config.model[section] if section else config.model
      for name in names:
        if name in source:
          target[name] = source[name]
    if "image_tokens" in stored:
      config.model.image_tokens = stored["image_tokens"]
  logging.info("config.model architecture taken from %s: %s", init.path,
               {s or "model": {n: (stored.get(s, {}) if s else stored).get(n) for n in ns} for s, ns in _ARCHITECTURE.items()})


def _flag_value(mismatch: str) -> str:
  value = mismatch.split("checkpoint ", 1)[1].split(", config", 1)[0]
  return value.strip("'")


def _params_location(path: epath.Path) -> tuple[epath.Path, str | None]:
  """(PyTree checkpoint dir, key of the params subtree or None for the whole tree).

  A `python -m vlpjax.convert` output directory holds its params in `<dir>/params`.
  """
  if (path / "_METADATA").exists():
    return path, None
  if (path / "params" / "_METADATA").exists():
    return path / "params", None
  root, step = locate_checkpoint(path)
  return root / str(step) / _STATE, "params"


def load_params(path) -> dict:
  """Reads params to host memory from an export or from a train checkpoint.

  Args:
    path: an `export_params` directory, a converter output directory (its `params`), a train
      checkpoint step directory (its `state/params` is read, not the optimizer state), or a
      checkpoints root (its latest step).

  Returns:
    A nested dict of `np.ndarray`, in the unrolled (interchange) layer layout whatever layout the
    checkpoint was saved in (`vlpjax.models.layout`); `partial_restore` puts it into the model's.
  """
  location, key = _params_location(_abspath(path))
  if key is None:
    return layout.unroll(_read_items(location))
  restored = _read_items(location, (key,))
  if key not in restored:
    tree = ocp.PyTreeCheckpointer().metadata(location).item_metadata.tree
    raise KeyError(f"{location} has no {key!r} subtree; top-level keys: {sorted(tree)}")
  return layout.unroll(restored[key])


def load_state_items(path, keys) -> dict:
  """Reads the top-level `keys` that a train checkpoint's state holds (e.g. `ema_params`,
  `objective_state`) to host memory; absent keys are left out. `path` as for `locate_checkpoint`."""
  root, step = locate_checkpoint(_abspath(path))
  return _read_items(root / str(step) / _STATE, tuple(keys))


def _read_items(location: epath.Path, keys=None) -> dict:
  """Restores the PyTree at `location` as numpy: whole, or only its top-level `keys` present."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(location).item_metadata.tree
  if keys is not None:
    tree = {k: tree[k] for k in keys if k in tree}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(
      location, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                            partial_restore=keys is not None))


@dataclasses.dataclass
class RestoreReport:
  """What `partial_restore` did, as '/'-joined param paths.

  loaded: in both, copied from the checkpoint. skipped: target paths matching `dont_load` (kept
  as initialised). new: target paths absent from the checkpoint (kept as initialised). unused:
  checkpoint paths absent from the target (dropped).
  """
  loaded: list[str]
  skipped: list[str]
  new: list[str]
  unused: list[str]


def _place_like(value: np.ndarray, target):
  """`value` with the dtype of `target`, on `target`'s devices when it is a jax.Array."""
  value = np.asarray(value, dtype=target.dtype)
  return jax.device_put(value, target.sharding) if isinstance(target, jax.Array) else value


def partial_restore(target_params, loaded_params,
                    dont_load: Sequence[str] = ()) -> tuple[dict, RestoreReport]:
  """Overwrites initialised params with those of a checkpoint where paths and shapes agree.

  Args:
    target_params: the freshly initialised nested params dict (arrays) of the model to train.
    loaded_params: a nested dict from `load_params` or an importer, in either layer layout: it is
      put into the target's first (`layout.like`: scanned stacks or unrolled layers).
    dont_load: regexes (re.fullmatch on '/'-joined paths) of target params to keep as
      initialised, e.g. a new task head ('head/.*').

  Returns:
    (params, report): params has the structure, dtypes and shardings of `target_params`.

  Raises:
    ValueError: a shared path whose shapes differ (name it in `dont_load` to re-initialise it),
      a bad regex, or a `dont_load` pattern that matches no path of either tree.
  """
  target = traverse_util.flatten_dict(target_params, sep="/")
  loaded = traverse_util.flatten_dict(layout.like(dict(loaded_params), dict(target_params)), sep="/")
  try:
    patterns = [re.compile(p) for p in dont_load]
  except re.error as e:
    raise ValueError(f"dont_load: bad regex: {e}") from None
  unmatched = [p.pattern for p in patterns
               if not any(p.fullmatch(path) for path in (*target, *loaded))]
  if unmatched:
    raise ValueError(f"dont_load pattern(s) {unmatched} match no param path")

  merged, report = {}, RestoreReport(loaded=[], skipped=[], new=[], unused=[])
  for path, value in target.items():
    if any(p.fullmatch(path) for p in patterns):
      report.skipped.append(path)
      merged[path] = value
    elif path not in loaded:
      report.new.append(path)
      merged[path] = value
    else:
      if tuple(np.shape(loaded[path])) != tuple(value.shape):
        raise ValueError(f"partial_restore: shape mismatch at {path!r}: checkpoint "
                         f"{tuple(np.shape(loaded[path]))} vs model {tuple(value.shape)}; "
                         "add the path to dont_load to re-initialise it")
      report.loaded.append(path)
      merged[path] = _place_like(loaded[path], value)
  report.unused = sorted(set(loaded) - set(target))
  return traverse_util.unflatten_dict(merged, sep="/"), report


def format_report(report: RestoreReport) -> str:
  """A text table of a `RestoreReport`: a count line, then one `status  path` row per param."""
  sections = (("loaded", report.loaded), ("skipped", report.skipped), ("new", report.new),
              ("unused", report.unused))
  lines = [", ".join(f"{name} {len(paths)}" for name, paths in sections)]
  lines += [f"{name:<8}{path}" for name, paths in sections for path in paths]
  return "\n".join(lines)
