"""Cross-modal contrastive learning between a sentence and its CutMix view (VLMixer's `cmcl`,
docs/method_spec.md §4.2 E).

Optional MoCo variant (`queue_size` > 0): keys from the EMA teacher, and queues of earlier keys
of both views, owned by this objective (its state: orig, mixed [Q, E], valid [Q], ptr).
"""
import jax
import jax.numpy as jnp

from vlpjax.models import layers
from vlpjax.objectives import cmc
from vlpjax.objectives import registry

_NEG = -1e9


def masked_info_nce(queries: jax.Array, keys: jax.Array, query_valid: jax.Array, key_valid: jax.Array,
                    temp) -> jax.Array:
  """Mean over valid queries b of -log softmax(q_b . k / temp)[b] over the valid keys.

  queries [B, E], keys [B + Q, E] (the positive of query b is key b), query_valid [B],
  key_valid [B + Q]. 0 when no query is valid.
  """
  logits = (queries.astype(jnp.float32) @ keys.astype(jnp.float32).T) / temp
  logits = jnp.where(key_valid[None, :], logits, _NEG)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  own = jnp.diagonal(log_probs[:, :queries.shape[0]])
  count = jnp.maximum(jnp.sum(query_valid), 1).astype(jnp.float32)
  return -jnp.sum(jnp.where(query_valid, own, 0.0)) / count


def init_queue(cfg, model_config, rng):
  size = int(cfg.get("queue_size", 0))
  if size == 0:
    return None
  a, b = jax.random.split(rng)
  dim = model_config.embed_dim
  return dict(orig=layers.l2_normalize(jax.random.normal(a, (size, dim))),
              mixed=layers.l2_normalize(jax.random.normal(b, (size, dim))),
              valid=jnp.zeros((size,), bool), ptr=jnp.zeros((), jnp.int32))


def _keys(ctx):
  """Teacher features of both views [Bt, E] (MoCo keys)."""
  return (ctx.teacher.project_text(ctx.ema_orig_text["states"][:, 0]),
          ctx.teacher.project_text(ctx.ema_mixed_clean["states"][:, 0]))


def update_queue(ctx, batch, queue):
  if queue is None:
    return None
  orig, mixed = _keys(ctx)
  valid = batch[cmc.TEXT]["cmc_valid"]
  ptr, size = queue["ptr"], queue["orig"].shape[0]
  return dict(orig=jax.lax.dynamic_update_slice(queue["orig"], orig.astype(queue["orig"].dtype), (ptr, 0)),
              mixed=jax.lax.dynamic_update_slice(queue["mixed"], mixed.astype(queue["mixed"].dtype), (ptr, 0)),
              valid=jax.lax.dynamic_update_slice(queue["valid"], valid, (ptr,)),
              ptr=(ptr + orig.shape[0]) % size)


def check_queue(cfg, config) -> None:
  size = int(cfg.get("queue_size", 0))
  streams = config.input.get("streams") or {}
  batch = int((streams.get(cmc.TEXT) or {}).get("batch_size", 0) or config.batch_size)
  if size and size % batch:
    raise ValueError(f"config.objectives.cmcl.queue_size={size} must be a multiple of the text stream's "
                     f"global batch ({batch})")
  cmc.check_gallery_source(cfg, config)


@registry.register("cmcl", heads=("cmcl",), needs_teacher=lambda cfg: int(cfg.get("queue_size", 0)) > 0,
                   init_state=init_queue, update_state=update_queue, check=check_queue)
def cmcl_loss(ctx, batch):
  """Symmetric InfoNCE between each sentence and its CMC view, over the text stream's global batch.

  Inputs (Bt sentences, E embedding width):
    z_o = project(CLS of the encoder over `text_ids`), z_m = project(CLS over the mixed sequence
    with clean words), both [Bt, E] unit norm (`cmcl` head); temp: the head's learnable,
    clamped temperature; valid = batch['text']['cmc_valid'] (at least one occurrence replaced:
    a sentence without one would be its own view, so it is left out as query and as key).
  Config: `queue_size` (default 0; > 0 = MoCo: keys from the EMA teacher, queues of Q earlier
  keys of each view, a multiple of the text batch).

  Formula: loss = 1/2 (NCE(z_o -> [k_m ; Q_m]) + NCE(z_m -> [k_o ; Q_o])), NCE = `masked_info_nce`;
  without a queue the keys are the other view's student features (k_m = z_m, k_o = z_o), other
  sentences of the global batch being the negatives.

  Returns:
    (loss, {'loss', 'o2m_accuracy', 'm2o_accuracy' (in-batch, over valid rows), 'valid' (fraction
    of the batch in the contrast), 'temp'}).
  """
  text = cmc.stream(batch, cmc.TEXT, ("cmc_valid",), "cmcl")
  valid = text["cmc_valid"].astype(bool)
  z_o = ctx.student.project_text(ctx.orig_text["states"][:, 0])
  z_m = ctx.student.project_text(ctx.mixed_clean["states"][:, 0])
  temp = ctx.student.temperature()
  queue = ctx.state
  if queue is None:
    keys_m, keys_o, key_valid = z_m, z_o, valid
  else:
    k_o, k_m = _keys(ctx)
    keys_m = jnp.concatenate([k_m, queue["mixed"]])
    keys_o = jnp.concatenate([k_o, queue["orig"]])
    key_valid = jnp.concatenate([valid, queue["valid"]])
  loss = 0.5 * (masked_info_nce(z_o, keys_m, valid, key_valid, temp)
                + masked_info_nce(z_m, keys_o, valid, key_valid, temp))
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)

  def accuracy(a, b):
    sims = jnp.where(valid[None, :], a.astype(jnp.float32) @ b.astype(jnp.float32).T, _NEG)
    hit = jnp.argmax(sims, axis=-1) == jnp.arange(a.shape[0])
    return jnp.sum(hit & valid) / count

  return loss, {"loss": loss, "o2m_accuracy": accuracy(z_o, z_m), "m2o_accuracy": accuracy(z_m, z_o),
                "valid": jnp.mean(valid.astype(jnp.float32)), "temp": jnp.asarray(temp, jnp.float32)}
