"""Image-text retrieval evaluation: embed, score all pairs with ITC, optionally ITM-rerank top-k.

Protocol (ALBEF, docs/method_spec.md §1.4 and Appendix G):
  TR@k: for each image, hit if the best-ranked of its ground-truth captions is in the top k.
  IR@k: for each caption, hit if its image is in the top k.
  r_mean: mean of the six recalls.
With `k_test > 0` the top-k candidates of each image (and of each caption) by ITC similarity are
rescored with the raw ITM "match" logit and everything else gets -100, as ALBEF's evaluation does.

Everything heavy stays on the accelerator: embeddings are computed in fixed-size jitted batches
and kept on device (patch and token states included, for the rerank), ITC similarities and top-k
run under jit, and the ITM rerank scores the distinct (image, text) pairs of both directions in
fixed-size jitted batches that gather their states on device. Only index arrays go to the
device and only the top-k indices and the recall ranks come back. A `Scorer` holds the jitted
functions of one model and k_test; every shape they see is fixed by the split and the batch
sizes, so an `Evaluator` (a Scorer plus the eval data) compiles once and re-evaluates new params
without compiling. With a `mesh`, every batch is split over the mesh's batch axes; params stay
in their own sharding (see `common`).
"""
import functools
import inspect
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlpjax import sharding as sharding_lib
from vlpjax.evaluators import common

# ALBEF's score for pairs outside the top-k of a row.
OUTSIDE_TOP_K = -100.0
_NO_CAPTION_RANK = np.iinfo(np.int32).max


def _flatten_img2txt(img2txt: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(image index, caption index) int32 [num_ground_truth_pairs] of the ragged `img2txt`."""
  lengths = np.asarray([len(captions) for captions in img2txt], np.int64)
  images = np.repeat(np.arange(len(img2txt), dtype=np.int32), lengths)
  captions = np.concatenate([np.asarray(c, np.int32) for c in img2txt]) if lengths.sum() else np.zeros([0], np.int32)
  return images, captions


def _ranks_impl(scores_i2t, scores_t2i, txt2img, gt_images, gt_captions):
  """Pessimistic 0-based ranks; see `retrieval_ranks`."""
  scores_i2t = scores_i2t.astype(jnp.float32)
  scores_t2i = scores_t2i.astype(jnp.float32)
  num_images = scores_i2t.shape[0]
  own = scores_i2t[gt_images, gt_captions]  # [G]: each ground-truth caption under its image
  best = jax.ops.segment_max(own, gt_images, num_segments=num_images)  # [I]
  at_least_best = jnp.sum(scores_i2t >= best[:, None], axis=1)
  ground_truth_at_best = jax.ops.segment_sum((own >= best[gt_images]).astype(jnp.int32), gt_images,
                                             num_segments=num_images)
  has_caption = jax.ops.segment_sum(jnp.ones_like(gt_images), gt_images, num_segments=num_images) > 0
  ranks_i2t = jnp.where(has_caption, at_least_best - ground_truth_at_best, _NO_CAPTION_RANK)
  target = jnp.take_along_axis(scores_t2i, txt2img[:, None], axis=1)  # [T, 1]
  ranks_t2i = jnp.sum(scores_t2i >= target, axis=1) - 1
  return ranks_i2t, ranks_t2i


_ranks = jax.jit(_ranks_impl)


def retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """0-based rank of the ground truth in each query's ranking, ties counted against it.

  Args:
    scores_i2t: [num_images, num_texts]; scores_t2i: [num_texts, num_images] (numpy or jax).
    txt2img: int [num_texts], the image of each caption.
    img2txt: for each image, the indices of its captions.

  Returns:
    (ranks_i2t int [num_images], ranks_t2i int [num_texts]):
      ranks_i2t[i] = #{t not a caption of i : s_i2t[i, t] >= max_{c caption of i} s_i2t[i, c]}
      ranks_t2i[t] = #{i != txt2img[t] : s_t2i[t, i] >= s_t2i[t, txt2img[t]]}
    A hit at k is rank < k. Counting ties against the ground truth keeps constant scores (the
    -100 fill outside the top-k) from producing hits by index order. An image without captions
    gets rank int32 max (never a hit).
  """
  gt_images, gt_captions = _flatten_img2txt(img2txt)
  ranks_i2t, ranks_t2i = _ranks(scores_i2t, scores_t2i, jnp.asarray(np.asarray(txt2img, np.int32)),
                                jnp.asarray(gt_images), jnp.asarray(gt_captions))
  return np.asarray(ranks_i2t), np.asarray(ranks_t2i)


def recall_at_k(scores_i2t, scores_t2i, txt2img, img2txt: list[list[int]], ks=(1, 5, 10)) -> dict[str, float]:
  """Recall metrics in percent: txt_r{k} (TR@k), img_r{k} (IR@k), their means and r_mean.

  Args: as `retrieval_ranks`; ks: the cut-offs.
  """
  return recalls_from_ranks(*retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt), ks=ks)


def recalls_from_ranks(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """`recall_at_k`'s metrics from the ranks of `retrieval_ranks` (a hit at k is rank < k)."""
  out = {}
  for k in ks:
    out[f"txt_r{k}"] = 100.0 * float(np.mean(ranks_i2t < k))
    out[f"img_r{k}"] = 100.0 * float(np.mean(ranks_t2i < k))
  out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
  out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
  return out


# ----------------------------------------------------------------------------- embeddings

# Keys of the eval batches that are bookkeeping, not model inputs.
IMAGE_BOOKKEEPING = ("valid", "image_index")
TEXT_BOOKKEEPING = ("valid", "text_index")


def make_embed_fns(model, *, keep_states: bool):
  """Jitted `embed_images(params, images, extra=None)` and `embed_texts(params, ids, mask)`.

  `extra` holds any further image-side inputs of the eval image batches (e.g. ViCHA's
  `concept_ids`, `concept_mask`); they are passed to `model.encode_image` as keyword arguments,
  and nothing is passed when there are none.

  Returns dicts: feat [B, embed_dim] (unit norm, float32) and, with `keep_states`, the encoder
  states [B, tokens, width] the ITM rerank fuses.
  """

  def embed_images(params, images, extra=None):
    out = model.apply({"params": params}, images, **(extra or {}), method=model.encode_image)
    feat = model.apply({"params": params}, out["states"][:, 0], method=model.project_image)
    return dict(feat=feat, states=out["states"]) if keep_states else dict(feat=feat)

  def embed_texts(params, ids, mask):
    out = model.apply({"params": params}, ids, mask, method=model.encode_text)
    feat = model.apply({"params": params}, out["states"][:, 0], method=model.project_text)
    return dict(feat=feat, states=out["states"]) if keep_states else dict(feat=feat)

  return jax.jit(embed_images), jax.jit(embed_texts)


def embed_all(batches: Iterable[dict], embed: Callable[[dict], dict], mesh: Optional[Mesh] = None,
              bookkeeping: tuple[str, ...] = ("valid",)) -> tuple[dict[str, jax.Array], np.ndarray]:
  """Runs `embed` over fixed-size padded batches and keeps every output on device.

  Args:
    batches: dicts with `valid` bool [B] (False on padding rows) and the model inputs.
    embed: dict of the batch's inputs (every key but `bookkeeping`, put with the batch sharding)
      -> dict of [B, ...] device arrays.
    mesh: optional; batches are split over its batch axes.
    bookkeeping: keys that are not sent to the device.

  Returns:
    (outputs, rows): outputs[k] [num_batches * B, ...] with padding rows included; rows int
    [num_valid], the output row of the n-th valid example (valid rows in batch order).
  """
  parts: dict[str, list[jax.Array]] = {}
  valid = []
  for inputs, batch in common.device_batches(batches, None, mesh, "retrieval evaluation", exclude=bookkeeping):
    valid.append(np.asarray(batch["valid"]).astype(bool))
    for key, value in common.settle(embed(inputs)).items():
      parts.setdefault(key, []).append(value)
  if not valid:
    raise ValueError("retrieval evaluation: no batches")
  outputs = {k: v[0] if len(v) == 1 else jnp.concatenate(v) for k, v in parts.items()}
  return outputs, np.flatnonzero(np.concatenate(valid))


# ----------------------------------------------------------------------------- scores


@functools.partial(jax.jit, static_argnames=("k",))
def itc_similarities(image_feat, text_feat, k: int = 0):
  """ITC similarities [I, T] (float32, no temperature) and, with k > 0, the top-k indices.

  Returns:
    (sims, i2t_top [I, min(k, T)], t2i_top [T, min(k, I)]); the tops are None when k == 0.
    Equal scores keep the lower index first (XLA's TopK).
  """
  return _itc_similarities(image_feat, text_feat, k)


def _itc_similarities(image_feat, text_feat, k: int):
  sims = image_feat.astype(jnp.float32) @ text_feat.astype(jnp.float32).T
  if not k:
    return sims, None, None
  i2t_top = jax.lax.top_k(sims, min(k, sims.shape[1]))[1]
  t2i_top = jax.lax.top_k(sims.T, min(k, sims.shape[0]))[1]
  return sims, i2t_top, t2i_top


def _valid_similarities(image_feat, text_feat, image_rows, text_rows, *, k: int, mesh: Optional[Mesh]):
  """`itc_similarities` of the valid rows; ITC-only: (sims, sims.T), rerank: (sims, tops...).

  The top-k indices are read by the host, so they are replicated.
  """
  sims, i2t_top, t2i_top = _itc_similarities(image_feat[image_rows], text_feat[text_rows], k)
  if not k:
    return sims, sims.T
  return sims, common.replicate_output(i2t_top, mesh), common.replicate_output(t2i_top, mesh)


def make_pair_score_fn(model):
  """Jitted (params, image_states [R,N,Dv], text_states [S,L,D], text_mask [S,L], image_rows [n],
  text_rows [n]) -> ITM "match" logit [n] of the pairs (image_rows[j], text_rows[j]).

  The states of each pair are gathered on device, so only the row indices travel per batch.
  """
  if "itm" not in model.config.heads:
    raise ValueError(f"ITM rerank (k_test > 0) needs the 'itm' head; config.model.heads = {model.config.heads}")

  def score(params, image_states, text_states, text_mask, image_rows, text_rows):
    fused = model.apply({"params": params}, text_states[text_rows], text_mask[text_rows], image_states[image_rows],
                        method=model.fuse)
    return model.apply({"params": params}, fused["text_states"][:, 0], method=model.itm_logits)[:, 1]

  return jax.jit(score)


def supports_image_cache(model) -> bool:
  """Whether the rerank can reuse each image's fusion keys and values: cross fusion, a
  `fusion_image_cache` method and a `fuse` that takes `image_cache` (`VLPModel` has both)."""
  if getattr(getattr(model, "config", None), "fusion", None) != "cross":
    return False
  if not callable(getattr(model, "fusion_image_cache", None)):
    return False
  return "image_cache" in inspect.signature(model.fuse).parameters


def make_image_cache_fn(model, mesh: Optional[Mesh]):
  """Jitted (params, image_states [R,N,Dv], start, *, block) -> the fusion's per-layer
  cross-attention `KeyValue` [block, N, heads, head_dim] of image rows start .. start + block - 1
  (replicated: every device gathers its pairs' images from it). `block` is static."""

  def image_cache(params, image_states, start, *, block):
    states = jax.lax.dynamic_slice_in_dim(image_states, start, block, axis=0)
    return common.replicate_output(model.apply({"params": params}, states, method=model.fusion_image_cache), mesh)

  return jax.jit(image_cache, static_argnames="block")


def make_cached_pair_score_fn(model):
  """Jitted (params, image_cache, text_states [S',L,D], text_mask [S',L], group_images [G],
  group_texts [G, S]) -> ITM "match" logit [G * S] of the pairs (group_images[g], group_texts[g, s])
  in that order.

  `image_cache` is `make_image_cache_fn`'s block of per-layer keys and values; group_images index
  its rows. Each group's S texts attend to one gathered copy of their image's keys and values
  (`CrossFusion`): no key/value projection of the image per pair.
  """
  if "itm" not in model.config.heads:
    raise ValueError(f"ITM rerank (k_test > 0) needs the 'itm' head; config.model.heads = {model.config.heads}")

  def score(params, image_cache, text_states, text_mask, group_images, group_texts):
    cache = jax.tree.map(lambda x: x[group_images], image_cache)   # [G, N, heads, head_dim] per layer
    rows = group_texts.reshape(-1)
    fused = model.apply({"params": params}, text_states[rows], text_mask[rows], None, image_cache=cache,
                        method=model.fuse)
    return model.apply({"params": params}, fused["text_states"][:, 0], method=model.itm_logits)[:, 1]

  return jax.jit(score)


def group_pairs_by_image(image_rows: np.ndarray, text_rows: np.ndarray, *, num_rows: int, block: int,
                         texts_per_group: int, groups_per_chunk: int) -> dict[str, np.ndarray]:
  """The cached rerank's plan: pairs grouped by image, groups packed into chunks per image block.

  The image rows 0 .. num_rows - 1 are cut into blocks of `block` rows (block b starts at
  min(b * block, num_rows - block), so the last one may overlap its neighbour); each block's
  keys and values are computed once. Each image's pairs are cut into groups of
  `texts_per_group` (S) texts, the last padded, and each block's groups into chunks of
  `groups_per_chunk` (G) groups, the last padded; padding is image 0 / text row 0 and unused.

  Args:
    image_rows, text_rows: int [n], the pairs (rows of the embedded image / text states).
    num_rows: image rows R; block: rows per cache block (<= R).

  Returns dict:
    starts int [blocks]: each block's first row;
    chunk_block int [chunks]: the block of each chunk (chunks ordered by block);
    chunk_images int32 [chunks, G]: each group's image, a row of its block's cache (row - start);
    chunk_texts int32 [chunks, G, S]: each group's text rows;
    slots int [n]: pair j's logit lands at slots[j] of the flattened [chunks, G * S] outputs.
  """
  image_rows, text_rows = np.asarray(image_rows, np.int64), np.asarray(text_rows, np.int64)
  size, per_chunk = int(texts_per_group), int(groups_per_chunk)
  num_blocks = -(-num_rows // block)
  starts = np.minimum(np.arange(num_blocks) * block, num_rows - block)
  n = len(image_rows)
  if not n:
    return dict(starts=starts, chunk_block=np.zeros([0], np.int64), chunk_images=np.zeros([0, per_chunk], np.int32),
                chunk_texts=np.zeros([0, per_chunk, size], np.int32), slots=np.zeros([0], np.int64))
  order = np.argsort(image_rows, kind="stable")
  rows, texts = image_rows[order], text_rows[order]
  run_start = np.r_[True, rows[1:] != rows[:-1]]                    # first pair of each image
  position = np.arange(n) - np.flatnonzero(run_start)[np.cumsum(run_start) - 1]   # within its image
  within = position % size                                           # slot within its group
  group_start = within == 0
  group = np.cumsum(group_start) - 1                                 # each pair's group
  group_rows = rows[group_start]
  group_blocks = group_rows // block
  block_start = np.r_[True, group_blocks[1:] != group_blocks[:-1]]   # first group of each block
  first = np.flatnonzero(block_start)
  block_of_run = np.cumsum(block_start) - 1
  rank = np.arange(len(group_rows)) - first[block_of_run]            # group's rank within its block
  chunks_per_block = -(-np.diff(np.r_[first, len(group_rows)]) // per_chunk)
  chunk_offset = np.r_[0, np.cumsum(chunks_per_block)[:-1]]
  group_chunk = chunk_offset[block_of_run] + rank // per_chunk
  group_position = rank % per_chunk
  num_chunks = int(chunks_per_block.sum())
  chunk_images = np.zeros([num_chunks, per_chunk], np.int32)
  chunk_images[group_chunk, group_position] = group_rows - starts[group_blocks]
  chunk_texts = np.zeros([num_chunks, per_chunk, size], np.int32)
  chunk_texts[group_chunk[group], group_position[group], within] = texts
  slots = np.empty(n, np.int64)
  slots[order] = (group_chunk[group] * per_chunk + group_position[group]) * size + within
  return dict(starts=starts, chunk_block=np.repeat(group_blocks[first], chunks_per_block),
              chunk_images=chunk_images, chunk_texts=chunk_texts, slots=slots)


def most_grouped_chunks(num_pairs: int, num_images: int, num_blocks: int, texts_per_group: int,
                        groups_per_chunk: int) -> int:
  """An upper bound on `group_pairs_by_image`'s chunks for at most `num_pairs` pairs of
  `num_images` images: sum_i ceil(m_i / S) <= (P + I (S - 1)) / S groups, and each of the blocks
  adds at most G - 1 padding groups."""
  groups = (num_pairs + num_images * (texts_per_group - 1)) // texts_per_group
  return (groups + num_blocks * (groups_per_chunk - 1)) // groups_per_chunk


def default_texts_per_group(itm_batch_size: int, shards: int, most: int = 16) -> int:
  """The largest S <= `most` that leaves itm_batch_size / S groups splitting over `shards`."""
  per_shard = itm_batch_size // shards
  return max(s for s in range(1, min(most, per_shard) + 1) if per_shard % s == 0)


def unique_top_k_pairs(i2t_top: np.ndarray, t2i_top: np.ndarray, num_texts: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The distinct (image, text) pairs of both top-k lists, each pair once.

  Args:
    i2t_top: int [I, k1] top texts of each image; t2i_top: int [T, k2] top images of each text.
    num_texts: T.

  Returns:
    (images [n], texts [n], inverse [I * k1 + T * k2]): pair j of the flattened lists
    (i2t_top row-major, then t2i_top) is (images[inverse[j]], texts[inverse[j]]).
  """
  i2t_top, t2i_top = np.asarray(i2t_top, np.int64), np.asarray(t2i_top, np.int64)
  i2t_keys = np.arange(len(i2t_top))[:, None] * num_texts + i2t_top    # [I, k1]: image * T + text
  t2i_keys = t2i_top * num_texts + np.arange(len(t2i_top))[:, None]    # [T, k2]
  unique, inverse = np.unique(np.concatenate([i2t_keys.ravel(), t2i_keys.ravel()]), return_inverse=True)
  return unique // num_texts, unique % num_texts, inverse.astype(np.int32)


def _write_chunk(buffer, values, index, *, mesh: Optional[Mesh]):
  """buffer [chunks, chunk] with row `index` = values [chunk].

  Each row is split over the mesh's batch axes like the chunk of pair scores written into it,
  so the write is local to every device (no collective in the per-chunk loop).
  """
  out = jax.lax.dynamic_update_index_in_dim(buffer, values.astype(buffer.dtype), index, axis=0)
  if mesh is None:
    return out
  return jax.lax.with_sharding_constraint(out, common.chunk_rows_sharding(mesh))


def _top_k_scores(pair_logits, inverse, i2t_top, t2i_top):
  """ALBEF's rerank matrices from the logits of the distinct pairs.

  Args:
    pair_logits: float32 [chunks, chunk], the ITM logits of the distinct pairs (flattened; other
      entries unused).
    inverse: int [I * k1 + T * k2], for each entry of the flattened top-k lists (i2t_top row-major,
      then t2i_top) the flat position of its pair's logit: `unique_top_k_pairs`'s inverse when
      distinct pair p is at p, the `group_pairs_by_image` slots of that inverse with the cache.
    i2t_top: int [I, k1]; t2i_top: int [T, k2].

  Returns:
    (scores_i2t [I, T], scores_t2i [T, I]) float32: OUTSIDE_TOP_K (-100) everywhere except
      scores_i2t[i, i2t_top[i, j]] and scores_t2i[t, t2i_top[t, j]], which get their pair's logit.
  """
  num_images, num_texts = i2t_top.shape[0], t2i_top.shape[0]
  logits = pair_logits.reshape(-1)[inverse]
  split = i2t_top.size

  def scatter(shape, top, values):
    rows = jnp.arange(top.shape[0])[:, None]
    return jnp.full(shape, OUTSIDE_TOP_K, jnp.float32).at[rows, top].set(values)

  return (scatter((num_images, num_texts), i2t_top, logits[:split].reshape(i2t_top.shape)),
          scatter((num_texts, num_images), t2i_top, logits[split:].reshape(t2i_top.shape)))


class Scorer:
  """The jitted retrieval scoring of one model: built once, reused for every params and split.

  `scores(params, image_batches, text_batches)` gives the score matrices; `recalls` turns them
  into the metrics. The functions (`functions`, name -> jitted function) see shapes fixed by the
  split and the batch sizes only: the distinct top-k pairs (their number changes with the
  params) are scored in fixed-size chunks written into a buffer with room for the most chunks
  there can be (every pair distinct), so new params never compile anything.

  Image key/value cache (cross fusion): each fusion layer's cross-attention keys and values of an
  image are a projection of its states alone, the same for every text, so the rerank computes
  them once per image per evaluation (`image_cache` function, per block of `cache_block` image
  rows) instead of once per pair; the distinct pairs are grouped by image, `texts_per_group`
  texts of one image to a group, and a chunk of `itm_batch_size` pairs fuses its groups
  against their gathered images' keys and values (`make_cached_pair_score_fn`). This serves
  both directions: image->text pairs and text->image pairs are the same (image, text) pairs,
  ordered by image. The merged (single-stream) fusion has no cross-attention: its image tokens
  are transformed together with the text in every layer, so nothing per image can be reused;
  such models (and any model without `fusion_image_cache`) score every pair in full.

  Args:
    model: a VLPModel, or any model with encode_image, encode_text, project_image, project_text
      (and, for the rerank, fuse and itm_logits; for the cache, fusion_image_cache and a fuse
      taking image_cache).
    k_test: 0 = ITC similarities; > 0 = ALBEF's ITM rerank of the top-k in both directions.
    itm_batch_size: pairs per jitted ITM call.
    mesh: optional; batches are split over its batch axes (sizes must divide).
    image_cache: None = use the image key/value cache where the model supports it
      (`supports_image_cache`); False = score every pair in full; True = require the cache.
    texts_per_group: S, texts fused per gathered image (must divide itm_batch_size into a number
      of groups that splits over the mesh's batch shards); 0 = `default_texts_per_group`.
    cache_block: image rows whose keys and values are held at once (bounds the cache's memory:
      rows x fusion layers x 2 x tokens x width).
  """

  def __init__(self, model, *, k_test: int = 0, itm_batch_size: int = 128, mesh: Optional[Mesh] = None,
               image_cache: Optional[bool] = None, texts_per_group: int = 0, cache_block: int = 128):
    self.model, self.k_test, self.itm_batch_size, self.mesh = model, int(k_test), int(itm_batch_size), mesh
    if self.k_test < 0:
      raise ValueError(f"k_test (config.eval.k_test) must be >= 0, got {self.k_test}")
    supported = supports_image_cache(model)
    if image_cache and not supported:
      raise ValueError(f"image_cache=True: the model ({type(model).__name__}, fusion "
                       f"{getattr(getattr(model, 'config', None), 'fusion', None)!r}) has no image key/value cache "
                       "(cross fusion with fusion_image_cache)")
    self.image_cache = bool(self.k_test and supported and image_cache is not False)
    self.cache_block = int(cache_block)
    if self.cache_block < 1:
      raise ValueError(f"cache_block must be >= 1, got {cache_block}")
    embed_images, embed_texts = make_embed_fns(model, keep_states=self.k_test > 0)
    self.functions = dict(
        embed_images=embed_images, embed_texts=embed_texts,
        similarities=jax.jit(functools.partial(_valid_similarities, k=self.k_test, mesh=mesh)),
        ranks=jax.jit(common.with_replicated_outputs(_ranks_impl, mesh)))
    if self.k_test:
      common.check_divisible(self.itm_batch_size, mesh, "ITM batch size")
      self.functions.update(
          pair_scores=make_cached_pair_score_fn(model) if self.image_cache else make_pair_score_fn(model),
          write_chunk=jax.jit(functools.partial(_write_chunk, mesh=mesh), donate_argnums=0),
          top_k_scores=jax.jit(_top_k_scores))
    if self.image_cache:
      shards = sharding_lib.num_batch_shards(mesh) if mesh is not None else 1
      self.texts_per_group = int(texts_per_group) or default_texts_per_group(self.itm_batch_size, shards)
      groups, rest = divmod(self.itm_batch_size, self.texts_per_group)
      if self.texts_per_group < 1 or rest or groups % shards:
        raise ValueError(f"texts_per_group={texts_per_group} must divide the ITM batch size {self.itm_batch_size} "
                         f"into a number of groups divisible by the {shards} batch shards")
      self.groups_per_chunk = groups
      self.functions["image_cache"] = make_image_cache_fn(model, mesh)

  def embed_images(self, params, batches: Iterable[dict]) -> tuple[dict[str, jax.Array], np.ndarray]:
    """`embed_all` of the image batches: image plus any extra image-side inputs (e.g. concept_ids)."""
    embed = self.functions["embed_images"]
    return embed_all(batches, lambda b: embed(params, b.pop("image"), b), self.mesh, IMAGE_BOOKKEEPING)

  def embed_texts(self, params, batches: Iterable[dict]) -> tuple[dict[str, jax.Array], np.ndarray]:
    """`embed_all` of the caption batches (their mask kept as output `mask`, for the rerank)."""
    embed = self.functions["embed_texts"]
    return embed_all(batches, lambda b: dict(embed(params, b["text_ids"], b["text_mask"]), mask=b["text_mask"]),
                     self.mesh, TEXT_BOOKKEEPING)

  def similarities(self, images: dict, image_rows: np.ndarray, texts: dict, text_rows: np.ndarray):
    """ITC-only: (scores_i2t, scores_t2i); rerank: (sims [I, T], i2t_top [I, k1], t2i_top [T, k2])."""
    return self.functions["similarities"](images["feat"], texts["feat"], image_rows.astype(np.int32),
                                          text_rows.astype(np.int32))

  def rerank(self, params, images: dict, image_rows: np.ndarray, texts: dict, text_rows: np.ndarray,
             i2t_top: jax.Array, t2i_top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ALBEF's rerank: the top-k of each row rescored by ITM, every other entry OUTSIDE_TOP_K (-100).

    The distinct pairs of both directions (a pair in both top-k lists is scored once) are scored
    in `itm_batch_size` chunks, dispatched without waiting for each other; only the top-k
    indices come to the host (to find the distinct pairs) and only pair indices go back. With
    the image cache the pairs are grouped by image (`group_pairs_by_image`).

    Returns:
      (scores_i2t [I, T], scores_t2i [T, I]), float32 on device.
    """
    fns, mesh, chunk = self.functions, self.mesh, self.itm_batch_size
    pair_images, pair_texts, inverse = unique_top_k_pairs(np.asarray(i2t_top), np.asarray(t2i_top),
                                                          len(text_rows))
    if self.image_cache:
      return self._cached_rerank(params, images, image_rows, texts, text_rows, i2t_top, t2i_top,
                                 image_rows[pair_images], text_rows[pair_texts], inverse)
    # The states every pair gathers from, replicated once (not once per chunk).
    image_states, text_states, text_mask = common.put_replicated(
        (images["states"], texts["states"], texts["mask"]), mesh)
    _, chunks = common.padded_chunks([image_rows[pair_images].astype(np.int32),
                                          text_rows[pair_texts].astype(np.int32)], chunk)
    # Room for the most chunks there can be (every pair distinct): the shapes do not depend on
    # how many pairs both directions share.
    most = -(-len(inverse) // chunk)
    logits = np.zeros([most, chunk], np.float32)
    logits = jax.device_put(logits, common.chunk_rows_sharding(mesh)) if mesh is not None else jnp.asarray(logits)
    for n, (image_chunk, text_chunk) in enumerate(chunks):
      scores = fns["pair_scores"](params, image_states, text_states, text_mask,
                                  common.put_batch(image_chunk, mesh), common.put_batch(text_chunk, mesh))
      logits = common.settle(fns["write_chunk"](logits, scores, np.int32(n)))
    return fns["top_k_scores"](logits, inverse, i2t_top, t2i_top)

  def _cached_rerank(self, params, images, image_rows, texts, text_rows, i2t_top, t2i_top, pair_image_rows,
                     pair_text_rows, inverse):
    """`rerank` with each image's fusion keys and values computed once (per block of image rows)."""
    fns, mesh = self.functions, self.mesh
    num_rows = images["states"].shape[0]
    block = min(self.cache_block, num_rows)
    plan = group_pairs_by_image(pair_image_rows, pair_text_rows, num_rows=num_rows, block=block,
                                texts_per_group=self.texts_per_group, groups_per_chunk=self.groups_per_chunk)
    # Room for the most chunks there can be: the shapes do not depend on the params.
    most = most_grouped_chunks(len(inverse), len(image_rows), len(plan["starts"]), self.texts_per_group,
                               self.groups_per_chunk)
    assert len(plan["chunk_block"]) <= most, (len(plan["chunk_block"]), most)
    logits = np.zeros([max(most, 1), self.itm_batch_size], np.float32)
    logits = jax.device_put(logits, common.chunk_rows_sharding(mesh)) if mesh is not None else jnp.asarray(logits)
    image_states, text_states, text_mask = common.put_replicated(
        (images["states"], texts["states"], texts["mask"]), mesh)
    cache, cached_block = None, -1
    for n, block_index in enumerate(plan["chunk_block"]):
      if block_index != cached_block:   # chunks come block by block: each block's cache is made once
        cache = common.settle(fns["image_cache"](params, image_states, np.int32(plan["starts"][block_index]),
                                                 block=block))
        cached_block = block_index
      scores = fns["pair_scores"](params, cache, text_states, text_mask, common.put_batch(plan["chunk_images"][n], mesh),
                                  common.put_batch(plan["chunk_texts"][n], mesh))
      logits = common.settle(fns["write_chunk"](logits, scores, np.int32(n)))
    return fns["top_k_scores"](logits, plan["slots"][inverse].astype(np.int32), i2t_top, t2i_top)

  def scores(self, params, image_batches: Iterable[dict], text_batches: Iterable[dict]
             ) -> tuple[jax.Array, jax.Array]:
    """(scores_i2t [num_images, num_texts], scores_t2i [num_texts, num_images]) on device.

    Args:
      params: the model's params, placed as `common.place_params` leaves them.
      image_batches: dicts image [B, H, W, 3] (+ any extra image-side inputs), valid [B];
        text_batches: dicts text_ids, text_mask [B, L], valid [B]; both padded to a fixed B
        (valid rows first in index order).
    """
    images, image_rows = self.embed_images(params, image_batches)
    texts, text_rows = self.embed_texts(params, text_batches)
    if not self.k_test:
      return self.similarities(images, image_rows, texts, text_rows)
    _, i2t_top, t2i_top = self.similarities(images, image_rows, texts, text_rows)
    return self.rerank(params, images, image_rows, texts, text_rows, i2t_top, t2i_top)

  def recalls(self, scores_i2t, scores_t2i, txt2img, img2txt: list[list[int]]) -> dict[str, float]:
    """`recall_at_k`'s metrics plus num_images and num_texts (ranks from the jitted `ranks`)."""
    if scores_i2t.shape != (len(img2txt), len(txt2img)):
      raise ValueError(f"retrieval evaluation: {scores_i2t.shape[0]} valid images and {scores_i2t.shape[1]} "
                       f"valid captions in the batches, but the index maps have {len(img2txt)} and {len(txt2img)}")
    gt_images, gt_captions = _flatten_img2txt(img2txt)
    ranks = self.functions["ranks"](scores_i2t, scores_t2i, np.asarray(txt2img, np.int32), gt_images, gt_captions)
    metrics = recalls_from_ranks(*(np.asarray(r) for r in ranks))
    metrics["num_images"] = float(scores_i2t.shape[0])
    metrics["num_texts"] = float(scores_i2t.shape[1])
    return metrics


def retrieval_scores(model, params, image_batches: Iterable[dict], text_batches: Iterable[dict], *,
                     k_test: int = 0, itm_batch_size: int = 128, mesh: Optional[Mesh] = None
                     ) -> tuple[jax.Array, jax.Array]:
  """The score matrices the recalls are computed from (one-off; see `Scorer` to score repeatedly).

  Args:
    model, params: a VLPModel and its params (kept in their sharding when on the mesh).
    image_batches, text_batches: as `Scorer.scores`.
    k_test, itm_batch_size, mesh: as `Scorer`.

  Returns:
    (scores_i2t [num_images, num_texts], scores_t2i [num_texts, num_images]) on device.
  """
  scorer = Scorer(model, k_test=k_test, itm_batch_size=itm_batch_size, mesh=mesh)
  return scorer.scores(common.place_params(params, mesh), image_batches, text_batches)


def evaluate(model, params, image_batches: Iterable[dict], text_batches: Iterable[dict],
             txt2img: np.ndarray, img2txt: list[list[int]], *, k_test: int = 0,
             itm_batch_size: int = 128, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """Zero-shot / fine-tuned retrieval metrics for `params` on an eval split (one-off).

  Inputs as `retrieval_scores`; txt2img [num_texts] and img2txt as `recall_at_k`.

  Returns:
    `recall_at_k`'s metrics plus num_images and num_texts.
  """
  scorer = Scorer(model, k_test=k_test, itm_batch_size=itm_batch_size, mesh=mesh)
  scores = scorer.scores(common.place_params(params, mesh), image_batches, text_batches)
  return scorer.recalls(*scores, txt2img, img2txt)


# ----------------------------------------------------------------------------- evaluator contract

EVAL_KEYS = ("k_test",)
METRIC_ORDER = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


class Evaluator(common.Evaluator):
  """Retrieval metrics on `config.eval.split` of `config.input`: eval data and `Scorer` built once.

  `config.eval`: batch_size (images / captions per embedding batch, and pairs per ITM batch),
  k_test (0 = ITC only). Every process embeds the whole (small) split, so the scores need no
  gathering. `data`: optional eval data with the `builder.make_eval_dataset` contract.
  """

  def make_functions(self):
    self.scorer = Scorer(self.model, k_test=int(self.config.eval.get("k_test", 0)),
                         itm_batch_size=self.batch_size, mesh=self.mesh)
    return self.scorer.functions

  def make_data(self):
    from input_pipeline import builder
    return builder.make_eval_dataset(self.config.input, split=self.config.eval.split,
                                     batch_size=self.batch_size, process_index=0, process_count=1)

  def evaluate(self, params) -> dict[str, float]:
    data = self.data
    scores = self.scorer.scores(params, data.image_batches(), data.text_batches())
    return self.scorer.recalls(*scores, data.txt2img, data.img2txt)


def run(config, model, params, *, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """One-off `Evaluator(config, model, mesh)(params)` (evaluator contract)."""
  return Evaluator(config, model, mesh)(params)


def format_results(results: dict[str, float]) -> str:
  """One table row: TR@1 TR@5 TR@10 IR@1 IR@5 IR@10 r_mean, with a header line."""
  header = "  ".join(f"{name:>7}" for name in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean"))
  row = "  ".join(f"{results[k]:7.2f}" for k in METRIC_ORDER)
  return f"{header}\n{row}"
