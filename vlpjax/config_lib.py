"""Config validation and the step arithmetic derived from a config.

`validate` runs before any compute: an unknown or misspelt key anywhere we own the schema
fails with a message that names the full key path.
"""
import ml_collections

from vlpjax import objectives
from vlpjax import sharding as sharding_lib
from vlpjax.models import vlp

TOP_LEVEL = {
    "seed": "PRNG seed of init, data order and dropout",
    "batch_size": "global batch size (all processes and devices)",
    "num_epochs": "training length in epochs (with input.num_train_examples)",
    "total_steps": "training length in steps (overrides num_epochs when > 0)",
    "steps_per_epoch": "steps per epoch (overrides input.num_train_examples // batch_size when > 0)",
    "model": "vlpjax.models.vlp.ModelConfig fields (+ kind: the task model, and its fields)",
    "objectives": "{name: {weight, ...settings}} of registered objectives",
    "teacher": "EMA teacher: momentum (0 = no teacher), alpha (distillation weight after the ramp), "
               "alpha_ramp_steps (-1 = one epoch, ALBEF)",
    "optim": "vlpjax.optim.make_optimizer fields",
    "sharding": "mesh {data, fsdp, tensor} and rules preset",
    "input": "input_pipeline.builder fields",
    "eval": "periodic evaluation: every_steps, split, batch_size, kind (+ the evaluator's keys)",
    "evals": "more named evaluations {name: {kind, every_steps, split, batch_size, ...}} (logged as eval_<name>/)",
    "checkpoint": "every_steps, max_to_keep, async_save",
    "log_every_steps": "metric logging period",
    "init_from": "params-only start: path, dont_load regexes",
    "resume_from": "a checkpoint directory of another run to resume from",
    "stages": "list of {name, steps, objectives?, freeze?, input? (config.input overrides for this stage)}",
}
SECTIONS = {
    "teacher": {"momentum", "alpha", "alpha_ramp_steps"},
    "sharding": {"mesh", "rules"},
    "eval": {"every_steps", "split", "batch_size", "kind"},  # + the evaluator's EVAL_KEYS
    "checkpoint": {"every_steps", "max_to_keep", "async_save"},
    "init_from": {"path", "dont_load", "allow_mismatch", "model_from_checkpoint"},
}
STAGE_KEYS = {"name", "steps", "objectives", "freeze", "input"}


def _check(keys, allowed, where):
  unknown = sorted(set(keys) - set(allowed))
  if unknown:
    raise ValueError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                     f"allowed in {where}: {sorted(allowed)}")


def _check_objectives(config, objectives_cfg, where: str, model_cfg) -> None:
  """Known names; heads in config.model.heads; a teacher where one is read; own config checks."""
  has_teacher = teacher_settings(config, 1) is not None
  for name in objectives_cfg.keys():
    if name not in objectives.names():
      raise ValueError(f"unknown objective {where}.{name}; registered: {objectives.names()}")
  for spec in objectives.registry.objective_specs(objectives_cfg):
    definition = spec.definition
    missing = [h for h in definition.required_heads(spec.cfg) if h not in model_cfg.heads]
    if missing:
      raise ValueError(f"objective {where}.{spec.name} needs head(s) {missing} in config.model.heads "
                       f"(now {list(model_cfg.heads)})")
    if definition.wants_teacher(spec.cfg) and not has_teacher:
      raise ValueError(f"objective {where}.{spec.name} reads the EMA teacher; set config.teacher.momentum > 0 "
                       "(e.g. 0.995) or turn its distillation off")
    if definition.check is not None:
      definition.check(spec.cfg, config)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key; runs no JAX computation."""
  _check(config.keys(), TOP_LEVEL, "config")
  for section, allowed in SECTIONS.items():
    if section in config and config[section] is not None and hasattr(config[section], "keys"):
      if section == "eval":
        continue  # with config.evals, by the evaluators (their own keys)
      _check(config[section].keys(), allowed, f"config.{section}")
  from vlpjax import evaluators
  evaluators.validate(config)
  model_cfg = vlp.build_config(config.model)
  _check_objectives(config, config.objectives, "config.objectives", model_cfg)
  sharding_lib.logical_rules(config.sharding.rules)
  _check(config.sharding.mesh.keys(), sharding_lib.MESH_AXES, "config.sharding.mesh")
  for i, stage in enumerate(config.get("stages") or ()):
    _check(dict(stage).keys(), STAGE_KEYS, f"config.stages[{i}]")
    if stage.get("objectives"):
      _check_objectives(config, ml_collections.ConfigDict(dict(stage.get("objectives"))),
                        f"config.stages[{i}].objectives", model_cfg)
    if stage.get("input") and "input" in config:
      from input_pipeline import builder
      merged = ml_collections.ConfigDict(config.input.to_dict())
      merged.update(dict(stage.get("input")))
      _check(dict(stage.get("input")).keys(), builder.FIELDS, f"config.stages[{i}].input")
      builder.validate_config(merged)
  if "input" in config:
    from input_pipeline import builder  # the builder owns the input schema
    if hasattr(builder, "validate_config"):
      builder.validate_config(config.input)
    from vlpjax import data  # several input streams: each one's merged config.input
    data.validate_streams(config)


def teacher_settings(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict | None:
  """dict(momentum, alpha, alpha_ramp_steps) of the EMA teacher, or None when the config has none.

  A teacher exists when `config.teacher.momentum` > 0; `alpha_ramp_steps` -1 becomes one epoch.
  """
  teacher = config.get("teacher")
  if not teacher or float(teacher.get("momentum", 0.0) or 0.0) <= 0.0:
    return None
  momentum = float(teacher.momentum)
  if not 0.0 < momentum < 1.0:
    raise ValueError(f"config.teacher.momentum must be in (0, 1) or 0 (no teacher); got {momentum}")
  ramp = int(teacher.get("alpha_ramp_steps", 0))
  return dict(momentum=momentum, alpha=float(teacher.get("alpha", 0.0)),
              alpha_ramp_steps=steps_per_epoch if ramp < 0 else ramp)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  if config.get("steps_per_epoch", 0) > 0:
    return int(config.steps_per_epoch)
  examples = int(config.input.get("num_train_examples", 0) or 0)
  if examples <= 0:
    raise ValueError("set config.steps_per_epoch or config.input.num_train_examples (epoch-based "
                     "schedules and the alpha ramp need the epoch length)")
  return max(1, examples // int(config.batch_size))


def total_steps(config: ml_collections.ConfigDict) -> int:
  if config.get("total_steps", 0) > 0:
    return int(config.total_steps)
  return int(config.num_epochs) * steps_per_epoch(config)


def resolve_config_path(path: str) -> str:
  """A config file path as given, or, when it does not exist relative to the working directory,
  the same `configs/...` path inside the installed `configs` package, so that
  `--config=configs/albef.py` works from any directory.

  Raises:
    FileNotFoundError: neither exists (the message names both places).
  """
  import importlib.util
  import os
  if os.path.exists(path) or os.path.isabs(path):
    return path
  parts = os.path.normpath(path).split(os.sep)
  spec = importlib.util.find_spec("configs")
  package_dir = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
  if package_dir and len(parts) > 1 and parts[0] == "configs":
    candidate = os.path.join(package_dir, *parts[1:])
    if os.path.exists(candidate):
      return candidate
  where = f" nor in the installed configs package ({package_dir})" if package_dir else ""
  raise FileNotFoundError(f"config file {path!r} does not exist (relative to {os.getcwd()}{where})")


def resolve_config_spec(spec: str) -> str:
  """`"configs/mamo.py:demo"` with its path part through `resolve_config_path`."""
  path, sep, arg = spec.partition(":")
  return resolve_config_path(path) + sep + arg


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`"configs/mamo.py:demo"` -> the config, as `--config=` would load it (for scripts and notebooks)."""
  import importlib.util
  path, _, arg = resolve_config_spec(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(f"vlpjax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def define_config_flag(name: str = "config", default: str | None = None,
                       help_string: str = "Config file, `configs/x.py[:ARG]` (found in the installed "
                       "configs package when not under the working directory); `--config.a.b=v` overrides.",
                       **kwargs):
  """`ml_collections.config_flags.DEFINE_config_file` whose path goes through
  `resolve_config_path`; overrides (`--config.a.b=v`) work as before. A missing file fails the
  flag parsing with one line naming it."""
  import sys

  from absl import flags
  from ml_collections import config_flags

  holder = config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  file_parser = flags.FLAGS[name].parser

  class ResolvingParser(flags.ArgumentParser):

    def parse(self, argument):
      try:
        argument = resolve_config_spec(argument)
      except FileNotFoundError as e:
        raise ValueError(str(e)) from None  # absl reports a ValueError as a flag error, in one line
      return file_parser.parse(argument)

    def flag_type(self):
      return file_parser.flag_type()

  flags.FLAGS[name].parser = ResolvingParser()
  # List the flag under the calling program's flags in --help (absl files it under this module).
  caller = sys._getframe(1).f_globals.get("__name__")
  flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller, flags.FLAGS[name])
  return holder
