"""VLMixer's model kind (`config.model.kind = 'vlmixer'`): one BERT-initialisable encoder over
*mixed* sequences, where visual tokens stand in the text (docs/method_spec.md §4.2 D).

It keeps `VLPModel`'s towers and parameter names (vision = ViT, text = BERT layers 0..5, fusion =
the `merged` single-stream layers 6..11, so `python -m vlpjax.convert --kind=hf_bert` fills it)
and adds the mixed-sequence embedding:

  visual token  = visual_in(f) + box_embed(x1, y1, x2, y2, w, h)
                  f: a ViT patch state, or the mean of the patch states whose centres fall in one
                  cell of an object box (gallery entries, `pool_boxes`); the box is that cell's
  embedding     = LayerNorm(token + position[pos] + type[t]) -> dropout   (BERT's tables)
                  token: the word embedding of a word, the visual token of a visual slot;
                  t = 0 for words, 1 for visual tokens (BERT's second token-type row)
  encoder       = the text layers over the whole sequence (states, per-layer CLS)
  fusion        = the merged layers: over one mixed sequence alone (`fuse_sequence`), or over
                  [text ; image sentence] (`fuse`, tag-image pairs and the ITM rerank)

An image on its own is an "image sentence": [CLS] v_1 .. v_T [SEP], each v a visual token of one
patch (or of one cell of a pooled grid, `image_pool`), all at position 1 and type 1: the whole
image stands where one grounded word would. `encode_image` encodes it with the text layers, so
images and sentences share one encoder and one projection (`cmcl` head), which is what scores a
pair for zero-shot retrieval (the cosine of the two projected CLS states).

Heads this kind adds (`config.model.heads`): `cmcl` (the projection of the CLS state and a
learnable temperature, clamped to [temp_min, temp_max]) and `concept` (a classifier over the
concept vocabulary for the optional concept-recovery term of `mixed_mlm`).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpjax.models import heads, layers, vlp


@dataclasses.dataclass(frozen=True)
class VLMixerConfig(vlp.ModelConfig):
  """`ModelConfig` + the mixed-sequence settings (config.model.*).

  num_concepts: size of the concept vocabulary (gallery rows, the `concept` head's classes).
  entry_grid: (gh, gw): a gallery entry's box is split into gh x gw cells, each pooled to one
    visual token (P = gh * gw tokens per entry).
  box_embedding: add the box-position embedding to every visual token.
  image_pool: the image sentence's tokens: (0, 0) = one per patch; (gh, gw) = the whole image
    pooled to a gh x gw grid.
  cls_id, sep_id: the tokenizer's [CLS] / [SEP] ids (framing of the image sentence).
  gallery_source: where a CMC occurrence's visual tokens come from: 'batch_then_bank' (an entry
    of the step's image batch through the online ViT, else the `gallery` objective's bank),
    'batch' or 'bank' (`vlpjax/objectives/cmc.py`).
  """
  num_concepts: int = 0
  entry_grid: tuple = (2, 2)
  box_embedding: bool = True
  image_pool: tuple = (0, 0)
  cls_id: int = 101
  sep_id: int = 102
  gallery_source: str = "batch_then_bank"

  @property
  def entry_tokens(self) -> int:
    return int(self.entry_grid[0]) * int(self.entry_grid[1])

  @classmethod
  def from_config(cls, cfg) -> "VLMixerConfig":
    config = super().from_config(cfg)
    config = dataclasses.replace(config, entry_grid=tuple(int(v) for v in config.entry_grid),
                                 image_pool=tuple(int(v) for v in config.image_pool))
    if config.fusion != "merged":
      raise ValueError(f"config.model.fusion must be 'merged' for kind 'vlmixer' (one encoder over "
                       f"the mixed sequence), got {config.fusion!r}")
    if len(config.entry_grid) != 2 or min(config.entry_grid) < 1:
      raise ValueError(f"config.model.entry_grid must be (gh, gw) >= 1, got {config.entry_grid}")
    if len(config.image_pool) != 2 or min(config.image_pool) < 0:
      raise ValueError(f"config.model.image_pool must be (0, 0) or (gh, gw), got {config.image_pool}")
    if config.gallery_source not in ("batch_then_bank", "batch", "bank"):
      raise ValueError(f"config.model.gallery_source must be 'batch_then_bank', 'batch' or 'bank', got "
                       f"{config.gallery_source!r}")
    if "concept" in config.heads and config.num_concepts < 1:
      raise ValueError("the 'concept' head needs config.model.num_concepts > 0")
    return config


# ----------------------------------------------------------------------------- boxes -> tokens


def box_cells(boxes: jax.Array, cells: tuple[int, int]) -> jax.Array:
  """Each box split into a gh x gw grid: [..., 4] -> [..., gh * gw, 4] (ymin, xmin, ymax, xmax),
  cells in row-major order."""
  gh, gw = cells
  ymin, xmin, ymax, xmax = jnp.moveaxis(boxes, -1, 0)
  fy = jnp.arange(gh + 1, dtype=boxes.dtype) / gh
  fx = jnp.arange(gw + 1, dtype=boxes.dtype) / gw
  ys = ymin[..., None] + (ymax - ymin)[..., None] * fy                   # [..., gh + 1]
  xs = xmin[..., None] + (xmax - xmin)[..., None] * fx                   # [..., gw + 1]
  y0 = jnp.broadcast_to(ys[..., :-1, None], ys.shape[:-1] + (gh, gw))
  y1 = jnp.broadcast_to(ys[..., 1:, None], ys.shape[:-1] + (gh, gw))
  x0 = jnp.broadcast_to(xs[..., None, :-1], xs.shape[:-1] + (gh, gw))
  x1 = jnp.broadcast_to(xs[..., None, 1:], xs.shape[:-1] + (gh, gw))
  return jnp.stack([y0, x0, y1, x1], axis=-1).reshape(boxes.shape[:-1] + (gh * gw, 4))


def pooling_weights(boxes: jax.Array, grid: int) -> jax.Array:
  """Mean-pooling weights of the patches of a grid x grid patch grid for each box.

  A patch belongs to a box when its centre lies in it (half-open: ymin <= cy < ymax); a box that
  holds no centre (smaller than a patch) takes the patch that holds its own centre.

  Args:
    boxes: [..., 4] (ymin, xmin, ymax, xmax) in [0, 1] of the image.
    grid: patches per side.

  Returns:
    [..., grid * grid] float32, each row summing to 1 (patches row-major).
  """
  centre = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid
  cy = jnp.repeat(centre, grid)                                          # [N]
  cx = jnp.tile(centre, grid)
  b = boxes.astype(jnp.float32)[..., None, :]
  inside = (cy >= b[..., 0]) & (cy < b[..., 2]) & (cx >= b[..., 1]) & (cx < b[..., 3])
  box = boxes.astype(jnp.float32)
  row = jnp.clip(jnp.floor((box[..., 0] + box[..., 2]) / 2 * grid), 0, grid - 1)
  col = jnp.clip(jnp.floor((box[..., 1] + box[..., 3]) / 2 * grid), 0, grid - 1)
  fallback = jax.nn.one_hot((row * grid + col).astype(jnp.int32), grid * grid, dtype=jnp.float32)
  weights = jnp.where(jnp.any(inside, axis=-1, keepdims=True), inside.astype(jnp.float32), fallback)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def pool_boxes(patch_states: jax.Array, boxes: jax.Array, grid: int, cells: tuple[int, int]):
  """Visual-token features of boxes: each box's cells pooled over the patches in them.

  Args:
    patch_states: [B, N, Dv] (N = grid * grid, no CLS).
    boxes: [B, M, 4] (ymin, xmin, ymax, xmax) in [0, 1].
    grid: patches per side; cells: (gh, gw) cells per box (P = gh * gw).

  Returns:
    (features [B, M, P, Dv] in the states' dtype, cell boxes [B, M, P, 4] float32).
  """
  cell_boxes = box_cells(boxes.astype(jnp.float32), cells)
  weights = pooling_weights(cell_boxes, grid)                            # [B, M, P, N]
  features = jnp.einsum("bmpn,bnd->bmpd", weights.astype(patch_states.dtype), patch_states)
  return features, cell_boxes


def box_features(boxes: jax.Array) -> jax.Array:
  """(ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2, w, h), the box-position embedding's input."""
  ymin, xmin, ymax, xmax = jnp.moveaxis(boxes.astype(jnp.float32), -1, 0)
  return jnp.stack([xmin, ymin, xmax, ymax, xmax - xmin, ymax - ymin], axis=-1)


def patch_boxes(grid: int) -> jax.Array:
  """The box of each patch of a grid x grid patch grid: [grid * grid, 4], row-major."""
  edges = jnp.arange(grid + 1, dtype=jnp.float32) / grid
  r, c = jnp.repeat(jnp.arange(grid), grid), jnp.tile(jnp.arange(grid), grid)
  return jnp.stack([edges[r], edges[c], edges[r + 1], edges[c + 1]], axis=-1)


# ----------------------------------------------------------------------------- the model


@vlp.register_model("vlmixer")
class VLMixerModel(vlp.VLPModel):
  """`VLPModel` whose encoder reads mixed sequences (see the module docstring).

  Methods beyond `VLPModel`'s (B batch, L length, N patches, D text width, Dv vision width):
    patch_states(images) -> [B, N, Dv]  ViT outputs without CLS
    pool_entries(patch_states, boxes [B, M, 4]) -> (features [B, M, P, Dv], cell boxes [B, M, P, 4])
    visual_tokens(features [..., Dv], boxes [..., 4]) -> [..., D]
    embed_sequence(ids, types, positions [B, L], visual=None [B, L, D]) -> [B, L, D]
    encode_embedded(x [B, L, D], mask) -> dict(states, layer_cls)    the text layers
    encode_mixed(ids, mask, types, positions, visual) -> dict(states, layer_cls)
    image_sentence(patch_states) -> (embedded [B, 2 + T, D], mask [B, 2 + T])
    encode_image(images) -> dict(states [B, 2 + T, D], layer_cls, mask)  the image sentence, encoded
    fuse_sequence(states, mask) -> `fuse` over one sequence (the merged layers)
    project_image / project_text(cls) -> [B, embed_dim] (the `cmcl` projection, shared)
    temperature() -> the clamped `cmcl` temperature; concept_logits(states [..., D]) -> [..., C]
  """
  config: VLMixerConfig
  config_class = VLMixerConfig

  def setup(self):
    super().setup()
    cfg, dtype = self.config, self.config.compute_dtype
    self.visual_in = layers.Dense(cfg.text.width, ("mlp", "embed"), dtype=dtype)
    if cfg.box_embedding:
      self.box_embed = layers.Dense(cfg.text.width, (None, "embed"), dtype=dtype)

  # --------------------------------------------------------------------------- visual tokens

  def patch_states(self, images):
    return self.vision(images)["states"][:, 1:]

  def pool_entries(self, patch_states, boxes):
    return pool_boxes(patch_states, boxes, self.config.vision.grid, self.config.entry_grid)

  def visual_tokens(self, features, boxes):
    x = self.visual_in(features)
    if self.config.box_embedding:
      x = x + self.box_embed(box_features(boxes).astype(x.dtype))
    return x

  # --------------------------------------------------------------------------- sequences

  def embed_sequence(self, ids, types, positions, visual=None, deterministic=True):
    emb = self.text.embeddings
    x = emb.word(ids)
    if visual is not None:
      x = jnp.where((types == 1)[..., None], visual.astype(x.dtype), x)
    x = x + jnp.take(emb.position.embedding, positions, axis=0).astype(x.dtype)
    type_table = emb.token_type.embedding.astype(x.dtype)
    x = x + jax.nn.one_hot(types, type_table.shape[0], dtype=x.dtype) @ type_table
    return emb.dropout(emb.norm(x), deterministic=deterministic)

  def encode_embedded(self, x, mask, deterministic=True):
    out = self.text.encode_embedded(x, mask, deterministic=deterministic)
    return dict(states=out["states"], layer_cls=out["layer_cls"])

  def encode_mixed(self, ids, mask, types, positions, visual, deterministic=True):
    x = self.embed_sequence(ids, types, positions, visual, deterministic)
    return self.encode_embedded(x, mask, deterministic)

  def image_sentence(self, patch_states, deterministic=True):
    cfg = self.config
    grid = cfg.vision.grid
    batch = patch_states.shape[0]
    if cfg.image_pool == (0, 0):
      boxes = jnp.broadcast_to(patch_boxes(grid), (batch, grid * grid, 4))
      features = patch_states
    else:
      whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0]), (batch, 1, 4))
      features, boxes = pool_boxes(patch_states, whole, grid, cfg.image_pool)
      features, boxes = features[:, 0], boxes[:, 0]
    visual = self.visual_tokens(features, boxes)                         # [B, T, D]
    num = visual.shape[1]
    ids = jnp.concatenate([jnp.full((batch, 1), cfg.cls_id), jnp.full((batch, num), cfg.cls_id),
                           jnp.full((batch, 1), cfg.sep_id)], axis=1).astype(jnp.int32)
    types = jnp.concatenate([jnp.zeros((batch, 1)), jnp.ones((batch, num)), jnp.zeros((batch, 1))],
                            axis=1).astype(jnp.int32)
    positions = jnp.concatenate([jnp.zeros((batch, 1)), jnp.ones((batch, num)), jnp.full((batch, 1), 2)],
                                axis=1).astype(jnp.int32)
    padded = jnp.pad(visual, ((0, 0), (1, 1), (0, 0)))
    x = self.embed_sequence(ids, types, positions, padded, deterministic)
    return x, jnp.ones(ids.shape, jnp.int32)

  def encode_image(self, images, patch_mask=None, extra_tokens=None, extra_mask=None, keep_indices=None, *,
                   concept_ids=None, concept_mask=None, deterministic=True):
    unsupported = dict(patch_mask=patch_mask, extra_tokens=extra_tokens, extra_mask=extra_mask,
                       keep_indices=keep_indices, concept_ids=concept_ids, concept_mask=concept_mask)
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
      raise ValueError(f"model kind 'vlmixer': encode_image takes the pixels only, not {given}")
    x, mask = self.image_sentence(self.patch_states(images), deterministic)
    out = self.encode_embedded(x, mask, deterministic)
    out["mask"] = mask
    return out

  def fuse_sequence(self, states, mask, deterministic=True):
    empty = jnp.zeros(states.shape[:1] + (0,), jnp.int32)
    return self.fusion(states, mask, states[:, :0], empty, deterministic=deterministic)

  # --------------------------------------------------------------------------- heads

  def project_image(self, cls):
    return self.cmcl_proj(cls)

  def project_text(self, cls):
    return self.cmcl_proj(cls)

  def temperature(self):
    return jnp.clip(self.cmcl_temp, self.config.temp_min, self.config.temp_max)

  def concept_logits(self, states):
    return self.concept_head(states).astype(jnp.float32)


def _build_cmcl(model):
  cfg = model.config
  model.cmcl_proj = heads.Projection(cfg.embed_dim, cfg.compute_dtype)
  model.cmcl_temp = model.param("cmcl_temp", layers.with_axes(nn.initializers.constant(cfg.temp_init), ()), (),
                                jnp.float32)


def _init_cmcl(model, feats):
  return dict(cmcl_feat=model.project_text(feats["text"]["states"][:, 0]), cmcl_temp=model.temperature())


def _constrain_cmcl(model_cfg, params):
  return {**params, "cmcl_temp": jnp.clip(params["cmcl_temp"], model_cfg.temp_min, model_cfg.temp_max)}


def _build_concept(model):
  model.concept_head = layers.Dense(model.config.num_concepts, ("embed", None), dtype=model.config.compute_dtype)


def _init_concept(model, feats):
  return dict(concept_logits=model.concept_logits(feats["fused"]["text_states"][:, 0]))


heads.register_head("cmcl", build=_build_cmcl, init=_init_cmcl, constrain=_constrain_cmcl)
heads.register_head("concept", build=_build_concept, init=_init_concept)
