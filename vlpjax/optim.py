"""The optimizer, built from `config.optim`: AdamW, learning-rate schedules, and regex rules.

Fields of `config.optim` (an `ml_collections.ConfigDict`; unknown fields are an error):

  name            'adamw' (the only optimizer; ALBEF and its descendants all use it).
  lr              peak learning rate.
  b1, b2, eps     Adam moments and denominator epsilon (default 0.9, 0.999, 1e-8, as PyTorch).
  weight_decay    decoupled decay, PyTorch AdamW style: update = -lr·(adam + weight_decay·param),
                  so the decay follows the schedule and the lr multiplier (default 0).
  grad_clip_norm  clip the global norm of the trainable gradients to this value; 0 or None = off.
  schedule        a dict with `name` and that schedule's fields:
    'constant'       lr at every step.
    'warmup_cosine'  linear from `warmup_init` (default 0) to lr over `warmup_steps`, then cosine
                     to `min_lr` (default 0) at `total_steps`.
    'albef'          the exact behaviour of the ALBEF code (docs/method_spec.md §1.3): in epoch 0 the lr
                     moves every `warmup_step_every` (default 100) iterations from `warmup_lr` to
                     lr, reached at iteration `warmup_steps` (default 2000), then stays flat; in
                     epoch e >= 1 it is min_lr + ½(lr - min_lr)(1 + cos(π e / epochs)), constant
                     within the epoch. `epochs` defaults to ceil(total_steps / steps_per_epoch).
  no_decay        regexes (re.fullmatch on the '/'-joined param path) that get no weight decay;
                  default ('(.*/)?bias', '(.*/)?scale').
  no_decay_1d     also exempt every 1-D leaf (default True). Together with the default regexes
                  this reproduces ALBEF's quirk: 0-D `temp` and the ViT's 3-D `pos_embedding` and
                  `cls` are decayed (docs/method_spec.md Appendix H.3).
  freeze          regexes of params that get zero updates and no optimizer state.
  lr_mult         (regex, multiplier) pairs scaling the update of matching params; the first
                  matching pair wins.

Each `freeze` and `lr_mult` pattern must match at least one param: a pattern that matches
nothing is almost always a misspelt path, and silently training everything is costly.
"""
import dataclasses
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.Array]

DEFAULT_NO_DECAY = (r"(.*/)?bias", r"(.*/)?scale")
_OPTIM_FIELDS = {
    "name", "lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm", "schedule", "no_decay",
    "no_decay_1d", "freeze", "lr_mult",
}
_SCHEDULE_FIELDS = {
    "constant": {"name"},
    "warmup_cosine": {"name", "warmup_steps", "warmup_init", "min_lr"},
    "albef": {"name", "warmup_steps", "warmup_lr", "warmup_step_every", "min_lr", "epochs"},
}


@dataclasses.dataclass(frozen=True)
class ParamLabel:
  """How the optimizer treats one param leaf (a pytree leaf, not a node)."""
  trainable: bool
  decay: bool
  lr_mult: float


def path_str(key_path) -> str:
  """'/'-joined names of a `jax.tree_util` key path, e.g. 'img/block_0/mlp/kernel'."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _require(cfg, field: str, where: str):
  if cfg.get(field) is None:
    raise ValueError(f"{where}.{field} is required")
  return cfg.get(field)


def _check_fields(cfg, allowed: set[str], where: str):
  unknown = sorted(set(cfg.keys()) - allowed)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _compile(patterns: Sequence[str], field: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    raise ValueError(f"optim.{field} must be a list of regexes, got the string {patterns!r}")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"optim.{field}: bad regex {pattern!r}: {e}") from None
  return compiled


def _parse_lr_mult(pairs) -> list[tuple[re.Pattern, float]]:
  parsed = []
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"optim.lr_mult entries must be (regex, multiplier) pairs, got {pair!r}")
    pattern, mult = pair
    parsed.append((_compile([pattern], "lr_mult")[0], float(mult)))
  return parsed


def param_labels(params, cfg: ml_collections.ConfigDict):
  """Labels every param leaf with a `ParamLabel` from the regex rules of `config.optim`.

  Args:
    params: nested dict of arrays (or `jax.ShapeDtypeStruct`s; only shapes are read).
    cfg: `config.optim`.

  Returns:
    A tree with the structure of `params` whose leaves are `ParamLabel`s.

  Raises:
    ValueError: a bad regex, or a `freeze` / `lr_mult` pattern that matches no param.
  """
  no_decay = _compile(cfg.get("no_decay", DEFAULT_NO_DECAY), "no_decay")
  freeze = _compile(cfg.get("freeze", ()), "freeze")
  lr_mult = _parse_lr_mult(cfg.get("lr_mult", ()))
  no_decay_1d = cfg.get("no_decay_1d", True)
  used = set()

  def label(key_path, leaf):
    path = path_str(key_path)
    frozen = [p for p in freeze if p.fullmatch(path)]
    used.update(p.pattern for p in frozen)
    mults = [(p, value) for p, value in lr_mult if p.fullmatch(path)]
    used.update(p.pattern for p, _ in mults)
    mult = mults[0][1] if mults else 1.0
    exempt = any(p.fullmatch(path) for p in no_decay) or (no_decay_1d and len(leaf.shape) == 1)
    return ParamLabel(trainable=not frozen, decay=not frozen and not exempt, lr_mult=mult)

  labels = jax.tree_util.tree_map_with_path(label, params)
  for field, patterns in (("freeze", [p.pattern for p in freeze]),
                          ("lr_mult", [p.pattern for p, _ in lr_mult])):
    unused = [p for p in patterns if p not in used]
    if unused:
      examples = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0][:3]]
      raise ValueError(f"optim.{field}: pattern(s) {unused} match no param path "
                       f"(patterns must match whole paths such as {examples})")
  return labels


def format_param_labels(params, labels) -> str:
  """A text table of every param: path, shape, size, and frozen / decay / lr multiplier.

  Args:
    params: the tree given to `param_labels`.
    labels: its result.
  """
  rows = []
  totals = {"trainable": 0, "frozen": 0}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_labels = jax.tree.leaves(labels, is_leaf=lambda x: isinstance(x, ParamLabel))
  for (key_path, leaf), label in zip(flat_params, flat_labels):
    size = int(np.prod(leaf.shape))
    totals["trainable" if label.trainable else "frozen"] += size
    shape = "(" + ",".join(str(d) for d in leaf.shape) + ")"
    rows.append((path_str(key_path), shape, f"{size:,}",
                 "train" if label.trainable else "FROZEN", "decay" if label.decay else "-",
                 f"{label.lr_mult:g}"))
  header = ("path", "shape", "size", "update", "wd", "lr_mult")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
  lines.append(f"trainable {totals['trainable']:,} params, frozen {totals['frozen']:,} params")
  return "\n".join(lines)


def _albef_schedule(lr: float, *, min_lr: float, warmup_lr: float, warmup_steps: int,
                    warmup_step_every: int, epochs: int, steps_per_epoch: int) -> Schedule:
  """ALBEF's timm cosine scheduler as stepped by its training scripts (see module docstring)."""
  if warmup_steps % warmup_step_every:
    raise ValueError(f"optim.schedule.warmup_steps ({warmup_steps}) must be a multiple of "
                     f"optim.schedule.warmup_step_every ({warmup_step_every})")
  warmup_updates = warmup_steps // warmup_step_every
  warmup_slope = (lr - warmup_lr) / warmup_updates if warmup_updates else 0.0

  def schedule(step):
    step = jnp.asarray(step)
    epoch = step // steps_per_epoch
    # The scheduler is stepped at iterations 0, every, 2·every, ... <= warmup_steps of epoch 0.
    update = jnp.minimum(step % steps_per_epoch, warmup_steps) // warmup_step_every
    warmup_value = jnp.where(update < warmup_updates, warmup_lr + update * warmup_slope, lr)
    progress = jnp.minimum(epoch, epochs) / epochs
    cosine_value = min_lr + 0.5 * (lr - min_lr) * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(epoch == 0, warmup_value, cosine_value).astype(jnp.float32)

  return schedule


def make_schedule(cfg: ml_collections.ConfigDict, *, total_steps: int,
                  steps_per_epoch: int) -> Schedule:
  """The learning-rate schedule `step -> lr` of `config.optim` (jittable; see module docstring)."""
  sched = cfg.get("schedule") or ml_collections.ConfigDict({"name": "constant"})
  name = sched.get("name")
  if name not in _SCHEDULE_FIELDS:
    raise ValueError(f"optim.schedule.name: unknown schedule {name!r}; "
                     f"known: {sorted(_SCHEDULE_FIELDS)}")
  _check_fields(sched, _SCHEDULE_FIELDS[name], f"optim.schedule ({name})")
  lr = float(_require(cfg, "lr", "optim"))
  if name == "constant":
    return lambda step: jnp.full(jnp.shape(step), lr, jnp.float32)
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=float(sched.get("warmup_init", 0.0)), peak_value=lr,
        warmup_steps=int(_require(sched, "warmup_steps", "optim.schedule")),
        decay_steps=total_steps,
        end_value=float(sched.get("min_lr", 0.0)))
  if steps_per_epoch <= 0:
    raise ValueError(f"optim.schedule 'albef' needs steps_per_epoch > 0, got {steps_per_epoch}")
  return _albef_schedule(
      lr, min_lr=float(_require(sched, "min_lr", "optim.schedule")),
      warmup_lr=float(sched.get("warmup_lr", lr)),
      warmup_steps=int(sched.get("warmup_steps", 2000)),
      warmup_step_every=int(sched.get("warmup_step_every", 100)),
      epochs=int(sched.get("epochs", math.ceil(total_steps / steps_per_epoch))),
      steps_per_epoch=steps_per_epoch)


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by the float at the same position of `multipliers`."""
  return optax.stateless(lambda updates, params: jax.tree.map(
      lambda u, m: u * m, updates, multipliers))


def make_optimizer(cfg: ml_collections.ConfigDict, *, params, total_steps: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optax transformation of `config.optim` (fields in the module docstring).

  The chain, per trainable param p with gradient g, schedule lr(t) and multiplier m:
    g <- clip_by_global_norm(g over trainable params)
    update = -m · lr(t) · (adam(g) + weight_decay · p · [p decays])
  Frozen params get update 0, are left out of the global norm, and hold no Adam moments.

  Args:
    cfg: `config.optim`.
    params: the param tree (arrays or `jax.ShapeDtypeStruct`s) the optimizer will update.
    total_steps: steps of this stage (the end of the cosine).
    steps_per_epoch: iterations per epoch (used by the 'albef' schedule).

  Returns:
    (transformation, schedule): the schedule maps a step to the base lr, for logging.
  """
  _check_fields(cfg, _OPTIM_FIELDS, "optim")
  if cfg.get("name") != "adamw":
    raise ValueError(f"optim.name: unknown optimizer {cfg.get('name')!r}; known: ['adamw']")
  schedule = make_schedule(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  labels = param_labels(params, cfg)
  is_label = lambda x: isinstance(x, ParamLabel)
  trainable = jax.tree.map(lambda l: l.trainable, labels, is_leaf=is_label)
  frozen = jax.tree.map(lambda l: not l.trainable, labels, is_leaf=is_label)
  decay = jax.tree.map(lambda l: l.decay, labels, is_leaf=is_label)
  lr_mult = jax.tree.map(lambda l: l.lr_mult, labels, is_leaf=is_label)

  transforms = []
  if cfg.get("grad_clip_norm"):
    transforms.append(optax.masked(optax.clip_by_global_norm(float(cfg.grad_clip_norm)),
                                   trainable))
  transforms.append(optax.masked(
      optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                          eps=cfg.get("eps", 1e-8)), trainable))
  if cfg.get("weight_decay"):
    transforms.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=decay))
  if any(m != 1.0 for m in jax.tree.leaves(lr_mult)):
    transforms.append(_scale_by_tree(lr_mult))
  transforms.append(optax.scale_by_learning_rate(schedule))
  transforms.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*transforms), schedule
