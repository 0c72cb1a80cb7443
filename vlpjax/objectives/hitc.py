"""Hierarchical image-text contrastive loss (ViCHA's H-ITC, docs/method_spec.md §2.2, App. E 11, H #7).

Per level l (the `hitc` head's level pairs, `vlpjax/models/hitc.py`), the intermediate CLS
features of both towers are contrasted with a symmetric InfoNCE over the global batch: no queue,
no momentum teacher, no distillation, the model's (shared, clamped) ITC temperature.

Two behaviours of ViCHA's released code, and what is done here:
  * Labels. ViCHA all-gathers the keys but takes the positive of local row i to be column i on
    every GPU (its one-hot targets are `fill_diagonal_` of the [b, b * world] matrix), which is
    right on rank 0 only. Here row r of the global batch has its positive at column r (global
    offsets). `rank_bug_parity=True` reproduces the released labels instead: row r = g * b + i of
    data shard g (b = B / ctx.num_groups rows per shard) gets column i.
  * Key gradient. ViCHA's `concat_all_gather` returns tensors without gradient, at every world
    size (also on one GPU): the loss reaches a feature only as a query (image features through the
    i2t rows, text features through the t2i rows). `key_gradient=False` (default) does the same
    with stop_gradient on the keys; `key_gradient=True` differentiates through both sides.
"""
import jax
import jax.numpy as jnp

from vlpjax.models import hitc as hitc_head
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry


def contrastive_labels(batch_size: int, num_groups: int, rank_bug_parity: bool) -> jax.Array:
  """int32 [B]: the positive column of each row (see the module docstring)."""
  rows = jnp.arange(batch_size, dtype=jnp.int32)
  if not rank_bug_parity:
    return rows
  if batch_size % num_groups:
    raise ValueError(f"objective 'hitc': batch {batch_size} is not a multiple of the {num_groups} data shards")
  return rows % (batch_size // num_groups)


def level_losses(image_feats: jax.Array, text_feats: jax.Array, temp: jax.Array, labels: jax.Array, *,
                 key_gradient: bool = False) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE of every level.

  Args:
    image_feats, text_feats: [levels, B, E] unit features.
    temp: scalar temperature.
    labels: int [B], the positive column of each row.
    key_gradient: differentiate through the keys too (else they are stop_gradient'ed).

  Returns:
    (loss [levels], accuracy [levels]): per level,
      i2t = image @ sg(text).T / temp, t2i = text @ sg(image).T / temp  ([B, B]),
      loss_l = mean_b 1/2 (-log softmax(i2t_b)[labels_b] - log softmax(t2i_b)[labels_b]),
    and the mean of the two directions' top-1 accuracy against the labels.
  """
  image_feats = image_feats.astype(jnp.float32)
  text_feats = text_feats.astype(jnp.float32)
  keys = (lambda x: x) if key_gradient else jax.lax.stop_gradient
  temp = jnp.asarray(temp, jnp.float32)
  i2t = jnp.einsum("lbe,lce->lbc", image_feats, keys(text_feats)) / temp
  t2i = jnp.einsum("lbe,lce->lbc", text_feats, keys(image_feats)) / temp

  def cross_entropy(logits):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0], axis=-1)

  def accuracy(logits):
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels[None, :], axis=-1)

  return (0.5 * (cross_entropy(i2t) + cross_entropy(t2i)),
          0.5 * (accuracy(i2t) + accuracy(t2i)))


@context_lib.feature("hitc_feats")
def hitc_feats(ctx):
  """(image [levels, B, E], text [levels, B, E]): the student's per-level features, from the
  VC-augmented image pass (`ctx.image`) and the clean text pass (`ctx.text`)."""
  return ctx.student.apply(hitc_head.hitc_features, ctx.image["layer_cls"], ctx.text["layer_cls"])


def _check(cfg, config) -> None:
  from vlpjax.models import vlp
  model = vlp.build_config(config.model)
  if hitc_head.NAME in model.heads:
    settings = model.head_cfg(hitc_head.NAME)
    hitc_head.check_levels(settings, model.vision.depth, model.text.text_layers)
    weights = cfg.get("level_weights", None)
    if weights is not None and len(tuple(weights)) != settings.num_levels:
      raise ValueError(f"config.objectives.hitc.level_weights has {len(tuple(weights))} entries but the hitc "
                       f"head has {settings.num_levels} levels (config.model.head_config.hitc)")


@registry.register("hitc", heads=("hitc", "itc"), check=_check)
def hitc_loss(ctx, batch):
  """Weighted sum over levels of the symmetric in-batch InfoNCE of the hierarchical features.

  Inputs: ctx.hitc_feats (image, text [levels, B, E]), ctx.temp, ctx.num_groups.
  Config: `level_weights` (default all 1), `rank_bug_parity` (default False), `key_gradient`
  (default False); the objective's `weight` (ViCHA 0.1) multiplies the whole sum.

  Formula: loss = sum_l level_weights[l] * loss_l with loss_l from `level_losses` and labels from
  `contrastive_labels` (ViCHA: L_itc += 0.1 * sum_l w_l (L_i2t^l + L_t2i^l) / 2).

  Returns:
    (loss, {'loss', 'level{l}_loss', 'level{l}_accuracy' for each level}).
  """
  del batch
  cfg = ctx.cfg
  image_feats, text_feats = ctx.hitc_feats
  levels, batch_size = image_feats.shape[:2]
  weights = cfg.get("level_weights", None)
  weights = jnp.ones([levels], jnp.float32) if weights is None else jnp.asarray(tuple(weights), jnp.float32)
  if weights.shape != (levels,):
    raise ValueError(f"objective 'hitc': level_weights has {weights.shape[0]} entries for {levels} levels")
  labels = contrastive_labels(batch_size, ctx.num_groups, bool(cfg.get("rank_bug_parity", False)))
  losses, accuracies = level_losses(image_feats, text_feats, ctx.temp, labels,
                                    key_gradient=bool(cfg.get("key_gradient", False)))
  loss = jnp.sum(weights * losses)
  metrics = {"loss": loss}
  for level in range(levels):
    metrics[f"level{level}_loss"] = losses[level]
    metrics[f"level{level}_accuracy"] = accuracies[level]
  return loss, metrics
