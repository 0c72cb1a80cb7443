"""Masking ops: BERT-style token masking (MLM) and image patch masks (random, block, MAE).

Registered factories returning `fn(example) -> example` in TensorFlow ops (eager and inside
`Dataset.map`). Randomness is stateless, drawn from `example['_seed']` with a fixed salt per
op, so masks depend only on (run seed, example position).
"""
import math
import zlib

import tensorflow as tf

from input_pipeline import registry
from input_pipeline.ops_image import example_seed

_SALT_TOKENS = 21
_SALT_PATCHES = 22
_SALT_KEEP = 23


def _token_ids(kind, model, mask_id, vocab_size, special_ids, pad_id):
  """Fills the ids left as None from the tokenizer `kind` / `model`, when given.

  From a tokenizer the never-masked ids are [PAD], [CLS] and [SEP], as in BERT and ALBEF
  ([UNK] and [MASK] tokens in the text may be masked).
  """
  if mask_id is not None and vocab_size is not None:
    return mask_id, vocab_size, tuple(special_ids or ()), pad_id
  if kind is None:
    raise ValueError("mask_tokens needs either mask_id= and vocab_size= (and special_ids=) or "
                     "the tokenizer as kind= and model=")
  from input_pipeline import ops_text  # the tokenizer lives with the text ops
  tokenizer = ops_text.load_tokenizer(kind, model)
  if special_ids is None:
    special_ids = (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id)
  return (tokenizer.mask_id if mask_id is None else mask_id,
          tokenizer.vocab_size if vocab_size is None else vocab_size,
          tuple(special_ids), tokenizer.pad_id if pad_id is None else pad_id)


def mask_token_ids(ids: tf.Tensor, mask: tf.Tensor, seed, *, prob: float, mask_id: int,
                   vocab_size: int, special_ids=(), pad_id: int = 0,
                   mask_fraction: float = 0.8, random_fraction: float = 0.1):
  """BERT masking of one token sequence.

  Each position that is real (mask > 0), not `pad_id` and not in `special_ids` is selected
  with probability `prob`. A selected token becomes `mask_id` with probability
  `mask_fraction`, a uniform random id in [0, vocab_size) with probability
  `random_fraction` (specials included, as BERT does), and stays unchanged otherwise.

  Args:
    ids: int [length] token ids.
    mask: int or bool [length], 1 on real tokens.
    seed: int [2] stateless seed.

  Returns:
    (masked_ids int32 [length], labels int32 [length]): labels hold the original id at
    selected positions and -1 elsewhere.
  """
  ids = tf.cast(ids, tf.int32)
  select_seed, kind_seed, random_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  maskable = tf.logical_and(tf.cast(mask, tf.bool), tf.not_equal(ids, pad_id))
  for special in special_ids:
    maskable = tf.logical_and(maskable, tf.not_equal(ids, special))
  length = tf.shape(ids)
  selected = tf.logical_and(maskable, tf.random.stateless_uniform(length, select_seed) < prob)
  kind = tf.random.stateless_uniform(length, kind_seed)
  random_ids = tf.random.stateless_uniform(length, random_seed, 0, vocab_size, tf.int32)
  corrupted = tf.where(kind < mask_fraction, mask_id,
                       tf.where(kind < mask_fraction + random_fraction, random_ids, ids))
  masked = tf.where(selected, corrupted, ids)
  labels = tf.where(selected, ids, -1)
  return masked, labels


@registry.register("mask_tokens")
def get_mask_tokens(prob: float = 0.15, *, mask_id: int | None = None,
                    vocab_size: int | None = None, special_ids=None, pad_id: int | None = None,
                    kind: str | None = None, model: str | None = None, key: str = "text",
                    mask_fraction: float = 0.8, random_fraction: float = 0.1):
  """BERT 80/10/10 masking of `{key}_ids` (see `mask_token_ids`).

  Token ids come either explicitly (`mask_id`, `vocab_size`, `special_ids`, `pad_id`) or
  from the tokenizer named by `kind` and `model` (`ops_text.load_tokenizer`); the batch
  builder passes the configured tokenizer.

  Reads `{key}_ids`, `{key}_mask` (int32 [L]); writes `mlm_ids` and `mlm_labels` for
  key 'text', `{key}_mlm_ids` / `{key}_mlm_labels` otherwise (int32 [L], labels -1 where
  not selected).
  """
  mask_id, vocab_size, special_ids, pad_id = _token_ids(kind, model, mask_id, vocab_size,
                                                        special_ids, pad_id)
  pad_id = 0 if pad_id is None else pad_id
  prefix = "mlm" if key == "text" else f"{key}_mlm"
  # Each key masks independently (e.g. text and tags of one example).
  salt = _SALT_TOKENS if key == "text" else zlib.crc32(key.encode()) & 0x7FFFFFFF

  def fn(example):
    for field in (f"{key}_ids", f"{key}_mask"):
      if field not in example:
        raise KeyError(f"mask_tokens: example has no {field!r}; run tokenize first "
                       f"(keys: {sorted(example)})")
    seed = example_seed(example, salt, "mask_tokens")
    masked, labels = mask_token_ids(
        example[f"{key}_ids"], example[f"{key}_mask"], seed, prob=prob, mask_id=mask_id,
        vocab_size=vocab_size, special_ids=special_ids, pad_id=pad_id,
        mask_fraction=mask_fraction, random_fraction=random_fraction)
    example[f"{prefix}_ids"] = masked
    example[f"{prefix}_labels"] = labels
    return example

  return fn


# ----------------------------------------------------------------------------- patch masks


def random_patch_mask(num_patches: int, num_masked: int, seed) -> tf.Tensor:
  """bool [num_patches] with exactly `num_masked` True, uniformly over subsets."""
  noise = tf.random.stateless_uniform([num_patches], seed)
  rank = tf.argsort(tf.argsort(noise))
  return rank < num_masked


def block_patch_mask(grid, num_masked: int, seed, min_block: int = 16,
                     min_aspect: float = 0.3, attempts_per_block: int = 10) -> tf.Tensor:
  """BEiT block-wise masking, topped up to exactly `num_masked` patches.

  Repeatedly: target area ~ U(min_block, remaining), log aspect ~ U(log a, -log a),
  h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); if h < grid_h and
  w < grid_w, place the block uniformly and accept it when it adds between 1 and
  `remaining` new patches. Stops after `attempts_per_block` failures in a row. Any shortfall
  (BEiT would return fewer) is filled with uniformly random unmasked patches.

  Args:
    grid: (grid_h, grid_w) patches.
    num_masked: exact number of True entries of the result.
    seed: int [2] stateless seed.

  Returns:
    bool [grid_h * grid_w], row-major.
  """
  grid_h, grid_w = grid
  rows = tf.range(grid_h)[:, None]
  cols = tf.range(grid_w)[None, :]
  log_aspect = math.log(min_aspect)
  block_seed, fill_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def cond(mask, count, failures, step):
    return tf.logical_and(count < num_masked, failures < attempts_per_block)

  def body(mask, count, failures, step):
    draws = tf.random.stateless_uniform(
        [4], tf.random.experimental.stateless_fold_in(block_seed, step), dtype=tf.float64)
    remaining = tf.cast(num_masked - count, tf.float64)
    area = min_block + (remaining - min_block) * draws[0]
    aspect = tf.exp(log_aspect - 2 * log_aspect * draws[1])
    h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    top = tf.cast(tf.floor(draws[2] * tf.cast(grid_h - h + 1, tf.float64)), tf.int32)
    left = tf.cast(tf.floor(draws[3] * tf.cast(grid_w - w + 1, tf.float64)), tf.int32)
    block = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w))
    added = tf.reduce_sum(tf.cast(block & ~mask, tf.int32))
    accept = (h < grid_h) & (w < grid_w) & (added > 0) & (added <= num_masked - count)
    mask = tf.where(accept, mask | block, mask)
    count = tf.where(accept, count + added, count)
    failures = tf.where(accept, 0, failures + 1)
    return mask, count, failures, step + 1

  mask, count, _, _ = tf.while_loop(
      cond, body, (tf.zeros([grid_h, grid_w], tf.bool), tf.constant(0), tf.constant(0),
                   tf.constant(0)))
  mask = tf.reshape(mask, [-1])
  # Top up: the unmasked patches with the smallest noise, as many as are missing.
  noise = tf.random.stateless_uniform([grid_h * grid_w], fill_seed)
  noise = tf.where(mask, 2.0, noise)
  rank = tf.argsort(tf.argsort(noise))
  return mask | (rank < num_masked - count)


def num_masked_patches(ratio: float, num_patches: int) -> int:
  return int(round(ratio * num_patches))


@registry.register("mask_patches")
def get_mask_patches(ratio: float, grid=(16, 16), strategy: str = "random", min_block: int = 16,
                     key: str = "patch_mask"):
  """Writes `example[key]`, bool [grid_h * grid_w] with exactly round(ratio * N) True.

  strategy 'random': a uniform random subset; 'block': BEiT block-wise (`block_patch_mask`).
  """
  grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
  num_patches = grid[0] * grid[1]
  count = num_masked_patches(ratio, num_patches)
  if strategy not in ("random", "block"):
    raise ValueError(f"mask_patches: unknown strategy {strategy!r}; use 'random' or 'block'")
  if not 0 <= count <= num_patches:
    raise ValueError(f"mask_patches: ratio {ratio} outside [0, 1]")

  def fn(example):
    seed = example_seed(example, _SALT_PATCHES, "mask_patches")
    if strategy == "random":
      mask = random_patch_mask(num_patches, count, seed)
    else:
      mask = block_patch_mask(grid, count, seed, min_block)
    mask.set_shape([num_patches])
    example[key] = mask
    return example

  return fn


@registry.register("joint_mask")
def get_joint_mask(text_prob: float = 0.15, patch_ratio: float = 0.5, grid=(16, 16),
                   strategy: str = "random", min_block: int = 16, **token_ids):
  """`mask_tokens(text_prob, **token_ids)` and `mask_patches(patch_ratio, ...)` together.

  For joint masked modelling (MAMO): both modalities of one example are masked at once.
  """
  tokens = get_mask_tokens(text_prob, **token_ids)
  patches = get_mask_patches(patch_ratio, grid, strategy, min_block)
  return lambda example: patches(tokens(example))


@registry.register("shuffle_keep_patches")
def get_shuffle_keep_patches(ratio: float = 0.75, grid=(16, 16), prefix: str = "patch"):
  """MAE random masking by shuffling (ViCHA's MAE branch).

  With noise ~ U[0, 1)^N, shuffle = argsort(noise), keep = int(N * (1 - ratio)):
  `{prefix}_keep_idx` int32 [keep] = shuffle[:keep] (the visible patches, in shuffled order),
  `{prefix}_restore_idx` int32 [N] = argsort(shuffle) (puts [visible ; mask tokens] back in
  place), `{prefix}_mask` bool [N] True on the removed patches. ViCHA's config writes
  prefix='mae': a `patch_mask` would make the context's `masked_image` mask the image that MLM
  and MAMO's objectives see.
  """
  grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
  num_patches = grid[0] * grid[1]
  keep = int(num_patches * (1 - ratio))  # MAE and ViCHA: len_keep = int(L * (1 - mask_ratio))

  def fn(example):
    seed = example_seed(example, _SALT_KEEP, "shuffle_keep_patches")
    shuffle = tf.argsort(tf.random.stateless_uniform([num_patches], seed))
    restore = tf.argsort(shuffle)
    example[f"{prefix}_keep_idx"] = tf.ensure_shape(shuffle[:keep], [keep])
    example[f"{prefix}_restore_idx"] = tf.ensure_shape(restore, [num_patches])
    example[f"{prefix}_mask"] = tf.ensure_shape(restore >= keep, [num_patches])
    return example

  return fn
