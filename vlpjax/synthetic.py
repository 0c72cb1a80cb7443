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


def batch_shapes(config: ml_collections.ConfigDict, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch layout implied by the config."""
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
  extras = _extras(config)
  if extras is not None:
    shapes.update(extras[0](config, global_batch))
  return shapes


def make_batch_fn(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int):
  """Returns a jitted `fn(rng, step) -> batch` whose outputs are sharded over the batch axes."""
  shapes = batch_shapes(config, global_batch)
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
