"""ViT image encoder (timm / DeiT layout): patch embedding, CLS, learned positions, pre-LN blocks."""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlpjax.models import layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 256
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  # Fused attention kernel of the blocks: 'xla', 'cudnn' (GPU only; the 1 + patches tokens are
  # padded to a multiple of 8, which its training kernels need) or '' (cuDNN on a GPU with
  # bf16/fp16 compute for long sequences where it accepts them, else XLA).
  attention_impl: str = ""

  def __post_init__(self):
    if self.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"config.model.vision.attention_impl={self.attention_impl!r}; known: "
                       f"{layers.ATTENTION_IMPLEMENTATIONS}")

  @property
  def grid(self) -> int:
    # Non-divisible sizes (ViCHA's 380 px) drop the border pixels, as a strided conv does.
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


class VitBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  sow_weights: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    return self.block(x, mask)

  def block(self, x, mask):
    cfg = self.cfg
    y = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="norm1")(x)
    x = x + layers.Attention(cfg.num_heads, cfg.width, dtype=self.dtype, sow_weights=self.sow_weights,
                             implementation=cfg.attention_impl, name="attn")(y, y, mask)
    y = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="norm2")(x)
    x = x + layers.Mlp(int(cfg.width * cfg.mlp_ratio), cfg.width, dtype=self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class ScanVitBlock(VitBlock):
  """A `VitBlock` as one iteration of a scanned stack: (x, mask) -> (x', x')."""

  @nn.compact
  def __call__(self, x, mask=None):
    x = self.block(x, mask)
    return x, x


class VisionTransformer(nn.Module):
  """Encodes images [batch, H, W, 3] into tokens [batch, 1 + patches (+ extra), width].

  `patch_mask` (bool [batch, patches], True = masked) replaces masked patch embeddings with a
  learned mask token before the position embeddings are added (BEiT / MAMO masking).
  `extra_tokens` [batch, K, width] (ViCHA visual concepts) are appended after the position
  embeddings, without positions of their own; `extra_mask` masks their padding.
  Returns `states` (after the final LayerNorm), `layer_cls` [depth, batch, width]: the CLS
  state after each block with the final LayerNorm applied (ViCHA's hierarchical alignment),
  `layer_states` (each block's output, before the final LayerNorm) and `mask` (the attention
  mask over [tokens ; extra tokens], None when nothing is masked).
  With `sow_weights` every block's attention probabilities are sown and perturbable
  (`layers.Attention`; ITC-mode Grad-CAM).
  With `scan` the blocks are one `nn.scan` stack named `blocks` (params [depth, ...]; sown
  attention and perturbations stacked the same way) instead of `block_0 .. block_{depth-1}`;
  `layer_states` is then one [depth, batch, tokens, width] array instead of a list.
  """
  cfg: VisionConfig
  dtype: Any = jnp.float32
  remat: Any = False   # a `layers.remat_policy` value (or bool)
  sow_weights: bool = False
  scan: bool = False

  def setup(self):
    cfg = self.cfg
    self.patch_embed = nn.Conv(
        cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID",
        dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=layers.with_axes(layers.default_kernel_init, (None, None, None, "embed")),
        bias_init=layers.with_axes(nn.initializers.zeros, ("embed",)))
    self.cls = self.param("cls", layers.with_axes(layers.default_kernel_init, (None, None, "embed")),
                          (1, 1, cfg.width), jnp.float32)
    self.pos_embedding = self.param(
        "pos_embedding", layers.with_axes(layers.default_kernel_init, (None, None, "embed")),
        (1, cfg.num_patches + 1, cfg.width), jnp.float32)
    self.mask_token = self.param("mask_token", layers.with_axes(nn.initializers.zeros, (None, None, "embed")),
                                 (1, 1, cfg.width), jnp.float32)
    if self.scan:
      self.blocks = layers.scan_stack(ScanVitBlock, cfg.depth, self.remat, (nn.broadcast,))(
          cfg, self.dtype, self.sow_weights)
    else:
      block = layers.remat(VitBlock, self.remat)
      self.blocks = [block(cfg, self.dtype, self.sow_weights, name=f"block_{i}") for i in range(cfg.depth)]
    self.norm = layers.LayerNorm(cfg.layer_norm_eps, self.dtype)

  def embed(self, images, patch_mask=None):
    """Patch + CLS + position embeddings: [batch, 1 + patches, width]."""
    cfg = self.cfg
    usable = cfg.grid * cfg.patch_size
    x = self.patch_embed(images[:, :usable, :usable, :].astype(self.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width)  # [batch, patches, width]
    if patch_mask is not None:
      x = jnp.where(patch_mask[..., None], self.mask_token.astype(x.dtype), x)
    cls = jnp.broadcast_to(self.cls, (x.shape[0], 1, cfg.width)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.pos_embedding.astype(x.dtype)

  def __call__(self, images, patch_mask=None, extra_tokens=None, extra_mask=None, keep_indices=None,
               cls_position=True):
    """Encodes images; see the class docstring.

    `keep_indices` int [batch, K] (MAE's visible patches): only those patches (with their
    position embeddings) and the CLS token are encoded, so the masked ones cost nothing; the
    output has 1 + K tokens. `cls_position=False` leaves the CLS token without its position
    embedding on that path (ViCHA's MAE branch does, docs/method_spec.md App. H #9).
    """
    x = self.embed(images, patch_mask)
    if keep_indices is not None:
      if extra_tokens is not None:
        raise ValueError("the visible-patch path (keep_indices) takes no extra tokens")
      cls = x[:, :1] if cls_position else x[:, :1] - self.pos_embedding[:, :1].astype(x.dtype)
      patches = jnp.take_along_axis(x[:, 1:], keep_indices[..., None].astype(jnp.int32), axis=1)
      x = jnp.concatenate([cls, patches], axis=1)
    mask = None
    if extra_tokens is not None:
      x = jnp.concatenate([x, extra_tokens.astype(x.dtype)], axis=1)
      if extra_mask is not None:
        image_valid = jnp.ones(x.shape[:1] + (x.shape[1] - extra_tokens.shape[1],), jnp.int32)
        mask = jnp.concatenate([image_valid, extra_mask.astype(jnp.int32)], axis=1)
    if self.scan:
      x, layer_states = self.blocks(x, mask)
      layer_cls = self.norm(layer_states[:, :, 0])
    else:
      layer_states = []
      for block in self.blocks:
        x = block(x, mask)
        layer_states.append(x)
      layer_cls = jnp.stack([self.norm(state[:, 0]) for state in layer_states])
    return dict(states=self.norm(x), layer_cls=layer_cls, layer_states=layer_states, mask=mask)
