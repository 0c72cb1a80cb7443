"""Image-text retrieval evaluation: embed, score all pairs with ITC, optionally ITM-rerank top-k.

Protocol (ALBEF, METHODS.md §1.4 and Appendix G):
  TR@k: for each image, hit if the best-ranked of its ground-truth captions is in the top k.
  IR@k: for each caption, hit if its image is in the top k.
  r_mean: mean of the six recalls.
With `k_test > 0` the top-k candidates of each image (and of each caption) are rescored with the
ITM "match" logit and everything else gets -100, as ALBEF's evaluation does.
"""
from typing import Callable, Iterable, Optional

import jax
import numpy as np


def recall_at_k(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: np.ndarray,
                img2txt: list[list[int]], ks=(1, 5, 10)) -> dict[str, float]:
  """Recall metrics in percent.

  Args:
    scores_i2t: [num_images, num_texts]; scores_t2i: [num_texts, num_images].
    txt2img: [num_texts] ground-truth image of each caption.
    img2txt: for each image, the indices of its captions.
  """
  num_images = scores_i2t.shape[0]
  ranks_i2t = np.empty(num_images)
  for i in range(num_images):
    order = np.argsort(-scores_i2t[i], kind="stable")
    positions = np.nonzero(np.isin(order, img2txt[i]))[0]
    ranks_i2t[i] = positions.min() if len(positions) else np.inf
  ranks_t2i = np.empty(scores_t2i.shape[0])
  for t in range(scores_t2i.shape[0]):
    order = np.argsort(-scores_t2i[t], kind="stable")
    ranks_t2i[t] = np.nonzero(order == txt2img[t])[0][0]
  out = {}
  for k in ks:
    out[f"txt_r{k}"] = 100.0 * float(np.mean(ranks_i2t < k))
    out[f"img_r{k}"] = 100.0 * float(np.mean(ranks_t2i < k))
  out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
  out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
  return out


def _collect(batches: Iterable[dict], fn: Callable[[dict], dict]) -> dict[str, np.ndarray]:
  """Runs `fn` over padded batches and keeps the rows whose `valid` flag is set."""
  parts: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    valid = np.asarray(batch["valid"]).astype(bool)
    out = fn(batch)
    for key, value in out.items():
      parts.setdefault(key, []).append(np.asarray(jax.device_get(value))[valid])
  return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def make_embed_fns(model, *, keep_states: bool):
  """Jitted (params, batch) -> features for images and for texts."""

  def embed_images(params, images):
    out = model.apply({"params": params}, images, method=model.encode_image)
    feat = model.apply({"params": params}, out["states"][:, 0], method=model.project_image)
    return dict(feat=feat, states=out["states"]) if keep_states else dict(feat=feat)

  def embed_texts(params, ids, mask):
    out = model.apply({"params": params}, ids, mask, method=model.encode_text)
    feat = model.apply({"params": params}, out["states"][:, 0], method=model.project_text)
    return dict(feat=feat, states=out["states"]) if keep_states else dict(feat=feat)

  return jax.jit(embed_images), jax.jit(embed_texts)


def make_itm_score_fn(model):
  """Jitted (params, text_states [n,L,D], text_mask [n,L], image_states [n,N,Dv]) -> match logit [n]."""

  def score(params, text_states, text_mask, image_states):
    fused = model.apply({"params": params}, text_states, text_mask, image_states, method=model.fuse)
    return model.apply({"params": params}, fused["text_states"][:, 0], method=model.itm_logits)[:, 1]

  return jax.jit(score)


def rerank(sims: np.ndarray, k: int, score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
  """Keeps the top-k columns of each row rescored by `score_pairs(rows, cols)`; others -100."""
  k = min(k, sims.shape[1])
  out = np.full(sims.shape, -100.0, np.float32)
  top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  rows = np.repeat(np.arange(sims.shape[0]), k)
  cols = top.reshape(-1)
  out[rows, cols] = score_pairs(rows, cols)
  return out


def evaluate(model, params, image_batches: Iterable[dict], text_batches: Iterable[dict],
             txt2img: np.ndarray, img2txt: list[list[int]], *, k_test: int = 0,
             itm_batch_size: int = 128, score_fn: Optional[Callable] = None) -> dict[str, float]:
  """Zero-shot / fine-tuned retrieval metrics for `params` on an eval split.

  `image_batches` yield dict(image [B,H,W,3], valid [B]); `text_batches` yield
  dict(text_ids [B,L], text_mask [B,L], valid [B]); both padded to fixed batch sizes.
  """
  keep = k_test > 0
  embed_images, embed_texts = make_embed_fns(model, keep_states=keep)
  images = _collect(image_batches, lambda b: embed_images(params, b["image"]))
  texts = _collect(text_batches, lambda b: dict(embed_texts(params, b["text_ids"], b["text_mask"]),
                                                mask=b["text_mask"]))
  sims = images["feat"].astype(np.float32) @ texts["feat"].astype(np.float32).T  # [num_images, num_texts]
  scores_i2t, scores_t2i = sims, sims.T
  if keep:
    score = score_fn or make_itm_score_fn(model)

    def score_pairs(image_idx, text_idx):
      out = []
      for start in range(0, len(image_idx), itm_batch_size):
        i = image_idx[start:start + itm_batch_size]
        t = text_idx[start:start + itm_batch_size]
        pad = itm_batch_size - len(i)
        i, t = np.pad(i, (0, pad), mode="edge"), np.pad(t, (0, pad), mode="edge")
        logits = score(params, texts["states"][t], texts["mask"][t], images["states"][i])
        out.append(np.asarray(logits)[:itm_batch_size - pad])
      return np.concatenate(out)

    scores_i2t = rerank(sims, k_test, score_pairs)
    scores_t2i = rerank(sims.T, k_test, lambda t, i: score_pairs(i, t))
  metrics = recall_at_k(scores_i2t, scores_t2i, np.asarray(txt2img), img2txt)
  metrics["num_images"] = float(sims.shape[0])
  metrics["num_texts"] = float(sims.shape[1])
  return metrics

