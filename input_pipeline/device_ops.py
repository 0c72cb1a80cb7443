"""ALBEF's pixel augmentation on the accelerator: resize, flip, RandAugment and normalise in JAX.

With device augmentation the host decodes only the random crop window and pads it top-left into
a fixed uint8 canvas; the jitted ops here finish the job on the whole global batch. They
reproduce the TensorFlow ops of `input_pipeline.ops_image` op by op, with the same rounding,
truncation and clipping, to within one intensity level (most are bit-exact; each op says).
A spec string chains them as the host registry does:

    augment = make_augment(ALBEF_DEVICE_PP.format(size=256, canvas=688), seed)
    batch = augment(batch, step)

Batch contract: `image` uint8 [batch, canvas, canvas, 3] whose example i holds its crop in
rows [0, h) and columns [0, w) with (h, w) = `image_hw`[i] (int32 [batch, 2]); the rest of the
canvas is ignored. After the default chain `image` is float32 [batch, size, size, 3],
normalised, and `image_hw` is gone; other keys pass through untouched.

An op is `factory(*args, **kwargs) -> fn(batch, key) -> batch`, where `key` is a typed PRNG key.
Random ops give row i the key fold_in(op_key, i) for its global row index, so the result is a
pure function of (seed, step, batch) whatever the batch's sharding. Images travel between ops
as float32 [height, width, 3] holding whole numbers 0..255. The random streams differ from the
host pipeline's; the per-op results do not. This module imports no TensorFlow, so it runs
where only JAX is installed.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import registry
from input_pipeline.albef_augment import (ALBEF_OPS, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN,  # noqa: F401
                                          IMAGENET_STD, NORMALIZATIONS, randaug_levels)

# The device half of ALBEF's training pipeline; format with the image size and the canvas side
# (the longest crop side, `albef_augment.canvas_side(size)`).
ALBEF_DEVICE_PP = "resize_canvas({size}, canvas={canvas})|flip|randaug(2, 7)|normalize('clip')"

# Folded into the run seed before the step, fixed forever so that augmentations reproduce.
_SALT = 14

_OPS = registry.OpRegistry("device op")
register, names, get_op = _OPS.register, _OPS.names, _OPS.get_op


def parse(spec: str) -> Callable[[dict, jax.Array], dict]:
  """The composition of the `|`-separated ops in `spec` as `fn(batch, key) -> batch`.

  The op at position k gets the key fold_in(key, k).
  """
  ops = [get_op(s) for s in registry.split(spec)]

  def apply(batch, key):
    for position, op in enumerate(ops):
      batch = op(batch, jax.random.fold_in(key, position))
    return batch

  return apply


def make_augment(spec: str, seed: int) -> Callable[[dict, int | jax.Array], dict]:
  """`parse(spec)` jitted as `fn(batch, step)` with key fold_in(fold_in(key(seed), salt), step).

  The result is a pure function of (seed, step, batch); nothing is donated, so the caller's
  batch stays valid.
  """
  augment = parse(spec)

  @jax.jit
  def fn(batch, step):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SALT), step)
    return augment(batch, key)

  return fn


def _per_example(fn: Callable, images: jax.Array, key: jax.Array) -> jax.Array:
  """vmap of `fn(image, row_key)` over the batch with row_key = fold_in(key, row index)."""
  rows = jnp.arange(images.shape[0])
  row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(rows)
  return jax.vmap(fn)(images, row_keys)


# ----------------------------------------------------------------------------- resize


def _keys_cubic(x: jax.Array) -> jax.Array:
  """Keys' cubic kernel with a = -0.5, in the operation order of TF's KeysCubicKernelFunc."""
  x = jnp.abs(x)
  outer = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  inner = ((1.5 * x - 2.5) * x) * x + 1.0
  return jnp.where(x >= 2.0, 0.0, jnp.where(x >= 1.0, outer, inner))


def _triangle(x: jax.Array) -> jax.Array:
  return jnp.maximum(0.0, 1.0 - jnp.abs(x))


_RESIZE_KERNELS = {"bicubic": _keys_cubic, "bilinear": _triangle}


def _resize_weights(in_size: jax.Array, out_size: int, canvas: int, kernel: Callable
                    ) -> jax.Array:
  """TF's antialiased ScaleAndTranslate weights from `in_size` (traced) to `out_size` samples.

  For output index i: sample = (i + 0.5) * inv_scale with inv_scale = 1 / (out / in);
  kernel_scale = max(inv_scale, 1); weight(j) = k(|j + 0.5 - sample| / kernel_scale) for
  input index j < in_size and 0 on the canvas beyond it, normalised to sum to 1. Written in
  the float32 operation order of TF's ComputeSpansCore.

  Returns:
    float32 [out_size, canvas].
  """
  inv_scale = 1.0 / (jnp.float32(out_size) / in_size.astype(jnp.float32))
  one_over_kernel_scale = 1.0 / jnp.maximum(inv_scale, 1.0)
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale  # [out]
  source = jnp.arange(canvas)
  position = (source.astype(jnp.float32) + 0.5)[None, :] - sample[:, None]  # [out, canvas]
  weights = kernel(jnp.abs(position * one_over_kernel_scale))
  weights = jnp.where(source[None, :] < in_size, weights, 0.0)
  return weights * (1.0 / jnp.sum(weights, axis=1, keepdims=True))


def unpack(packed: jax.Array, height_width: jax.Array, side: int) -> jax.Array:
  """A crop packed row-major at the start of a flat canvas, as a [side, side, 3] canvas.

  Args:
    packed: uint8 [length], the crop's pixels (h * w * 3 values) first
      (`ops_image.decode_crop_canvas`).
    height_width: int32 [2], (h, w) with h, w <= side.

  Returns:
    uint8 [side, side, 3] holding the crop in rows [0, h) and columns [0, w); the values
    elsewhere are arbitrary (`resize_canvas` gives them weight 0).
  """
  rows = jnp.arange(side)[:, None, None]
  cols = jnp.arange(side)[None, :, None]
  channels = jnp.arange(3)[None, None, :]
  index = (rows * height_width[1] + cols) * 3 + channels
  return packed[jnp.clip(index, 0, packed.shape[0] - 1)]


@register("resize_canvas")
def get_resize_canvas(size: int, method: str = "bicubic", canvas: int | None = None):
  """Resizes each example's h x w crop to size x size as `ops_image.resize_uint8` does.

  TF's `tf.image.resize(..., antialias=True)`: separable weights from `_resize_weights`,
  rows first then columns, then round half to even and clip to [0, 255]. Canvas pixels
  outside the crop get weight 0. Reads `image_hw` int32 [batch, 2] and `image` uint8, either
  [batch, side, side, 3] (crop top-left) or [batch, length] (crop packed row-major first, as
  `ops_image.decode_crop_canvas` writes it; `canvas` = the longest crop side, which sets
  the [canvas, canvas, 3] canvas it is unpacked into); writes `image` float32
  [batch, size, size, 3] of whole numbers and drops `image_hw`. Within 1 of TF: the matmul's
  summation order and fused multiply-adds can round an exact x.5 (common when upsampling)
  the other way.
  """
  if method not in _RESIZE_KERNELS:
    raise ValueError(f"resize_canvas: unknown method {method!r}; known: {sorted(_RESIZE_KERNELS)}")
  kernel = _RESIZE_KERNELS[method]

  def resize_one(image, height_width):
    if image.ndim == 1:
      if canvas is None:
        raise ValueError("resize_canvas: a packed (flat) image needs canvas= (the longest "
                         "crop side, `albef_augment.canvas_side`)")
      image = unpack(image, height_width, canvas)
    side = image.shape[0]
    row_weights = _resize_weights(height_width[0], size, side, kernel)  # [size, side]
    col_weights = _resize_weights(height_width[1], size, side, kernel)
    pixels = image.astype(jnp.float32)
    rows = jnp.einsum("oh,hwc->owc", row_weights, pixels, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("pw,owc->opc", col_weights, rows, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(jnp.round(out), 0, 255)

  def fn(batch, key):
    del key
    batch = dict(batch)
    height_width = batch.pop("image_hw")
    batch["image"] = jax.vmap(resize_one)(batch["image"], height_width)
    return batch

  return fn


# ----------------------------------------------------------------------------- flip


@register("flip")
def get_flip(prob: float = 0.5):
  """Per example, a horizontal flip with probability `prob`; exact."""

  def flip_one(image, key):
    return jnp.where(jax.random.uniform(key) < prob, image[:, ::-1], image)

  def fn(batch, key):
    return {**batch, "image": _per_example(flip_one, batch["image"], key)}

  return fn


# ----------------------------------------------------------------------------- pixel ops


def _apply_tables(image: jax.Array, table: jax.Array) -> jax.Array:
  """out[..., c] = table[c, image[..., c]] for an int table [3, 256]; float32 out."""
  indices = image.astype(jnp.int32).reshape(-1, 3)
  out = jnp.take_along_axis(table.T, indices, axis=0)
  return out.reshape(image.shape).astype(jnp.float32)


def _pil_autocontrast_misses() -> np.ndarray:
  """Sorted int32 keys lo << 16 | hi << 8 | v where PIL's float64 table is one below exact.

  PIL (and `ops_image.autocontrast`) maps v to int(v * s + o) with s = 255 / (hi - lo) and
  o = -(lo * s) in float64. Where q = (v - lo) * 255 / (hi - lo) is a whole number, float64
  rounding lands just below it for 12094 of the 2.8M (lo, hi, v) triples, which float32
  cannot reproduce. Elsewhere q is at least 1 / 255 from a whole number, far beyond float64
  error, so floor(q) minus these misses is PIL's table exactly.
  """
  keys = []
  for span in range(1, 256):
    low = np.arange(256 - span)[:, None]  # [lows, 1]
    # The offsets v - lo at which q is whole.
    whole = np.arange(0, span + 1, span // math.gcd(span, 255))[None, :]
    value = low + whole
    scale = 255.0 / span
    pil = np.clip(value * scale + -(low * scale), 0, 255).astype(np.int64)
    miss = pil < whole * 255 // span
    keys.append(((low << 16) | ((low + span) << 8) | value)[miss])
  return np.sort(np.concatenate(keys)).astype(np.int32)


_AUTOCONTRAST_MISSES = _pil_autocontrast_misses()


def _autocontrast_table(low: jax.Array, high: jax.Array) -> jax.Array:
  """PIL's autocontrast table [..., 256] for int32 channel extremes `low`, `high` [..., 1]."""
  values = jnp.arange(256)
  stretched = jnp.clip((values - low) * 255 // jnp.maximum(high - low, 1), 0, 255)
  keys = (low << 16) | (high << 8) | values
  misses = jnp.asarray(_AUTOCONTRAST_MISSES)
  slot = jnp.minimum(jnp.searchsorted(misses, keys), misses.shape[0] - 1)
  stretched = stretched - (misses[slot] == keys).astype(jnp.int32)
  return jnp.where(high > low, stretched, values)


def autocontrast(image: jax.Array) -> jax.Array:
  """Per channel, maps [min, max] linearly onto [0, 255]; a constant channel is unchanged.

  out = floor((v - min) * 255 / (max - min)) in integers, lowered by one where PIL's float64
  arithmetic is (see `_pil_autocontrast_misses`). Exact.
  """
  pixels = image.astype(jnp.int32)
  low = jnp.min(pixels, axis=(0, 1))[:, None]  # [3, 1]
  high = jnp.max(pixels, axis=(0, 1))[:, None]
  return _apply_tables(image, _autocontrast_table(low, high))


def equalize(image: jax.Array) -> jax.Array:
  """Histogram equalisation per channel as `ops_image.equalize` (PIL's variant). Exact.

  With hist the 256-bin histogram and `last` the count in its highest non-empty bin:
  step = (sum(hist) - last) // 255; if step == 0 the channel is unchanged; otherwise
  table = clip(cumsum([step // 2, hist[0..254]]) // step, 0, 255).
  """
  indices = image.astype(jnp.int32).reshape(-1, 3)
  # A scatter-add: a one-hot histogram would cost pixels x 256 per channel.
  hist = jnp.zeros((3, 256), jnp.int32).at[jnp.arange(3), indices].add(1)
  last_bin = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
  last = jnp.take_along_axis(hist, last_bin[:, None], axis=1)[:, 0]
  step = (jnp.sum(hist, axis=1) - last) // 255  # [3]
  shifted = jnp.concatenate([(step // 2)[:, None], hist[:, :-1]], axis=1)
  table = jnp.clip(jnp.cumsum(shifted, axis=1) // jnp.maximum(step, 1)[:, None], 0, 255)
  table = jnp.where((step > 0)[:, None], table, jnp.arange(256)[None, :])
  return _apply_tables(image, table)


def brightness(image: jax.Array, factor: float) -> jax.Array:
  """floor(clip(v * factor, 0, 255)) in float32, as `ops_image.brightness`. Exact."""
  return jnp.floor(jnp.clip(image * jnp.float32(factor), 0, 255))


def sharpness(image: jax.Array, factor: float) -> jax.Array:
  """Blends interior pixels with a smoothed copy as `ops_image.sharpness`; border kept.

  smooth = round((3x3 box sum + 4 * centre) / 13), out = floor(clip(smooth + factor *
  (v - smooth), 0, 255)), in TF's float32 operation order. Exact unless XLA fuses the blend
  into a multiply-add (it does above optimisation level 0), then within 1 on a few pixels.
  """
  rows = image[:-2] + image[1:-1] + image[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  interior = image[1:-1, 1:-1]
  smooth = jnp.round((box + 4.0 * interior) / 13.0)
  blended = jnp.floor(jnp.clip(smooth + jnp.float32(factor) * (interior - smooth), 0, 255))
  return image.at[1:-1, 1:-1].set(blended)


def affine(image: jax.Array, matrix: jax.Array, fill: float = 128) -> jax.Array:
  """TF's ImageProjectiveTransformV3 (BILINEAR, CONSTANT) as `ops_image.affine` calls it.

  dst(p) = bilinear sample of src at M^-1 p, in the float32 operation order of TF's
  ProjectiveGenerator: for (x, y) = M^-1 p, x0 = floor(x), x1 = x0 + 1 (likewise y),
  top = (x1 - x) * src(x0, y0) + (x - x0) * src(x1, y0), bottom likewise at y1,
  out = (y1 - y) * top + (y - y0) * bottom; a neighbour outside the image reads `fill`;
  then round half to even and clip to [0, 255]. Bounds are checked on the float coordinates.
  As in TF, a coordinate of magnitude >= 2^24 has x0 + 1 rounded to x0 or x0 + 2, so its
  weights are 0 or 2 and the output there is 0 or (clipped) 255 rather than `fill`.

  Args:
    image: float32 [height, width, 3].
    matrix: float32 [2, 3], the forward map M from source to destination pixel coordinates
      (pixel centres at integer coordinates, x right, y down).
    fill: value of pixels outside the source image.

  Returns:
    float32 [height, width, 3] of whole numbers. Within 1 of TF on a few pixels: TF inverts
    M by LU, and XLA may fuse multiply-adds, which round differently near x.5.
  """
  height, width = image.shape[0], image.shape[1]
  matrix = jnp.asarray(matrix, jnp.float32)
  (a, b, shift_x), (c, d, shift_y) = matrix[0], matrix[1]
  determinant = a * d - b * c
  inverse = jnp.stack([jnp.stack([d, -b]), jnp.stack([-c, a])]) / determinant
  inverse_shift = -(inverse @ jnp.stack([shift_x, shift_y]))
  out_y, out_x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
  x = inverse[0, 0] * out_x + inverse[0, 1] * out_y + inverse_shift[0]  # [height, width]
  y = inverse[1, 0] * out_x + inverse[1, 1] * out_y + inverse_shift[1]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  x1, y1 = x0 + 1.0, y0 + 1.0

  def read(row, col):
    # Checked before the integer cast, which a far-away coordinate would overflow.
    inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
    row = jnp.clip(row, 0, height - 1).astype(jnp.int32)
    col = jnp.clip(col, 0, width - 1).astype(jnp.int32)
    return jnp.where(inside[..., None], image[row, col], jnp.float32(fill))

  wx0, wx1 = (x1 - x)[..., None], (x - x0)[..., None]
  wy0, wy1 = (y1 - y)[..., None], (y - y0)[..., None]
  top = wx0 * read(y0, x0) + wx1 * read(y0, x1)
  bottom = wx0 * read(y1, x0) + wx1 * read(y1, x1)
  return jnp.clip(jnp.round(wy0 * top + wy1 * bottom), 0, 255)


def rotation_matrix(height: int, width: int, degrees: jax.Array) -> jax.Array:
  """cv2.getRotationMatrix2D((W / 2, H / 2), degrees, 1) in float32 [2, 3]; CCW for > 0."""
  angle = jnp.asarray(degrees, jnp.float32) * jnp.float32(math.pi / 180.0)
  a, b = jnp.cos(angle), jnp.sin(angle)
  cx, cy = jnp.float32(width / 2), jnp.float32(height / 2)
  return jnp.stack([jnp.stack([a, b, (1 - a) * cx - b * cy]),
                    jnp.stack([-b, a, b * cx + (1 - a) * cy])])


# ----------------------------------------------------------------------------- RandAugment


def _geometric_matrices(magnitude: float) -> dict[str, Callable]:
  """The geometric RandAugment ops as `matrix(sign, height, width)` -> float32 [2, 3], the
  forward map `affine` warps with (levels as `ops_image._randaug_op`'s)."""
  _, shear, shift, degrees = randaug_levels(magnitude)
  zero = jnp.float32(0)

  def shear_matrix(sx, sy):
    return jnp.stack([jnp.stack([1.0, sx, 0.0]), jnp.stack([sy, 1.0, 0.0])])

  def translate_matrix(dx, dy):
    return jnp.stack([jnp.stack([1.0, 0.0, dx]), jnp.stack([0.0, 1.0, dy])])

  return {
      "ShearX": lambda sign, height, width: shear_matrix(sign * shear, zero),
      "ShearY": lambda sign, height, width: shear_matrix(zero, sign * shear),
      "TranslateX": lambda sign, height, width: translate_matrix(-sign * shift, zero),
      "TranslateY": lambda sign, height, width: translate_matrix(zero, -sign * shift),
      "Rotate": lambda sign, height, width: rotation_matrix(height, width, sign * degrees),
  }


def _pixel_ops(magnitude: float) -> dict[str, Callable]:
  """The RandAugment ops that keep pixels in place, as `fn(image) -> image`."""
  enhance = randaug_levels(magnitude)[0]
  return {
      "Identity": lambda image: image,
      "AutoContrast": autocontrast,
      "Equalize": equalize,
      "Brightness": lambda image: brightness(image, enhance),
      "Sharpness": lambda image: sharpness(image, enhance),
  }


def _randaug_op(name: str, magnitude: float, fill: float) -> Callable:
  """One RandAugment op as `fn(image, sign) -> image` with `ops_image._randaug_op`'s levels.

  `image` is float32 [height, width, 3] of whole numbers; `sign` a float32 scalar +-1 that
  only the geometric ops read. The levels come from `albef_augment.randaug_levels` in float64,
  as the host's do, so both round to the same float32 arguments.
  """
  geometric, pixel = _geometric_matrices(magnitude), _pixel_ops(magnitude)
  if name in geometric:
    return lambda image, sign: affine(image, geometric[name](sign, image.shape[0], image.shape[1]), fill)
  if name in pixel:
    return lambda image, sign: pixel[name](image)
  raise ValueError(f"randaug: unknown op {name!r}; known: {sorted({**geometric, **pixel})}")


@register("randaug")
def get_randaug(num_ops: int = 2, magnitude: float = 7, ops=ALBEF_OPS, prob: float = 0.5,
                fill: int = 128):
  """ALBEF's RandomAugment(N, M) per example, as `ops_image.rand_augment`.

  `num_ops` rounds; each draws an op uniformly from `ops` (with replacement), applies it with
  probability `prob` (u < prob, so prob=0 never applies) and, for the geometric ops, a random
  sign +-1. Under vmap `lax.switch` evaluates every branch and selects one; the geometric ops
  (shears, translations, rotation) therefore share one branch: the drawn op's matrix is
  selected first and the image warped once, not once per geometric op. Reads `image` uint8
  or float32 [batch, height, width, 3]; writes float32 of whole numbers.
  """
  for name in ops:
    _randaug_op(name, magnitude, fill)  # unknown names fail here, naming the op
  geometric, pixel = _geometric_matrices(magnitude), _pixel_ops(magnitude)
  geometric_names = list(dict.fromkeys(name for name in ops if name in geometric))
  pixel_names = list(dict.fromkeys(name for name in ops if name in pixel))
  # ops[choice] -> (its branch, its matrix if geometric); the warp is branch len(pixel_names).
  branch_of = jnp.asarray([pixel_names.index(n) if n in pixel else len(pixel_names) for n in ops])
  matrix_of = jnp.asarray([geometric_names.index(n) if n in geometric else 0 for n in ops])
  branches = [lambda image, warped, fn=pixel[name]: fn(image) for name in pixel_names]
  branches.append(lambda image, warped: warped)

  def augment_one(image, key):
    height, width = image.shape[0], image.shape[1]
    matrices = [lambda s, fn=geometric[name]: fn(s, height, width) for name in geometric_names]
    for k in range(num_ops):
      choice_key, apply_key, sign_key = jax.random.split(jax.random.fold_in(key, k), 3)
      choice = jax.random.randint(choice_key, (), 0, len(ops))
      apply = jax.random.uniform(apply_key) < prob
      sign = jnp.where(jax.random.uniform(sign_key) < 0.5, -1.0, 1.0).astype(jnp.float32)
      warped = image
      if geometric_names:
        matrix = jax.lax.switch(matrix_of[choice], matrices, sign)
        warped = affine(image, matrix, fill)
      augmented = jax.lax.switch(branch_of[choice], branches, image, warped)
      image = jnp.where(apply, augmented, image)
    return image

  def fn(batch, key):
    images = batch["image"].astype(jnp.float32)
    return {**batch, "image": _per_example(augment_one, images, key)}

  return fn


# ----------------------------------------------------------------------------- value ranges


@register("normalize")
def get_normalize(kind: str = "clip"):
  """float32 (v / 255 - mean) / std per channel; kind `clip` or `imagenet`.

  Computed as v * (1 / (255 std)) + (-mean / std), the host op's multiply-add.
  """
  if kind not in NORMALIZATIONS:
    raise ValueError(f"normalize: unknown kind {kind!r}; known: {sorted(NORMALIZATIONS)}")
  mean, std = NORMALIZATIONS[kind]
  scale = np.array([1.0 / (255.0 * s) for s in std], np.float32)
  offset = np.array([-m / s for m, s in zip(mean, std)], np.float32)

  def fn(batch, key):
    del key
    return {**batch, "image": batch["image"].astype(jnp.float32) * scale + offset}

  return fn
