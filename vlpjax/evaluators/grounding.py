"""Weakly-supervised grounding (RefCOCO+, ALBEF protocol): Grad-CAM heat map -> box ranking -> IoU.

Protocol (docs/method_spec.md §1.4 grounding row, Appendix G):
  1. Grad-CAM. `itm` mode (default): the cross-attention probabilities A [B, heads, L, 1+P] of
     fusion layer `gradcam_layer` (ALBEF: text layer 8 = fusion layer 2) and their gradient G of
     the summed ITM "match" logits; cam = A * ReLU(G), CLS image column dropped, padded text
     tokens masked, averaged over heads and text tokens, reshaped to the patch grid.
     `itc` mode: the self-attention of ViT block `block_num`, CLS query row, gradient of the
     diagonal ITC similarity s(i, t) / temp, averaged over heads.
  2. The heat map is upsampled bicubically to the image size.
  3. Each proposal box scores Σ heat map inside the box / area^0.5 (area in pixels); the best
     valid proposal is the prediction; a hit is IoU(prediction, ground truth) >= 0.5.
  4. Accuracy (percent) per split (`acc_val`, `acc_testA`, ...) and overall (`accuracy`).

How the gradient w.r.t. the attention probabilities is taken: `layers.Attention` with
`sow_weights` passes its probabilities through a Flax `perturb` point (a zero variable added to
them, collection `perturbations`). The gradient of the score w.r.t. that zero variable is the
gradient w.r.t. the probabilities, and the probabilities themselves come back through the
`intermediates` collection of the same forward pass: one forward and one backward pass, no
change to parameter names, and a no-op for every caller that does not pass `perturbations`.
The model copy used here sets `sow_attention=True` (fusion cross-attention); the ITC mode runs
the model's ViT params (`params["vision"]`) through a `VisionTransformer(sow_weights=True)`,
because `VLPModel` does not forward `sow_attention` to its image tower.

The retrieval rerank's image key/value cache (`VLPModel.fusion_image_cache`) is not used here:
each eval example is one (image, expression) pair fused once, so every image's keys and values
are already computed once per example; sharing them between the expressions of one image would
need the eval data grouped by image, and the image tower (run per example too) costs far more.

Deliberate differences from ALBEF's Grounding.py / grounding_eval (none changes a ranking):
  - The text-token average divides by the number of valid tokens; ALBEF divides by the padded
    length of the batch (a per-example constant factor, so box rankings are identical).
  - The heat map is upsampled to the (resized) model input and boxes are normalised to it;
    ALBEF upsamples to the original image size and uses pixel boxes.
  - IoU is the continuous one on normalised boxes; ALBEF's `computeIoU` counts inclusive pixels
    in the intersection (w - 1 conventions) but not in the union.
  - The best proposal is the argmax over valid proposals (first on ties, as ALBEF's strict `>`);
    ALBEF starts from score 0, so with all scores <= 0 it kept the previous expression's box.
    Masked and zero-area proposals never win; an expression without a valid one is a miss.
"""
import dataclasses
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlpjax.convert import resample
from vlpjax.evaluators import common
from vlpjax.models import concepts as concepts_lib
from vlpjax.models import vit

GRADCAM_MODES = ("itm", "itc")
IOU_THRESHOLD = 0.5
# ALBEF's grounding_eval(alpha=0.5): score = mass / area ** alpha.
AREA_EXPONENT = 0.5
# ALBEF's defaults: text layer 8 (the third of six fusion layers) in ITM mode, ViT block 8 in ITC mode.
DEFAULT_GRADCAM_LAYER = 2
DEFAULT_BLOCK_NUM = 8
BATCH_KEYS = ("image", "text_ids", "text_mask", "gt_box", "proposals", "proposal_mask", "split_id", "valid")
MODEL_KEYS = BATCH_KEYS[:6]   # the device inputs; split_id and valid stay on the host


# ----------------------------------------------------------------------------- Grad-CAM


def itm_gradcam(attention: jax.Array, gradients: jax.Array, text_mask: jax.Array, grid: int) -> jax.Array:
  """ITM-mode Grad-CAM from fusion cross-attention probabilities and their gradients.

  Args:
    attention: [batch, heads, text_len, 1 + grid**2 (+ extra)] probabilities of text queries
      over image tokens (CLS first; tokens after the patches, if any, are ignored).
    gradients: same shape; d(match logit)/d(attention).
    text_mask: [batch, text_len] 1 = real token, 0 = padding.
    grid: patch-grid side.

  Returns:
    float32 [batch, grid, grid]:
      heat[b, y, x] = 1 / (heads * n_b) * Σ_h Σ_{l valid} A[b,h,l,1+y*grid+x] * max(G[b,h,l,1+y*grid+x], 0)
    with n_b the number of valid text tokens of example b (all-padding rows give zeros).
  """
  batch, heads = attention.shape[:2]
  patches = grid * grid
  image_columns = slice(1, 1 + patches)   # the CLS column dropped
  positive_gradients = jax.nn.relu(gradients[..., image_columns].astype(jnp.float32))
  cam = attention[..., image_columns].astype(jnp.float32) * positive_gradients   # [batch, heads, L, patches]
  text_mask = text_mask.astype(jnp.float32)
  token_weight = text_mask / jnp.maximum(jnp.sum(text_mask, axis=1, keepdims=True), 1.0)  # [batch, text_len]
  heat = jnp.einsum("bhlp,bl->bp", cam, token_weight) / heads
  return heat.reshape(batch, grid, grid)


def itc_gradcam(attention: jax.Array, gradients: jax.Array, grid: int) -> jax.Array:
  """ITC-mode Grad-CAM from ViT self-attention probabilities and their gradients.

  Args:
    attention: [batch, heads, 1 + grid**2, 1 + grid**2] probabilities (CLS first).
    gradients: same shape; d(diagonal ITC similarity)/d(attention).
    grid: patch-grid side.

  Returns:
    float32 [batch, grid, grid]: heat[b, y, x] = mean_h A[b,h,0,1+y*grid+x] * max(G[b,h,0,1+y*grid+x], 0).
  """
  batch = attention.shape[0]
  patches = grid * grid
  cam = attention[:, :, 0, 1:1 + patches].astype(jnp.float32) * jax.nn.relu(
      gradients[:, :, 0, 1:1 + patches].astype(jnp.float32))
  return jnp.mean(cam, axis=1).reshape(batch, grid, grid)


def _attention_model(model):
  """A copy of `model` (same class and params) whose fusion attention is sown and perturbable."""
  return type(model)(dataclasses.replace(model.config, sow_attention=True, remat=False))


def _zeros_like_shapes(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _pick(tree, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


def _layer_leaf(tree, root: str, prefix: str, stacked: str, layer: int, rest: Sequence[str]):
  """Layer `layer`'s leaf at `rest` below `root`: `root/<prefix><layer>/rest`, or row `layer` of
  `root/<stacked>/rest` in a scanned stack (`config.model.scan_layers`). Sown values are tuples."""
  if f"{prefix}{layer}" in tree[root]:
    return _pick(tree[root][f"{prefix}{layer}"], rest)
  leaf = _pick(tree[root][stacked], rest)
  return tuple(x[layer] for x in leaf) if isinstance(leaf, tuple) else leaf[layer]


def itm_attention_and_gradients(model, params, images, text_ids, text_mask, *, layer: int, concepts=None
                                ) -> tuple[jax.Array, jax.Array]:
  """Cross-attention probabilities of fusion layer `layer` and the gradient of Σ_b match logit.

  Args:
    model: a `VLPModel` with `cross` fusion and the `itm` head; params: its params.
    images: [batch, H, W, 3]; text_ids, text_mask: [batch, text_len].
    layer: fusion-layer index (0-based within the fusion stack).
    concepts: optional image-side inputs of `encode_image` (ViCHA's concept_ids, concept_mask);
      their tokens follow the patches, so the patch columns stay 1..patches.

  Returns:
    (attention, gradients), both float32 [batch, heads, text_len, image_tokens]. Examples are
    independent, so the gradient of the sum is each example's own gradient.
  """
  model = _attention_model(model)
  variables = {"params": params}
  image = model.apply(variables, images, **(concepts or {}), method=model.encode_image)
  image_states = image["states"]
  text_states = model.apply(variables, text_ids, text_mask, method=model.encode_text)["states"]

  def fuse(fuse_variables, mutable):
    return model.apply(fuse_variables, text_states, text_mask, image_states, image["mask"], method=model.fuse,
                       mutable=mutable)

  def match_logit_sum(perturbations):
    fused, sown = fuse({"params": params, "perturbations": perturbations}, ["intermediates"])
    match = model.apply(variables, fused["text_states"][:, 0], method=model.itm_logits)[:, 1]
    return jnp.sum(match), sown["intermediates"]

  zeros = _zeros_like_shapes(jax.eval_shape(lambda: fuse(variables, ["perturbations"])[1]["perturbations"]))
  gradients, sown = jax.grad(match_logit_sum, has_aux=True)(zeros)
  where = ("fusion", "layer_", "layers", layer, ("crossattention", "attention_weights"))
  return _layer_leaf(sown, *where)[0], _layer_leaf(gradients, *where)


def itc_attention_and_gradients(model, params, images, text_ids, text_mask, *, layer: int
                                ) -> tuple[jax.Array, jax.Array]:
  """Self-attention probabilities of ViT block `layer` and the gradient of Σ_b s(i_b, t_b) / temp.

  s(i, t) is the ITC cosine similarity of the projected CLS features, as in ALBEF's ITC-mode
  Grad-CAM. The ViT runs from `params["vision"]` with attention sowing switched on.

  Returns:
    (attention, gradients), both float32 [batch, heads, 1 + patches, 1 + patches].
  """
  cfg = model.config
  vision = vit.VisionTransformer(cfg.vision, cfg.compute_dtype, sow_weights=True, scan=cfg.scan_layers)
  variables = {"params": params}
  text_states = model.apply(variables, text_ids, text_mask, method=model.encode_text)["states"]
  text_feat = model.apply(variables, text_states[:, 0], method=model.project_text)
  temperature = model.apply(variables, method=model.temperature)

  def diagonal_similarity_sum(perturbations):
    out, sown = vision.apply({"params": params["vision"], "perturbations": perturbations}, images,
                             mutable=["intermediates"])
    image_feat = model.apply(variables, out["states"][:, 0], method=model.project_image)
    return jnp.sum(image_feat * text_feat) / temperature, sown["intermediates"]

  def vision_perturbations():
    return vision.apply({"params": params["vision"]}, images, mutable=["perturbations"])[1]["perturbations"]

  zeros = _zeros_like_shapes(jax.eval_shape(vision_perturbations))
  gradients, sown = jax.grad(diagonal_similarity_sum, has_aux=True)(zeros)
  where = ("vision", "block_", "blocks", layer, ("attn", "attention_weights"))
  sown, gradients = {"vision": sown}, {"vision": gradients}
  return _layer_leaf(sown, *where)[0], _layer_leaf(gradients, *where)


def check_gradcam_setting(model_config, mode: str, layer: int, where: str = "layer"):
  """Fails naming `where` if `mode` / `layer` do not fit the model (before any compute)."""
  if mode not in GRADCAM_MODES:
    raise ValueError(f"Grad-CAM mode must be one of {GRADCAM_MODES} (config.eval.gradcam_mode), got {mode!r}")
  if mode == "itm":
    if model_config.fusion != "cross":
      raise ValueError("ITM-mode Grad-CAM needs cross-attention: config.model.fusion must be 'cross', got "
                       f"{model_config.fusion!r} (use config.eval.gradcam_mode='itc')")
    if "itm" not in model_config.heads:
      raise ValueError(f"ITM-mode Grad-CAM needs the 'itm' head; config.model.heads = {model_config.heads}")
    count, what = model_config.text.fusion_layers, "fusion layers (config.model.text.fusion_layers)"
  else:
    count, what = model_config.vision.depth, "ViT blocks (config.model.vision.depth)"
  if not 0 <= int(layer) < count:
    raise ValueError(f"{where}={layer} is out of range: the model has {count} {what}")


def gradcam_heatmaps(model, params, images, text_ids, text_mask, *, layer: int, mode: str = "itm",
                     concepts=None) -> jax.Array:
  """Grad-CAM heat maps of (image, expression) pairs on the patch grid.

  Pure and traceable (wrap it in `jax.jit`, or use `make_gradcam_fn`).

  Args:
    model, params: a `VLPModel` (or task subclass) and its params.
    images: float32 [batch, H, W, 3]; text_ids, text_mask: int32 [batch, text_len].
    layer: fusion layer (mode "itm") or ViT block (mode "itc"), 0-based.
    mode: "itm" (cross-attention, match logit) or "itc" (ViT CLS attention, ITC similarity).
    concepts: optional image-side inputs (ViCHA's concept_ids, concept_mask), used by mode "itm"
      (mode "itc" runs the bare ViT).

  Returns:
    float32 [batch, grid, grid], grid = config.vision.grid; see `itm_gradcam` / `itc_gradcam`.
  """
  check_gradcam_setting(model.config, mode, layer)
  grid = model.config.vision.grid
  if mode == "itm":
    attention, gradients = itm_attention_and_gradients(model, params, images, text_ids, text_mask,
                                                       layer=layer, concepts=concepts)
    return itm_gradcam(attention, gradients, text_mask, grid)
  attention, gradients = itc_attention_and_gradients(model, params, images, text_ids, text_mask,
                                                     layer=layer)
  return itc_gradcam(attention, gradients, grid)


def upsample(heatmap: jax.Array, size: Union[int, Sequence[int]]) -> jax.Array:
  """Bicubic upsampling of heat maps [batch, h, w] to [batch, H, W] (float32).

  Uses PyTorch's `F.interpolate(mode='bicubic', align_corners=False)` kernel (Keys, a = -0.75,
  half-pixel centres, border taps clamped) as ALBEF's grounding_eval does, through the
  separable matrices of `vlpjax.convert.resample` (`jax.image.resize('cubic')` uses a = -0.5).
  Values may overshoot slightly below zero near sharp peaks, as in torch.
  """
  height, width = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
  rows = jnp.asarray(resample.bicubic_matrix(heatmap.shape[1], height), jnp.float32)   # [H, h]
  cols = jnp.asarray(resample.bicubic_matrix(heatmap.shape[2], width), jnp.float32)    # [W, w]
  return jnp.einsum("yi,bij,xj->byx", rows, heatmap.astype(jnp.float32), cols)


def make_gradcam_fn(model, *, layer: int, mode: str = "itm", size: Optional[Union[int, Sequence[int]]] = None
                    ) -> Callable[..., jax.Array]:
  """Jitted `(params, images, text_ids, text_mask) -> heat maps` for notebooks.

  Returns [batch, grid, grid], or [batch, H, W] upsampled to `size` ("image" = the input size).
  """
  check_gradcam_setting(model.config, mode, layer)

  def heatmaps(params, images, text_ids, text_mask):
    heat = gradcam_heatmaps(model, params, images, text_ids, text_mask, layer=layer, mode=mode)
    if size is None:
      return heat
    return upsample(heat, images.shape[1:3] if size == "image" else size)

  return jax.jit(heatmaps)


# ----------------------------------------------------------------------------- box ranking


def iou(box_a, box_b) -> jax.Array:
  """Intersection over union of boxes `(ymin, xmin, ymax, xmax)`, broadcast over leading axes.

  Args:
    box_a: [..., 4]; box_b: [..., 4] (broadcastable).

  Returns:
    float32 [...]: |a ∩ b| / (|a| + |b| - |a ∩ b|) with extents clipped at 0 (an inverted box has
    area 0); 0 where the union is empty (two zero-area boxes).
  """
  box_a = jnp.asarray(box_a, jnp.float32)
  box_b = jnp.asarray(box_b, jnp.float32)

  def area(box):
    return jnp.maximum(box[..., 2] - box[..., 0], 0) * jnp.maximum(box[..., 3] - box[..., 1], 0)

  def overlap(low, high):
    start = jnp.maximum(box_a[..., low], box_b[..., low])
    return jnp.maximum(jnp.minimum(box_a[..., high], box_b[..., high]) - start, 0)

  inter = overlap(0, 2) * overlap(1, 3)
  union = area(box_a) + area(box_b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def box_scores(heatmap, boxes, mask) -> jax.Array:
  """ALBEF's proposal score: heat-map mass inside the box / (box area in pixels) ** 0.5.

  Args:
    heatmap: [H, W] (upsampled to the image).
    boxes: [P, 4] normalised `(ymin, xmin, ymax, xmax)`; box rows are the pixel rows
      floor(ymin * H) <= r < floor(ymax * H) (ALBEF's int(y):int(y + h)), columns likewise.
    mask: bool [P], False = padding proposal.

  Returns:
    float32 [P]: Σ_{r, c in box} heatmap[r, c] / ((ymax - ymin) H (xmax - xmin) W) ** 0.5, and -inf
    for masked proposals and boxes of zero (or negative) area, so they are never chosen.
  """
  heatmap = jnp.asarray(heatmap, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  height, width = heatmap.shape
  ymin, xmin, ymax, xmax = (boxes[:, k] for k in range(4))

  def indicator(start, stop, size):
    """[P, size]: 1 on the pixels floor(start * size) .. floor(stop * size) - 1."""
    pixels = jnp.arange(size)[None, :]
    inside = (pixels >= jnp.floor(start * size)[:, None]) & (pixels < jnp.floor(stop * size)[:, None])
    return inside.astype(jnp.float32)

  mass = jnp.einsum("ph,hw,pw->p", indicator(ymin, ymax, height), heatmap, indicator(xmin, xmax, width))
  area = (ymax - ymin) * height * (xmax - xmin) * width
  usable = jnp.asarray(mask, bool) & (ymax > ymin) & (xmax > xmin)
  return jnp.where(usable, mass / jnp.where(usable, area, 1.0) ** AREA_EXPONENT, -jnp.inf)


def locate(heatmaps, proposals, proposal_mask, gt_box) -> dict[str, jax.Array]:
  """Best proposal per expression and whether it hits the ground truth.

  Args:
    heatmaps: [batch, H, W]; proposals: [batch, P, 4] normalised; proposal_mask: bool [batch, P];
    gt_box: [batch, 4] normalised.

  Returns:
    dict: `best` int32 [batch] (argmax of `box_scores`, first on ties), `box` [batch, 4],
    `iou` [batch] (0 without a usable proposal), `hit` bool [batch] (iou >= IOU_THRESHOLD).
  """
  scores = jax.vmap(box_scores)(heatmaps, proposals, proposal_mask)                 # [batch, P]
  best = jnp.argmax(scores, axis=1).astype(jnp.int32)
  found = jnp.isfinite(jnp.max(scores, axis=1))
  box = jnp.take_along_axis(jnp.asarray(proposals, jnp.float32), best[:, None, None], axis=1)[:, 0]
  overlap = jnp.where(found, iou(box, gt_box), 0.0)
  return dict(best=best, box=box, iou=overlap, hit=found & (overlap >= IOU_THRESHOLD))


# ----------------------------------------------------------------------------- evaluation


def make_grounding_fn(model, *, layer: int, mode: str = "itm", mesh: Optional[Mesh] = None):
  """Jitted `(params, batch) -> hit bool [batch]` (Grad-CAM, upsample to the image size, rank, IoU).

  `batch` holds image, text_ids, text_mask, proposals, proposal_mask, gt_box (see `BATCH_KEYS`).
  With a `mesh` the result is replicated, so every process can read it.
  """
  check_gradcam_setting(model.config, mode, layer)

  def ground(params, batch):
    heat = gradcam_heatmaps(model, params, batch["image"], batch["text_ids"], batch["text_mask"], layer=layer,
                            mode=mode, concepts=concepts_lib.batch_concepts(batch))
    heat = upsample(heat, batch["image"].shape[1:3])
    return locate(heat, batch["proposals"], batch["proposal_mask"], batch["gt_box"])["hit"]

  return jax.jit(common.with_replicated_outputs(ground, mesh))


def split_accuracy(hits, split_id, valid, split_names: Sequence[str]) -> dict[str, float]:
  """Accuracies in percent from per-example hits.

  Args:
    hits, valid: bool [N]; split_id: int [N] indexing `split_names`.

  Returns:
    `acc_<split>` for every split with at least one valid example, `accuracy` over all valid
    examples and `num_examples`.

  Raises:
    ValueError: no valid example, or a valid example's split_id outside `split_names`.
  """
  hits, valid = np.asarray(hits, bool), np.asarray(valid, bool)
  split_id = np.asarray(split_id, np.int64)
  if not valid.any():
    raise ValueError("grounding evaluation: no valid example in the eval batches")
  bad = valid & ((split_id < 0) | (split_id >= len(split_names)))
  if bad.any():
    raise ValueError(f"grounding evaluation: split_id {sorted(set(split_id[bad].tolist()))} outside "
                     f"data.split_names={list(split_names)}")
  out = {}
  for index, name in enumerate(split_names):
    chosen = valid & (split_id == index)
    if chosen.any():
      out[f"acc_{name}"] = 100.0 * float(np.mean(hits[chosen]))
  out["accuracy"] = 100.0 * float(np.mean(hits[valid]))
  out["num_examples"] = float(valid.sum())
  return out


def _evaluate(ground, params, batches: Iterable[dict], split_names: Sequence[str], mesh: Optional[Mesh]
              ) -> dict[str, float]:
  """`evaluate` with a given jitted `ground` (from `make_grounding_fn`) and placed params."""
  hits, split_ids, valid = [], [], []
  for inputs, batch in common.device_batches(batches, MODEL_KEYS, mesh, "grounding evaluation",
                                             host_keys=("split_id",), optional=concepts_lib.CONCEPT_KEYS,
                                             size_name="eval batch size (config.eval.batch_size)"):
    hits.append(common.settle(ground(params, inputs)))   # read back once at the end
    split_ids.append(np.asarray(batch["split_id"]))
    valid.append(np.asarray(batch["valid"], bool))
  if not hits:
    raise ValueError("grounding evaluation: no batches")
  return split_accuracy(np.concatenate([np.asarray(h) for h in hits]), np.concatenate(split_ids),
                        np.concatenate(valid), split_names)


def evaluate(model, params, batches: Iterable[dict], split_names: Sequence[str], *, layer: int,
             mode: str = "itm", mesh: Optional[Mesh] = None) -> dict[str, float]:
  """Grounding accuracy of `params` over fixed-size padded eval batches (one-off; see `Evaluator`).

  Args:
    model, params: a `VLPModel` and its params (kept in their sharding when on the mesh).
    batches: dicts with `BATCH_KEYS` (the grounding eval-batch contract, leading axis B).
    split_names: names of the `split_id` values.
    layer, mode: as `gradcam_heatmaps`.
    mesh: optional; batches are split over its batch axes (B must divide).

  Returns:
    `split_accuracy`'s metrics.
  """
  ground = make_grounding_fn(model, layer=layer, mode=mode, mesh=mesh)
  return _evaluate(ground, common.place_params(params, mesh), batches, split_names, mesh)


# ----------------------------------------------------------------------------- evaluator contract

EVAL_KEYS = ("gradcam_layer", "gradcam_mode", "block_num")


def gradcam_setting(eval_config) -> tuple[str, int, str]:
  """(mode, layer, config key of the layer) from `config.eval` (ALBEF defaults: itm, layer 2, block 8)."""
  mode = str(eval_config.get("gradcam_mode", "itm") or "itm")
  if mode == "itc":
    return mode, int(eval_config.get("block_num", DEFAULT_BLOCK_NUM)), "config.eval.block_num"
  return mode, int(eval_config.get("gradcam_layer", DEFAULT_GRADCAM_LAYER)), "config.eval.gradcam_layer"


class Evaluator(common.Evaluator):
  """Grounding accuracy on `config.eval.split` of `config.input`: data and Grad-CAM built once.

  `config.eval`: gradcam_mode ('itm' or 'itc'), gradcam_layer (itm) or block_num (itc); see
  `gradcam_setting`. `data`: optional eval data with the `tasks.make_eval_data` contract for
  grounding (batches(), split_names).
  """

  def make_functions(self):
    mode, layer, where = gradcam_setting(self.config.eval)
    check_gradcam_setting(self.model.config, mode, layer, where)
    self._ground = make_grounding_fn(self.model, layer=layer, mode=mode, mesh=self.mesh)
    return dict(ground=self._ground)

  def make_data(self):
    from input_pipeline import tasks
    return tasks.make_eval_data(self.config.input, split=self.config.eval.split, batch_size=self.batch_size)

  def evaluate(self, params) -> dict[str, float]:
    return _evaluate(self._ground, params, self.data.batches(), list(self.data.split_names), self.mesh)


def run(config, model, params, *, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """One-off `Evaluator(config, model, mesh)(params)` (evaluator contract)."""
  return Evaluator(config, model, mesh)(params)


def format_results(results: dict[str, float]) -> str:
  """One table row: the accuracy of each split present, then the overall accuracy, with a header."""
  names = [k for k in results if k.startswith("acc_")] + ["accuracy"]
  labels = [k[len("acc_"):] if k.startswith("acc_") else "overall" for k in names]
  width = max(7, *(len(label) for label in labels))
  header = "  ".join(f"{label:>{width}}" for label in labels)
  row = "  ".join(f"{results[k]:{width}.2f}" for k in names)
  return f"{header}\n{row}"


# ----------------------------------------------------------------------------- display


def _jet(values: np.ndarray) -> np.ndarray:
  """Jet-like colours [..., 3] in [0, 1] for values in [0, 1]: blue -> cyan -> yellow -> red."""
  four = 4.0 * values[..., None]
  centres = np.array([3.0, 2.0, 1.0])   # red, green, blue peak at 0.75, 0.5, 0.25
  return np.clip(1.5 - np.abs(four - centres), 0.0, 1.0)


def overlay(image_uint8, heatmap, *, alpha: float = 0.5) -> np.ndarray:
  """The heat map in jet colours blended over the image (no matplotlib needed).

  Args:
    image_uint8: uint8 [H, W, 3]; heatmap: [H, W] (e.g. `upsample(...)[0]`), min-max normalised
      here (a constant map is drawn as its minimum, dark blue).
    alpha: weight of the colours.

  Returns:
    uint8 [H, W, 3] = round((1 - alpha) * image + alpha * 255 * jet(normalised heat map)).
  """
  image = np.asarray(image_uint8)
  heat = np.asarray(heatmap, np.float64)
  if image.ndim != 3 or image.shape[-1] != 3 or heat.shape != image.shape[:2]:
    raise ValueError(f"overlay: expected image [H, W, 3] and heatmap [H, W] of the same size, got "
                     f"{image.shape} and {heat.shape} (upsample the heat map to the image size first)")
  span = heat.max() - heat.min()
  normalised = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
  blended = (1.0 - alpha) * image.astype(np.float64) + alpha * 255.0 * _jet(normalised)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)
