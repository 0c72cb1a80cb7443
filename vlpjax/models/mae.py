"""The `mae` head: ViCHA's uni-modal MAE branch (docs/method_spec.md §2.1-2.2, App. H #9).

Encoder: the online ViT on the visible patches only (`mae_encode`: `VisionTransformer` with
`keep_indices`, so masked patches cost nothing; no visual-concept tokens). ViCHA prepends the CLS
token without its position embedding on this path (`cls_position=False`, its default here).

Decoder (`MaeDecoder`, ViCHA's names in brackets), on encoder states [B, 1+K, Dv] and the restore
order [B, N] of the input op `shuffle_keep_patches(..., prefix='mae')`:
  x = embed(states)                                   [decoder_embed]  -> [B, 1+K, Dd]
  x = [x_cls ; unshuffle([x_visible ; mask_token * (N-K)])] + table   [mask_token, decoder_pos_embed]
  x = norm(block_{depth-1}(... block_0(x)))           [decoder_blocks.i (timm, eps 1e-6), decoder_norm (eps 1e-5)]
  pred = pred(x)[:, 1:]                               [mae_proj] -> [B, N, p*p*3]
`table` [1, 1+N, Dd] is MAE's fixed 2-D sin-cos table (`sincos_table`; zero CLS row). It is a
constant computed from the model's patch grid, not a parameter: nothing can train it (ViCHA keeps it
with requires_grad=False), and a new resolution gets the exact table of its grid. The converter
checks a checkpoint's `decoder_pos_embed` against this function at the checkpoint's grid.
The mask token is initialised to zeros (ViCHA re-creates it zero-initialised after a normal init).

Settings: `config.model.head_config.mae = dict(width=768, depth=2, num_heads=16, mlp_ratio=4.0,
norm_eps=1e-5, cls_position=False)`.
Parameters (under `mae_decoder/`): embed/dense, block_i (as the ViT's blocks), norm/norm,
mask_token [1, 1, Dd], pred/dense [Dd, p*p*3].
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlpjax.models import heads, layers, vit

NAME = "mae"


@dataclasses.dataclass(frozen=True)
class MaeConfig:
  width: int = 768          # decoder width (ViCHA decoder_embed_dim)
  depth: int = 2            # decoder blocks
  num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5    # decoder_norm is a default torch LayerNorm; the blocks use 1e-6
  cls_position: bool = False  # ViCHA's MAE branch leaves the CLS token without its position embedding

  def __post_init__(self):
    if self.width % 4:
      raise ValueError(f"config.model.head_config.mae.width={self.width} must be a multiple of 4 "
                       "(the 2-D sin-cos table uses width/4 frequencies per axis and function)")


def sincos_table(width: int, grid: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position table, float32 [1, 1 + grid*grid, width].

  Row 0 (CLS) is zeros. Row 1 + r*grid + c (patch at row r, column c, row-major as the ViT
  flattens patches) is [sin(c w), cos(c w), sin(r w), cos(r w)] with the width/4 frequencies
  w_k = 10000^(-k / (width/4)), k = 0..width/4-1: the first half encodes the column, the second
  the row (MAE's `get_2d_sincos_pos_embed`, whose first grid plane is the column index).
  Computed in float64, then rounded to float32.
  """
  if width % 4:
    raise ValueError(f"sincos_table: width {width} is not a multiple of 4")
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

  def encode(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  table = np.concatenate([encode(cols), encode(rows)], axis=1)
  return np.concatenate([np.zeros((1, width)), table])[None].astype(np.float32)


class MaeDecoder(nn.Module):
  """Encoder states of the visible patches [B, 1+K, Dv] + restore order [B, N] -> pixels [B, N, p*p*3]."""
  cfg: MaeConfig
  grid: int
  patch_size: int
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.embed = layers.Dense(cfg.width, ("embed", "mlp"), dtype=self.dtype)
    self.mask_token = self.param("mask_token", layers.with_axes(nn.initializers.zeros, (None, None, "embed")),
                                 (1, 1, cfg.width), jnp.float32)
    block_cfg = vit.VisionConfig(image_size=self.grid * self.patch_size, patch_size=self.patch_size,
                                 width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                 layer_norm_eps=1e-6)
    self.blocks = [vit.VitBlock(block_cfg, self.dtype, name=f"block_{i}") for i in range(cfg.depth)]
    self.norm = layers.LayerNorm(cfg.norm_eps, self.dtype)
    self.pred = layers.Dense(self.patch_size * self.patch_size * 3, ("mlp", None), dtype=self.dtype)

  def __call__(self, states, restore_indices):
    x = self.embed(states)                                      # [B, 1+K, Dd]
    batch, kept = x.shape[0], x.shape[1] - 1
    num_patches = restore_indices.shape[1]
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, num_patches - kept, x.shape[-1]))
    shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)  # [visible ; masked], shuffle order
    patches = jnp.take_along_axis(shuffled, restore_indices[..., None].astype(jnp.int32), axis=1)
    table = jnp.asarray(sincos_table(self.cfg.width, self.grid), x.dtype)
    x = jnp.concatenate([x[:, :1], patches], axis=1) + table
    for block in self.blocks:
      x = block(x)
    return self.pred(self.norm(x))[:, 1:].astype(jnp.float32)


def _build(model):
  cfg = model.config
  model.mae_decoder = MaeDecoder(cfg.head_cfg(NAME), cfg.vision.grid, cfg.vision.patch_size, cfg.compute_dtype)


def mae_encode(model, images, keep_indices):
  """The online ViT on the visible patches: images [B, H, W, 3], keep_indices int [B, K] ->
  states [B, 1+K, Dv] (final LayerNorm applied); no concept tokens."""
  settings = model.config.head_cfg(NAME)
  return model.vision(images, keep_indices=keep_indices, cls_position=settings.cls_position)["states"]


def mae_predict(model, images, keep_indices, restore_indices):
  """Pixel predictions [B, N, p*p*3] (float32) of every patch from the visible ones."""
  return model.mae_decoder(mae_encode(model, images, keep_indices), restore_indices)


def _init(model, feats):
  images = feats["images"]
  num_patches = model.config.vision.num_patches
  keep = jnp.broadcast_to(jnp.arange(max(1, num_patches // 4)), (images.shape[0], max(1, num_patches // 4)))
  restore = jnp.broadcast_to(jnp.arange(num_patches), (images.shape[0], num_patches))
  return dict(mae=mae_predict(model, images, keep, restore))


heads.register_head(NAME, build=_build, init=_init, config_class=MaeConfig)
