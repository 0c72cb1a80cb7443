"""A small deterministic stand-in for the objective context, for the objective tests.

The fake "model" is a handful of fixed random matrices. Every model function is written once
over an array module `xp`, so the objectives see it through jnp (`FakeModel`, `build_context`)
while the slow NumPy references call the very same formulas with `np` in float64.

Shapes: B batch, L text length, N image tokens incl. CLS (N-1 patches), D text/fusion width,
Dv vision width, E ITC width, V vocabulary, Q queue rows.
"""
import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PAD_ID = 0
MASK_ID = 1


@dataclasses.dataclass(frozen=True)
class Sizes:
  batch: int = 6
  text_len: int = 5
  image_tokens: int = 5
  width: int = 8
  vision_width: int = 6
  embed: int = 4
  vocab: int = 11
  fusion_layers: int = 4


def init_params(seed: int, sizes: Sizes) -> dict[str, np.ndarray]:
  """Random float32 weights of the fake model, scaled to keep activations O(1)."""
  rng = np.random.default_rng(seed)
  d, dv, e, v = sizes.width, sizes.vision_width, sizes.embed, sizes.vocab

  def normal(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  return {
      "word_embedding": normal(v, d),
      "vision_kernel": normal(dv, dv, scale=dv**-0.5),
      "patch_mask_embedding": normal(dv),
      "fuse_image_kernel": normal(dv, d, scale=dv**-0.5),
      "fuse_text_kernel": normal(d, d, scale=d**-0.5),
      "layer_kernels": normal(sizes.fusion_layers - 1, d, d, scale=d**-0.5),
      "image_itc_kernel": normal(dv, e),
      "text_itc_kernel": normal(d, e),
      "itm_kernel": normal(d, 2),
      "itm_bias": normal(2),
      "mlm_kernel": normal(d, v, scale=2.0),
      "mlm_bias": normal(v),
      "mrm_kernel": normal(d, d, scale=d**-0.5),
      "mrm_bias": normal(d, scale=0.1),
      "mim_kernel": normal(d, dv, scale=d**-0.5),
      "mim_bias": normal(dv, scale=0.1),
  }


def encode_image(xp, params, pixels, patch_mask=None):
  """[B, N, Dv] -> [B, N, Dv]; masked patches (patch n = token n+1) get the mask embedding."""
  if patch_mask is not None:
    is_masked = xp.concatenate([xp.zeros_like(patch_mask[:, :1]), patch_mask], axis=1)
    pixels = xp.where(is_masked[..., None], params["patch_mask_embedding"], pixels)
  return xp.tanh(pixels @ params["vision_kernel"])


def encode_text(xp, params, ids):
  """int [B, L] -> [B, L, D] (an embedding lookup)."""
  return params["word_embedding"][ids]


def itc_features(xp, states, kernel):
  """L2-normalised projection of the CLS state: [B, T, W] -> [B, E]."""
  projected = states[:, 0] @ kernel
  return projected / xp.sqrt(xp.sum(projected**2, axis=-1, keepdims=True))


def fuse(xp, params, text_states, text_mask, image_states, fusion="merged"):
  """Per-example fusion: every token is mixed with both streams' means (text mean over text_mask).

  s = masked_mean_l(text) @ Wt,  i = mean_n(image) @ Wi
  text_out = tanh(text + s + i)      [B, L, D]
  image_out = tanh(image @ Wi + s)   [B, N, D] (None for 'cross')
  """
  weights = text_mask[..., None].astype(text_states.dtype)
  text_summary = (xp.sum(text_states * weights, axis=1) / xp.maximum(xp.sum(weights, axis=1), 1)
                  ) @ params["fuse_text_kernel"]
  image_summary = xp.mean(image_states, axis=1) @ params["fuse_image_kernel"]
  text_out = xp.tanh(text_states + (text_summary + image_summary)[:, None, :])
  if fusion == "cross":
    return {"text_states": text_out, "image_states": None}
  image_out = xp.tanh(image_states @ params["fuse_image_kernel"] + text_summary[:, None, :])
  return {"text_states": text_out, "image_states": image_out}


def fusion_layers(xp, params, final_states):
  """Per-layer states ending with `final_states`: layer k < K-1 is tanh(final @ W_k)."""
  return [xp.tanh(final_states @ kernel) for kernel in params["layer_kernels"]] + [final_states]


def itm_logits(xp, params, cls):
  return cls @ params["itm_kernel"] + params["itm_bias"]


def mlm_logits(xp, params, states):
  return states @ params["mlm_kernel"] + params["mlm_bias"]


def mrm_predict(xp, params, states):
  return states @ params["mrm_kernel"] + params["mrm_bias"]


def mim_predict(xp, params, states):
  return states @ params["mim_kernel"] + params["mim_bias"]


@dataclasses.dataclass(frozen=True)
class FakeModel:
  """The model functions the objectives may call, bound to jnp params."""
  params: Any
  fusion: str = "merged"

  def fuse(self, text_states, text_mask, image_states, image_mask=None):
    del image_mask  # The fake fusion attends to every image token.
    return fuse(jnp, self.params, text_states, text_mask, image_states, self.fusion)

  def itm_logits(self, cls):
    return itm_logits(jnp, self.params, cls)

  def mlm_logits(self, states):
    return mlm_logits(jnp, self.params, states)

  def mrm_predict(self, states):
    return mrm_predict(jnp, self.params, states)

  def mim_predict(self, states):
    return mim_predict(jnp, self.params, states)


@dataclasses.dataclass(frozen=True)
class ModelConfigStub:
  embed_dim: int


@dataclasses.dataclass(frozen=True)
class FakeContext:
  """The attributes the objectives read from the real context (vlpjax/objectives/context.py)."""
  cfg: ml_collections.ConfigDict
  alpha: jax.Array
  rng: Callable[[str], jax.Array]
  num_groups: int
  temp: jax.Array
  image_feat: jax.Array
  text_feat: jax.Array
  ema_image_feat: jax.Array
  ema_text_feat: jax.Array
  objective_state: dict
  model_config: Any
  itc_sims: dict
  image: dict
  text: dict
  student: FakeModel
  teacher: FakeModel
  masked_fusion: dict
  ema_masked_fusion: dict
  ema_clean_fusion: dict
  ema_image: dict


def make_inputs(seed: int, sizes: Sizes, queue_size: int = 0, mask_prob: float = 0.4,
                patch_mask_prob: float = 0.5, num_distinct_images: int | None = None) -> dict:
  """Random batch (the objective's `batch`) plus pixels and queues, as NumPy arrays.

  Text rows have random lengths >= 2 (CLS then tokens, then PAD); MLM never masks CLS or PAD.
  Image ids are drawn from `num_distinct_images` values (default B: mostly distinct), so
  duplicates appear when it is small; queue ids include -1 (empty) and batch ids.
  """
  rng = np.random.default_rng(seed)
  b, l, n = sizes.batch, sizes.text_len, sizes.image_tokens
  lengths = rng.integers(2, l + 1, size=b)
  text_mask = (np.arange(l)[None, :] < lengths[:, None]).astype(np.int32)
  # Token 0 plays CLS; it varies per row so that the fake text features differ between rows.
  text_ids = np.where(text_mask == 1, rng.integers(2, sizes.vocab, size=(b, l)), PAD_ID)
  maskable = (text_mask == 1) & (np.arange(l)[None, :] > 0)
  is_masked = maskable & (rng.random((b, l)) < mask_prob)
  mlm_ids = np.where(is_masked, MASK_ID, text_ids)
  mlm_labels = np.where(is_masked, text_ids, -1)
  distinct = num_distinct_images or b
  image_id = rng.integers(0, distinct, size=b)
  queue_image = rng.standard_normal((queue_size, sizes.embed))
  queue_text = rng.standard_normal((queue_size, sizes.embed))
  batch = {
      "text_ids": text_ids.astype(np.int32),
      "text_mask": text_mask,
      "mlm_ids": mlm_ids.astype(np.int32),
      "mlm_labels": mlm_labels.astype(np.int32),
      "image_id": image_id.astype(np.int32),
      "patch_mask": rng.random((b, n - 1)) < patch_mask_prob,
  }
  return {
      "batch": batch,
      "pixels": rng.standard_normal((b, n, sizes.vision_width)).astype(np.float32),
      "queue_image": (queue_image / np.linalg.norm(queue_image, axis=1, keepdims=True)
                     ).astype(np.float32),
      "queue_text": (queue_text / np.linalg.norm(queue_text, axis=1, keepdims=True)
                    ).astype(np.float32),
      "queue_idx": rng.integers(-1, distinct, size=queue_size).astype(np.int32),
  }


def build_context(params, teacher_params, inputs: dict, cfg: dict | None = None, *,
                  alpha: float = 0.4, temp: float = 0.07, num_groups: int = 1,
                  fusion: str = "merged", seed: int = 0) -> FakeContext:
  """The context the real step would build, from the fake model; differentiable in `params`.

  Teacher quantities go through stop_gradient, as in the real context.
  """
  batch = inputs["batch"]
  sg = jax.lax.stop_gradient
  teacher_params = jax.tree.map(sg, teacher_params)
  student = FakeModel(params, fusion)
  teacher = FakeModel(teacher_params, fusion)
  temp = jnp.asarray(temp, jnp.float32)
  patch_mask = jnp.asarray(batch["patch_mask"]) if "patch_mask" in batch else None

  image_states = encode_image(jnp, params, inputs["pixels"])
  text_states = encode_text(jnp, params, batch["text_ids"])
  ema_image_states = encode_image(jnp, teacher_params, inputs["pixels"])
  ema_text_states = encode_text(jnp, teacher_params, batch["text_ids"])
  image_feat = itc_features(jnp, image_states, params["image_itc_kernel"])
  text_feat = itc_features(jnp, text_states, params["text_itc_kernel"])
  ema_image_feat = itc_features(jnp, ema_image_states, teacher_params["image_itc_kernel"])
  ema_text_feat = itc_features(jnp, ema_text_states, teacher_params["text_itc_kernel"])
  queues = {"image": jnp.asarray(inputs["queue_image"]),
            "text": jnp.asarray(inputs["queue_text"]),
            "idx": jnp.asarray(inputs["queue_idx"])}
  text_keys = jnp.concatenate([ema_text_feat, queues["text"]])
  image_keys = jnp.concatenate([ema_image_feat, queues["image"]])
  itc_sims = {"i2t": image_feat @ text_keys.T / temp, "t2i": text_feat @ image_keys.T / temp}

  text_mask = jnp.asarray(batch["text_mask"])
  masked = student.fuse(encode_text(jnp, params, batch["mlm_ids"]), text_mask,
                        encode_image(jnp, params, inputs["pixels"], patch_mask))
  ema_masked = teacher.fuse(encode_text(jnp, teacher_params, batch["mlm_ids"]), text_mask,
                            ema_image_states)
  ema_clean_final = fuse(jnp, teacher_params, ema_text_states, text_mask, ema_image_states,
                         "merged")
  ema_clean = {
      "layer_text_states": fusion_layers(jnp, teacher_params, ema_clean_final["text_states"]),
      "layer_image_states": fusion_layers(jnp, teacher_params, ema_clean_final["image_states"]),
  }
  base_key = jax.random.key(seed)
  return FakeContext(
      cfg=ml_collections.ConfigDict(cfg or {}),
      alpha=jnp.asarray(alpha, jnp.float32),
      rng=lambda name: jax.random.fold_in(base_key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
      num_groups=num_groups,
      temp=temp,
      image_feat=image_feat,
      text_feat=text_feat,
      ema_image_feat=sg(ema_image_feat),
      ema_text_feat=sg(ema_text_feat),
      objective_state={"itc": queues},
      model_config=ModelConfigStub(embed_dim=int(queues["image"].shape[1])),
      itc_sims=itc_sims,
      image={"states": image_states},
      text={"states": text_states},
      student=student,
      teacher=teacher,
      masked_fusion=masked,
      ema_masked_fusion={"text_states": sg(ema_masked["text_states"])},
      ema_clean_fusion=jax.tree.map(sg, ema_clean),
      ema_image={"states": sg(ema_image_states)},
  )


def setup(seed: int, sizes: Sizes = Sizes(), **input_kwargs):
  """(student params, teacher params, inputs): the teacher is a perturbed copy of the student."""
  params = init_params(seed, sizes)
  rng = np.random.default_rng(seed + 1000)
  teacher = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in params.items()}
  return params, teacher, make_inputs(seed, sizes, **input_kwargs)


def to_numpy(tree):
  """float arrays -> float64 NumPy (references run in double precision); others unchanged."""

  def convert(x):
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x

  return jax.tree.map(convert, tree)


def jnp_batch(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}
