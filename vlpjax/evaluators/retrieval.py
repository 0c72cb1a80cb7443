"""Image-text retrieval evaluation: embed, score all pairs with ITC, optionally ITM-rerank top-k.

Protocol (ALBEF, METHODS.md §1.4 and Appendix G):
  TR@k: for each image, hit if the best-ranked of its ground-truth captions is in the top k.
  IR@k: for each caption, hit if its image is in the top k.
  r_mean: mean of the six recalls.
With `k_test > 0` the top-k candidates of each image (and of each caption) by ITC similarity are
rescored with the raw ITM "match" logit and everything else gets -100, as ALBEF's evaluation does.

Everything heavy stays on the accelerator: embeddings are computed in fixed-size jitted batches
and kept on device (patch and token states included, for the rerank), ITC similarities and top-k
run under jit, and the ITM rerank scores the distinct (image, text) pairs of both directions in
fixed-size jitted batches that gather their states on device. Only index arrays go to the
device and only the recall ranks come back. With a `mesh`, every batch is split over the
mesh's batch axes (data parallel; params and states replicated).
"""
import functools
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlpjax import sharding as sharding_lib

# ALBEF's score for pairs outside the top-k of a row.
OUTSIDE_TOP_K = -100.0
_NO_CAPTION_RANK = np.iinfo(np.int32).max


def _flatten_img2txt(img2txt: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(image index, caption index) int32 [num_ground_truth_pairs] of the ragged `img2txt`."""
  lengths = np.asarray([len(captions) for captions in img2txt], np.int64)
  images = np.repeat(np.arange(len(img2txt), dtype=np.int32), lengths)
  captions = np.concatenate([np.asarray(c, np.int32) for c in img2txt]) if lengths.sum() else np.zeros([0], np.int32)
  return images, captions


@jax.jit
def _ranks(scores_i2t, scores_t2i, txt2img, gt_images, gt_captions):
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
  ranks_i2t, ranks_t2i = retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt)
  out = {}
  for k in ks:
    out[f"txt_r{k}"] = 100.0 * float(np.mean(ranks_i2t < k))
    out[f"img_r{k}"] = 100.0 * float(np.mean(ranks_t2i < k))
  out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
  out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
  return out


# ----------------------------------------------------------------------------- embeddings


def make_embed_fns(model, *, keep_states: bool):
  """Jitted `embed_images(params, images, extra=None)` and `embed_texts(params, ids, mask)`.

  `extra`: further image-side inputs of the image batches (ViCHA's concept_ids, concept_mask),
  passed to `model.encode_image` as keyword arguments.

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


def _put_batch(value, mesh: Optional[Mesh]):
  value = np.asarray(value)
  if mesh is None:
    return value
  return jax.device_put(value, sharding_lib.batch_sharding(mesh, value.ndim))


def _check_divisible(size: int, mesh: Optional[Mesh], what: str):
  if mesh is not None and size % sharding_lib.num_batch_shards(mesh):
    raise ValueError(f"{what}={size} is not divisible by the {sharding_lib.num_batch_shards(mesh)} batch "
                     "shards of the mesh")


def embed_all(batches: Iterable[dict], embed: Callable[[dict], dict], mesh: Optional[Mesh] = None
              ) -> tuple[dict[str, jax.Array], np.ndarray]:
  """Runs `embed` over fixed-size padded batches and keeps every output on device.

  Args:
    batches: dicts with `valid` bool [B] (False on padding rows) and the model inputs.
    embed: batch -> dict of [B, ...] device arrays.
    mesh: optional; batches are split over its batch axes.

  Returns:
    (outputs, rows): outputs[k] [num_batches * B, ...] with padding rows included; rows int
    [num_valid], the output row of the n-th valid example (valid rows in batch order).
  """
  parts: dict[str, list[jax.Array]] = {}
  valid = []
  for batch in batches:
    valid.append(np.asarray(batch["valid"]).astype(bool))
    _check_divisible(len(valid[-1]), mesh, "eval batch size")
    out = embed({k: _put_batch(v, mesh) for k, v in batch.items() if k != "valid"})
    for key, value in out.items():
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
  sims = image_feat.astype(jnp.float32) @ text_feat.astype(jnp.float32).T
  if not k:
    return sims, None, None
  i2t_top = jax.lax.top_k(sims, min(k, sims.shape[1]))[1]
  t2i_top = jax.lax.top_k(sims.T, min(k, sims.shape[0]))[1]
  return sims, i2t_top, t2i_top


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


def score_pairs(score: Callable, image_rows: np.ndarray, text_rows: np.ndarray, batch_size: int,
                mesh: Optional[Mesh] = None) -> jax.Array:
  """`score(image_rows [b], text_rows [b]) -> [b]` over all pairs in fixed-size batches.

  The last batch is padded with copies of pair 0 and cut off. Batches are dispatched without
  waiting (no host round trip per batch); the result stays on device.

  Returns:
    float32 [len(image_rows)].
  """
  _check_divisible(batch_size, mesh, "ITM batch size")
  total = len(image_rows)
  if not total:
    return jnp.zeros([0], jnp.float32)
  padded = -(-total // batch_size) * batch_size
  image_rows = np.pad(np.asarray(image_rows, np.int32), (0, padded - total))
  text_rows = np.pad(np.asarray(text_rows, np.int32), (0, padded - total))
  out = [score(_put_batch(image_rows[s:s + batch_size], mesh), _put_batch(text_rows[s:s + batch_size], mesh))
         for s in range(0, padded, batch_size)]
  return jnp.concatenate(out)[:total]


@jax.jit
def _scatter_top_k(shape_like, top, values):
  """[R, C] filled with OUTSIDE_TOP_K except out[r, top[r, j]] = values[r, j]."""
  rows = jnp.arange(top.shape[0])[:, None]
  return jnp.full(shape_like.shape, OUTSIDE_TOP_K, jnp.float32).at[rows, top].set(values)


def rerank_top_k(sims: jax.Array, i2t_top: np.ndarray, t2i_top: np.ndarray,
                 pair_scores: Callable[[np.ndarray, np.ndarray], jax.Array]) -> tuple[jax.Array, jax.Array]:
  """ALBEF's rerank: the top-k of each row rescored, every other entry OUTSIDE_TOP_K (-100).

  Args:
    sims: [I, T] ITC similarities (only the shape is used).
    i2t_top: int [I, k] top texts of each image; t2i_top: int [T, k] top images of each text.
    pair_scores: (image_idx [n], text_idx [n]) -> ITM logits [n]. It is called once, on the
      distinct pairs of both directions (a pair in both top-k lists is scored once).

  Returns:
    (scores_i2t [I, T], scores_t2i [T, I]), float32 on device.
  """
  num_images, num_texts = sims.shape
  i2t_top, t2i_top = np.asarray(i2t_top, np.int64), np.asarray(t2i_top, np.int64)
  i2t_keys = np.arange(num_images)[:, None] * num_texts + i2t_top        # [I, k]: image * T + text
  t2i_keys = t2i_top * num_texts + np.arange(num_texts)[:, None]         # [T, k]
  unique, inverse = np.unique(np.concatenate([i2t_keys.ravel(), t2i_keys.ravel()]), return_inverse=True)
  logits = pair_scores(unique // num_texts, unique % num_texts)[jnp.asarray(inverse.astype(np.int32))]
  split = i2t_keys.size
  scores_i2t = _scatter_top_k(sims, jnp.asarray(i2t_top), logits[:split].reshape(i2t_top.shape))
  scores_t2i = _scatter_top_k(sims.T, jnp.asarray(t2i_top), logits[split:].reshape(t2i_top.shape))
  return scores_i2t, scores_t2i


def retrieval_scores(model, params, image_batches: Iterable[dict], text_batches: Iterable[dict], *,
                     k_test: int = 0, itm_batch_size: int = 128, mesh: Optional[Mesh] = None
                     ) -> tuple[jax.Array, jax.Array]:
  """The score matrices the recalls are computed from.

  Args:
    model, params: a VLPModel and its params (replicated onto `mesh` when one is given).
    image_batches: dicts image [B, H, W, 3], valid [B]; text_batches: dicts text_ids,
      text_mask [B, L], valid [B]; both padded to a fixed B (valid rows first in index order).
    k_test: 0 = ITC similarities; > 0 = ALBEF's ITM rerank of the top-k in both directions.
    itm_batch_size: pairs per jitted ITM call.
    mesh: optional; batches are split over its batch axes (sizes must divide).

  Returns:
    (scores_i2t [num_images, num_texts], scores_t2i [num_texts, num_images]) on device.
  """
  keep = k_test > 0
  if mesh is not None:
    params = jax.device_put(params, sharding_lib.replicated(mesh))
  embed_images, embed_texts = make_embed_fns(model, keep_states=keep)
  images, image_rows = embed_all(
      image_batches, lambda b: embed_images(params, b["image"], {k: v for k, v in b.items()
                                                                 if k not in ("image", "image_index")}), mesh)
  texts, text_rows = embed_all(text_batches, lambda b: dict(embed_texts(params, b["text_ids"], b["text_mask"]),
                                                              mask=b["text_mask"]), mesh)
  image_feat = images["feat"][jnp.asarray(image_rows)]
  text_feat = texts["feat"][jnp.asarray(text_rows)]
  sims, i2t_top, t2i_top = itc_similarities(image_feat, text_feat, k=int(k_test))
  if not keep:
    return sims, sims.T
  score = make_pair_score_fn(model)
  if mesh is not None:
    replicate = functools.partial(jax.device_put, device=sharding_lib.replicated(mesh))
    images["states"], texts["states"], texts["mask"] = map(replicate, (images["states"], texts["states"],
                                                                        texts["mask"]))

  def pair_scores(image_idx, text_idx):
    return score_pairs(
        lambda i, t: score(params, images["states"], texts["states"], texts["mask"], i, t),
        image_rows[image_idx], text_rows[text_idx], itm_batch_size, mesh)

  return rerank_top_k(sims, np.asarray(i2t_top), np.asarray(t2i_top), pair_scores)


def evaluate(model, params, image_batches: Iterable[dict], text_batches: Iterable[dict],
             txt2img: np.ndarray, img2txt: list[list[int]], *, k_test: int = 0,
             itm_batch_size: int = 128, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """Zero-shot / fine-tuned retrieval metrics for `params` on an eval split.

  Inputs as `retrieval_scores`; txt2img [num_texts] and img2txt as `recall_at_k`.

  Returns:
    `recall_at_k`'s metrics plus num_images and num_texts.
  """
  scores_i2t, scores_t2i = retrieval_scores(model, params, image_batches, text_batches, k_test=k_test,
                                            itm_batch_size=itm_batch_size, mesh=mesh)
  if scores_i2t.shape != (len(img2txt), len(txt2img)):
    raise ValueError(f"retrieval evaluation: {scores_i2t.shape[0]} valid images and {scores_i2t.shape[1]} "
                     f"valid captions in the batches, but the index maps have {len(img2txt)} and {len(txt2img)}")
  metrics = recall_at_k(scores_i2t, scores_t2i, txt2img, img2txt)
  metrics["num_images"] = float(scores_i2t.shape[0])
  metrics["num_texts"] = float(scores_i2t.shape[1])
  return metrics


# ----------------------------------------------------------------------------- evaluator contract

EVAL_KEYS = ("k_test",)
METRIC_ORDER = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def run(config, model, params, *, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """Retrieval metrics of `params` on `config.eval.split` of `config.input` (evaluator contract)."""
  from input_pipeline import builder
  batch_size = int(config.eval.batch_size)
  # Every process embeds the whole (small) eval split, so the scores need no gathering.
  data = builder.make_eval_dataset(config.input, split=config.eval.split, batch_size=batch_size,
                                   process_index=0, process_count=1)
  return evaluate(model, params, data.image_batches(), data.text_batches(), data.txt2img, data.img2txt,
                  k_test=int(config.eval.get("k_test", 0)), itm_batch_size=batch_size, mesh=mesh)


def format_results(results: dict[str, float]) -> str:
  """One table row: TR@1 TR@5 TR@10 IR@1 IR@5 IR@10 r_mean, with a header line."""
  header = "  ".join(f"{name:>7}" for name in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean"))
  row = "  ".join(f"{results[k]:7.2f}" for k in METRIC_ORDER)
  return f"{header}\n{row}"
