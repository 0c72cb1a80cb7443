"""Synthetic-input mode: random batches made on device (no tf.data), for compute benchmarks.

Shapes and key set match the real pipeline's output for the same config, so the train step
compiled for synthetic input is the one real input runs.
"""
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vlpjax import sharding as sharding_lib

# Batch keys a model kind adds (MVP's phrases and tags): kind -> (shapes(config, global_batch) ->
# {key: ShapeDtypeStruct}, make(config, rng, batch) -> {key: array}); the entries replace or add
# to the base batch. Registered by the kind's model module (`register_extras`).
_EXTRAS: dict[str, tuple] = {}


def register_extras(kind: str, shapes, make) -> None:
  _EXTRAS[kind] = (shapes, make)


def _extras(config):
  kind = config.model.get("kind") or "vlp"
  if kind not in _EXTRAS:
    from vlpjax.models import vlp  # the model modules register their extras on import
    vlp.model_class(config.model)
  return _EXTRAS.get(kind)


# Input formats other than captions give their synthetic batches through `register_format`
# (shapes and maker); the modules that register them are imported on first use.
FORMAT_MODULES: list[str] = ["vlpjax.synthetic_unpaired"]
_FORMATS: dict[str, tuple] = {}


def register_format(name: str, *, shapes, make) -> None:
  """`shapes(config, input_cfg, B) -> {key: ShapeDtypeStruct}`, `make(rng, step, shapes, config,
  input_cfg) -> batch` for `config.input.format = name` (or a stream of that format)."""
  _FORMATS[name] = (shapes, make)


def _format(name: str) -> tuple:
  import importlib
  for module in FORMAT_MODULES:
    importlib.import_module(module)
  if name not in _FORMATS:
    raise ValueError(f"synthetic input has no batches of config.input.format {name!r}; known: "
                     f"{['caption'] + sorted(_FORMATS)}")
  return _FORMATS[name]


def _streams(config, global_batch: int) -> dict:
  """{name: (input cfg, batch)}: the config's streams, or its one input when it is not captions."""
  from vlpjax import data  # data imports this module
  streams = data.stream_configs(config)
  if not streams and config.input.get("format", "caption") != "caption":
    streams = {None: (config.input, global_batch)}
  return streams


def batch_shapes(config: ml_collections.ConfigDict, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch layout implied by the config ({stream: layout} with several streams)."""
  streams = _streams(config, global_batch)
  if streams:
    out = {name: _format(cfg.get("format", "caption"))[0](config, cfg, b) for name, (cfg, b) in streams.items()}
    return out[None] if None in out else out
  size = config.model.vision.image_size
  grid = size // config.model.vision.patch_size
  length = int(config.input.max_len)
  shapes = dict(
      image=jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
      text_ids=jax.ShapeDtypeStruct((global_batch, length), jnp.int32),
      text_mask=jax.ShapeDtypeStruct((global_batch, length), jnp.int32),
      mlm_ids=jax.ShapeDtypeStruct((global_batch, length), jnp.int32),
      mlm_labels=jax.ShapeDtypeStruct((global_batch, length), jnp.int32),
      image_id=jax.ShapeDtypeStruct((global_batch,), jnp.int32))
  if float(config.input.get("patch_mask_ratio", 0.0)) > 0:
    shapes["patch_mask"] = jax.ShapeDtypeStruct((global_batch, grid * grid), jnp.bool_)
  if (config.model.get("image_tokens") or {}).get("kind") == "concepts":  # ViCHA's concept strings
    concept_len = int(config.input.get("concept_max_len", 16))
    shapes["concept_ids"] = jax.ShapeDtypeStruct((global_batch, concept_len), jnp.int32)
    shapes["concept_mask"] = jax.ShapeDtypeStruct((global_batch, concept_len), jnp.int32)
  if float((config.objectives.get("mae") or {}).get("weight", 0.0)):  # MAE's visible patches
    keep = int(grid * grid * (1 - float(config.input.get("mae_mask_ratio", 0.75))))
    shapes["mae_keep_idx"] = jax.ShapeDtypeStruct((global_batch, keep), jnp.int32)
    shapes["mae_restore_idx"] = jax.ShapeDtypeStruct((global_batch, grid * grid), jnp.int32)
  extras = _extras(config)
  if extras is not None:
    shapes.update(extras[0](config, global_batch))
  return shapes


def make_batch_fn(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int):
  """Returns a jitted `fn(rng, step) -> batch` whose outputs are sharded over the batch axes."""
  shapes = batch_shapes(config, global_batch)
  streams = _streams(config, global_batch)
  if streams:
    def make_streams(rng, step):
      out = {name: _format(cfg.get("format", "caption"))[1](jax.random.fold_in(rng, i), step,
                                                             shapes if name is None else shapes[name], config, cfg)
             for i, (name, (cfg, _)) in enumerate(streams.items())}
      return out[None] if None in out else out

    out_shardings = jax.tree.map(lambda v: sharding_lib.batch_sharding(mesh, len(v.shape)), shapes)
    return jax.jit(make_streams, out_shardings=out_shardings)
  extras = _extras(config)
  vocab = int(config.model.text.vocab_size)
  mlm_prob = float(config.input.get("mlm_prob", 0.15))
  ratio = float(config.input.get("patch_mask_ratio", 0.0))

  def make(rng, step):
    keys = jax.random.split(rng, 6)
    b, length = shapes["text_ids"].shape
    image = jax.random.normal(keys[0], shapes["image"].shape, jnp.float32)
    lengths = jax.random.randint(keys[1], (b, 1), max(2, length // 2), length + 1)
    text_mask = (jnp.arange(length)[None, :] < lengths).astype(jnp.int32)
    text_ids = jnp.where(text_mask > 0, jax.random.randint(keys[2], (b, length), 5, vocab), 0)
    text_ids = text_ids.at[:, 0].set(2)
    selected = (jax.random.uniform(keys[3], (b, length)) < mlm_prob) & (text_mask > 0)
    selected = selected.at[:, 0].set(False)
    out = dict(image=image, text_ids=text_ids, text_mask=text_mask,
               mlm_ids=jnp.where(selected, 4, text_ids), mlm_labels=jnp.where(selected, text_ids, -1),
               image_id=(step * b + jnp.arange(b)).astype(jnp.int32))
    if "patch_mask" in shapes:
      n = shapes["patch_mask"].shape[1]
      scores = jax.random.uniform(keys[4], (b, n))
      rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
      out["patch_mask"] = rank < int(round(ratio * n))
    if "concept_ids" in shapes:
      k = shapes["concept_ids"].shape[1]
      lengths = jax.random.randint(jax.random.fold_in(keys[5], 0), (b, 1), 2, k + 1)
      out["concept_mask"] = (jnp.arange(k)[None, :] < lengths).astype(jnp.int32)
      ids = jax.random.randint(jax.random.fold_in(keys[5], 1), (b, k), 5, vocab)
      out["concept_ids"] = jnp.where(out["concept_mask"] > 0, ids, 0).at[:, 0].set(2)
    if "mae_keep_idx" in shapes:
      shuffle = jnp.argsort(jax.random.uniform(jax.random.fold_in(keys[5], 2), shapes["mae_restore_idx"].shape), axis=1)
      out["mae_keep_idx"] = shuffle[:, :shapes["mae_keep_idx"].shape[1]].astype(jnp.int32)
      out["mae_restore_idx"] = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    if extras is not None:
      out.update(extras[1](config, keys[5], out))
    return out

  out_shardings = {k: sharding_lib.batch_sharding(mesh, len(v.shape)) for k, v in shapes.items()}
  return jax.jit(make, out_shardings=out_shardings)


class SyntheticIterator:
  """Infinite iterator of synthetic global batches; batch k depends only on (seed, k)."""

  def __init__(self, config, mesh, global_batch: int, *, seed: int, start_step: int = 0):
    self._fn = make_batch_fn(config, mesh, global_batch)
    self._rng = jax.random.PRNGKey(seed)
    self._step = start_step

  def __iter__(self):
    return self

  def __next__(self):
    batch = self._fn(jax.random.fold_in(self._rng, self._step), self._step)
    self._step += 1
    return batch
