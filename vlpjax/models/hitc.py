"""The `hitc` head: per-level ITC projections of intermediate CLS states (ViCHA's hierarchical
alignment, docs/method_spec.md §2.1-2.2).

Level l pairs the ViT CLS state after block `vision_layers[l]` (final LayerNorm applied: the ViT's
`layer_cls`) with the text CLS state after text layer `text_layers[l]` (`layer_cls` of the text
tower). Indices are 0-based. ViCHA pairs ViT blocks 7-11 with BERT text layers 1-5 (1-based),
i.e. `vision_layers=(6, 7, 8, 9, 10)`, `text_layers=(0, 1, 2, 3, 4)` here; the last blocks (ViT 12,
text 6) are the regular ITC pair. Each side of each level has its own Linear -> L2 norm
(`vision_proj_hidden_l`, `text_proj_hidden_l`, ViCHA's `vision_proj_hidden.l` / `text_proj_hidden.l`).

Settings: `config.model.head_config.hitc = dict(vision_layers=..., text_layers=..., embed_dim=0)`
(embed_dim 0 = `config.model.embed_dim`). `default_levels(depth, text_layers)` gives ViCHA's
choice for any tower sizes: the text layers but the last, against as many ViT blocks before the last.
"""
import dataclasses

import jax.numpy as jnp

from vlpjax.models import heads

NAME = "hitc"


@dataclasses.dataclass(frozen=True)
class HitcConfig:
  vision_layers: tuple = (6, 7, 8, 9, 10)  # 0-based ViT blocks (their CLS after the final LayerNorm)
  text_layers: tuple = (0, 1, 2, 3, 4)     # 0-based text layers, paired one to one with vision_layers
  embed_dim: int = 0                       # projection width; 0 = config.model.embed_dim

  def __post_init__(self):
    object.__setattr__(self, "vision_layers", tuple(int(v) for v in self.vision_layers))
    object.__setattr__(self, "text_layers", tuple(int(t) for t in self.text_layers))
    if len(self.vision_layers) != len(self.text_layers) or not self.vision_layers:
      raise ValueError(f"config.model.head_config.hitc: vision_layers {self.vision_layers} and text_layers "
                       f"{self.text_layers} must pair one to one (and name at least one level)")

  @property
  def num_levels(self) -> int:
    return len(self.vision_layers)


def default_levels(depth: int, text_layers: int) -> dict:
  """ViCHA's pairing for towers of any size: text layers 0..T-2 with the T-1 ViT blocks before the
  last (ViT-B/16 + 6 text layers: blocks 6..10 with layers 0..4). At least one level."""
  levels = max(1, min(text_layers - 1, depth - 1))
  return dict(vision_layers=tuple(range(depth - 1 - levels, depth - 1)), text_layers=tuple(range(levels)))


def check_levels(settings: HitcConfig, depth: int, text_layers: int) -> None:
  """ValueError naming the field when a level index is outside its tower."""
  for field, values, size, tower in (("vision_layers", settings.vision_layers, depth, "config.model.vision.depth"),
                                     ("text_layers", settings.text_layers, text_layers,
                                      "config.model.text.text_layers")):
    bad = [v for v in values if not 0 <= v < size]
    if bad:
      raise ValueError(f"config.model.head_config.hitc.{field} = {values}: {bad} outside [0, {size}) "
                       f"({tower} = {size}; indices are 0-based)")


def _build(model):
  cfg = model.config
  settings = cfg.head_cfg(NAME)
  check_levels(settings, cfg.vision.depth, cfg.text.text_layers)
  dim = settings.embed_dim or cfg.embed_dim
  model.vision_proj_hidden = [heads.Projection(dim, cfg.compute_dtype) for _ in range(settings.num_levels)]
  model.text_proj_hidden = [heads.Projection(dim, cfg.compute_dtype) for _ in range(settings.num_levels)]


def hitc_features(model, image_layer_cls, text_layer_cls):
  """Per-level unit features of both towers.

  Args:
    model: the bound VLPModel (`ctx.student.apply(hitc_features, ...)`).
    image_layer_cls: [depth, B, Dv], the ViT's `layer_cls`.
    text_layer_cls: [text_layers, B, D], the text tower's `layer_cls`.

  Returns:
    (image [levels, B, E], text [levels, B, E]), float32, L2-normalised.
  """
  settings = model.config.head_cfg(NAME)
  image = [proj(image_layer_cls[v]) for proj, v in zip(model.vision_proj_hidden, settings.vision_layers)]
  text = [proj(text_layer_cls[t]) for proj, t in zip(model.text_proj_hidden, settings.text_layers)]
  return jnp.stack(image), jnp.stack(text)


def _init(model, feats):
  image, text = hitc_features(model, feats["image"]["layer_cls"], feats["text"]["layer_cls"])
  return dict(hitc_image=image, hitc_text=text)


heads.register_head(NAME, build=_build, init=_init, config_class=HitcConfig)
