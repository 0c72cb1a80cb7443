"""Token and patch masking: statistics, exact counts, contiguity, eager == Dataset.map."""
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import ops_mask
from input_pipeline import ops_text
from input_pipeline import registry

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 101, 102, 103
LENGTH = 64


def _token_examples(num: int, seed: int = 0) -> dict:
  """[CLS] + random non-special ids, a [SEP] in the middle, then padding; lengths vary."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(200, VOCAB, (num, LENGTH)).astype(np.int32)
  lengths = rng.integers(8, LENGTH + 1, num)
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = CLS
  ids[np.arange(num), lengths // 2] = SEP
  ids = np.where(mask > 0, ids, PAD)
  seeds = np.stack([np.arange(num), np.full(num, 5)], 1).astype(np.int64)
  return {"text_ids": ids, "text_mask": mask, "_seed": seeds}


def _map_batched(op, columns: dict) -> dict:
  ds = tf.data.Dataset.from_tensor_slices(columns).map(op).batch(4096)
  parts = list(ds.as_numpy_iterator())
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


MASK_OP = f"mask_tokens(0.15, mask_id={MASK}, vocab_size={VOCAB}, special_ids=({CLS}, {SEP}))"


def test_mlm_statistics_over_1e5_tokens():
  columns = _token_examples(1700)
  out = _map_batched(registry.get_op(MASK_OP), columns)
  ids, mask, masked, labels = (columns["text_ids"], columns["text_mask"], out["mlm_ids"],
                               out["mlm_labels"])
  maskable = (mask > 0) & (ids != PAD) & (ids != CLS) & (ids != SEP)
  selected = labels != -1
  assert maskable.sum() > 50_000 and ids.size > 100_000
  # Never special or padding; labels carry the original ids; untouched elsewhere.
  assert not np.any(selected & ~maskable)
  np.testing.assert_array_equal(labels[selected], ids[selected])
  np.testing.assert_array_equal(masked[~selected], ids[~selected])
  rate = selected.sum() / maskable.sum()
  assert abs(rate - 0.15) < 0.006  # ~5 standard deviations
  n = selected.sum()
  to_mask = (masked[selected] == MASK).sum() / n
  unchanged = (masked[selected] == ids[selected]).sum() / n
  random = 1 - to_mask - unchanged
  assert abs(to_mask - 0.8) < 0.017
  assert abs(random - 0.1) < 0.013
  assert abs(unchanged - 0.1) < 0.013
  replaced = masked[selected][(masked[selected] != MASK) & (masked[selected] != ids[selected])]
  # Uniform over the whole vocabulary, specials included (BERT).
  assert replaced.min() >= 0 and replaced.max() < VOCAB
  assert (replaced < 200).mean() == pytest.approx(0.2, abs=0.05)


def test_mask_tokens_eager_equals_map_and_is_seeded():
  columns = _token_examples(6)
  op = registry.get_op(MASK_OP)
  mapped = _map_batched(op, columns)
  for i in range(6):
    eager = op({k: tf.constant(v[i]) for k, v in columns.items()})
    np.testing.assert_array_equal(eager["mlm_ids"], mapped["mlm_ids"][i])
    np.testing.assert_array_equal(eager["mlm_labels"], mapped["mlm_labels"][i])
  assert eager["mlm_ids"].dtype == tf.int32
  other = op({k: tf.constant(v[5]) for k, v in {**columns, "_seed": columns["_seed"] + 1}.items()})
  assert not np.array_equal(other["mlm_labels"], eager["mlm_labels"])


def test_mask_tokens_takes_ids_from_the_tokenizer():
  tokenizer = ops_text.load_tokenizer("sentencepiece")
  ids, mask = tokenizer.encode(["a large red circle to the left of a small blue square"] * 40,
                               16, append_sep=True)
  op = registry.get_op("mask_tokens(0.5, kind='sentencepiece')")
  outs = _map_batched(op, {"text_ids": ids, "text_mask": mask,
                           "_seed": np.stack([np.arange(40), np.zeros(40)], 1).astype(np.int64)})
  selected = outs["mlm_labels"] != -1
  assert np.any(outs["mlm_ids"] == tokenizer.mask_id)
  for special in (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id):
    assert not np.any(selected & (ids == special))


def test_mask_tokens_other_keys_and_errors():
  columns = {"tags_ids": tf.constant([CLS, 300, 301, 302]), "tags_mask": tf.ones([4], tf.int32),
             "_seed": tf.constant([1, 2], tf.int64)}
  out = registry.get_op(
      f"mask_tokens(1.0, mask_id={MASK}, vocab_size={VOCAB}, key='tags')")(columns)
  np.testing.assert_array_equal(out["tags_mlm_labels"], [CLS, 300, 301, 302])
  with pytest.raises(KeyError, match="text_ids"):
    registry.get_op(MASK_OP)({"_seed": tf.constant([1, 2])})
  with pytest.raises(ValueError, match="mask_id"):
    ops_mask.get_mask_tokens(0.15)


# ----------------------------------------------------------------------------- patches


def _seeds(num: int) -> dict:
  return {"_seed": np.stack([np.arange(num), np.full(num, 9)], 1).astype(np.int64)}


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.75, 1.0])
@pytest.mark.parametrize("strategy", ["random", "block"])
def test_patch_mask_counts_are_exact(ratio, strategy):
  grid = (8, 6)
  op = registry.get_op(f"mask_patches({ratio}, grid={grid}, strategy={strategy!r}, min_block=4)")
  masks = _map_batched(op, _seeds(64))["patch_mask"]
  assert masks.dtype == bool and masks.shape == (64, 48)
  np.testing.assert_array_equal(masks.sum(1), round(ratio * 48))


def test_random_patch_masks_cover_patches_uniformly():
  masks = _map_batched(registry.get_op("mask_patches(0.25, grid=(4, 4))"), _seeds(2000))
  frequency = masks["patch_mask"].mean(0)
  assert np.all(np.abs(frequency - 0.25) < 0.05)  # ~5 standard deviations each


def _components(mask: np.ndarray) -> int:
  """4-connected components of a boolean grid (a plain flood fill)."""
  seen = np.zeros_like(mask)
  count = 0
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    count += 1
    stack = [start]
    while stack:
      y, x = stack.pop()
      if not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]) or seen[y, x] or not mask[y, x]:
        continue
      seen[y, x] = True
      stack.extend([(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)])
  return count


def test_block_masks_are_contiguous():
  grid = (14, 14)
  block = _map_batched(registry.get_op(f"mask_patches(0.4, grid={grid}, strategy='block')"),
                       _seeds(40))["patch_mask"]
  random = _map_batched(registry.get_op(f"mask_patches(0.4, grid={grid})"),
                        _seeds(40))["patch_mask"]
  block_parts = np.mean([_components(m.reshape(grid)) for m in block])
  random_parts = np.mean([_components(m.reshape(grid)) for m in random])
  # 78 masked patches of 196: BEiT blocks give a handful of regions, random masks dozens.
  assert block_parts < 8 < 2 * 8 < random_parts


def test_patch_ops_eager_equal_map():
  for spec in ("mask_patches(0.5, grid=(4, 4), strategy='block', min_block=4)",
               "shuffle_keep_patches(0.75, grid=(4, 4))"):
    op = registry.get_op(spec)
    mapped = _map_batched(op, _seeds(3))
    for i in range(3):
      eager = op({"_seed": tf.constant(_seeds(3)["_seed"][i])})
      for key, value in eager.items():
        np.testing.assert_array_equal(value, mapped[key][i], err_msg=f"{spec} {key}")


def test_shuffle_keep_patches_is_mae_masking():
  out = _map_batched(registry.get_op("shuffle_keep_patches(0.75, grid=(4, 4))"), _seeds(50))
  keep, restore, mask = out["patch_keep_idx"], out["patch_restore_idx"], out["patch_mask"]
  assert keep.shape == (50, 4) and keep.dtype == np.int32
  for k, r, m in zip(keep, restore, mask):
    assert len(set(k)) == 4
    np.testing.assert_array_equal(np.flatnonzero(~m), np.sort(k))
    shuffle = np.argsort(r)  # restore is the inverse permutation of the shuffle
    np.testing.assert_array_equal(shuffle[:4], k)
    np.testing.assert_array_equal(shuffle[r], np.arange(16))


def test_joint_mask_is_both_masks():
  columns = {k: v[0] for k, v in _token_examples(1).items()}
  kwargs = f"mask_id={MASK}, vocab_size={VOCAB}, special_ids=({CLS}, {SEP})"
  joint = registry.get_op(f"joint_mask(0.3, 0.5, grid=(4, 4), {kwargs})")(dict(columns))
  tokens = registry.get_op(f"mask_tokens(0.3, {kwargs})")(dict(columns))
  patches = registry.get_op("mask_patches(0.5, grid=(4, 4))")(dict(columns))
  np.testing.assert_array_equal(joint["mlm_ids"], tokens["mlm_ids"])
  np.testing.assert_array_equal(joint["patch_mask"], patches["patch_mask"])
  assert joint["patch_mask"].numpy().sum() == 8
