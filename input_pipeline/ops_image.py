"""Image preprocessing ops: guarded decoding, random resized crop, flip, RandAugment, normalise.

Every op is a registered factory returning `fn(example) -> example` written in TensorFlow
ops, so it runs eagerly and inside `tf.data.Dataset.map`. Images travel between ops as uint8
[height, width, 3] and leave as float32 after `normalize` or `value_range`.

Randomness is stateless: an op reads the per-example seed `example['_seed']` (int [2]) and
folds in its own fixed salt, so an example's augmentation depends only on (run seed,
example position) and never on thread scheduling.

Decoding never raises on bad bytes that can be recognised from the outside: unknown formats,
truncated files (a missing end marker), images below `min_size` pixels a side or above
`max_pixels` pixels in all set `example['_valid'] = False` and yield a dummy black image,
which the batch builder filters out and counts. Rarer corruption inside an intact-looking
file that still makes the decoder fail raises in graph mode; the builder drops and counts
those elements too (`Dataset.ignore_errors`), and in eager mode the op catches it itself.
"""
import math

import tensorflow as tf

from input_pipeline import registry
from input_pipeline.albef_augment import (ALBEF_OPS, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN,  # noqa: F401
                                          IMAGENET_STD, NORMALIZATIONS, canvas_pixels, canvas_side,
                                          randaug_levels)

# PIL's decompression-bomb limit: larger images are flagged invalid before they are decoded.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MIN_SIZE = 8

# Per-op salts folded into the example seed; fixed forever so that augmentations reproduce.
_SALT_CROP = 11
_SALT_FLIP = 12
_SALT_RANDAUG = 13

# Format codes found by `_sniff_format`.
_UNKNOWN, _JPEG, _PNG, _GIF, _BMP, _WEBP = range(6)
_HEADER_BYTES = 32
_JPEG_DCT = "INTEGER_ACCURATE"
# The downscales libjpeg's IDCT can do while decoding (`tf.io.decode_jpeg(ratio=)`).
DCT_RATIOS = (1, 2, 4, 8)
_TAIL_BYTES = 64


def example_seed(example: dict, salt: int, op_name: str) -> tf.Tensor:
  """The stateless seed of one op for one example: fold `salt` into `example['_seed']`."""
  if "_seed" not in example:
    raise KeyError(f"preprocessing op {op_name!r} needs example['_seed'] (int [2]); the batch "
                   "builder adds it, or set it yourself when calling the op directly")
  return tf.random.experimental.stateless_fold_in(example["_seed"], salt)


def _and_valid(example: dict, ok) -> dict:
  example["_valid"] = tf.logical_and(example.get("_valid", True), ok)
  return example


# ----------------------------------------------------------------------------- format checks


def _bytes_at(data: tf.Tensor, start, length: int) -> tf.Tensor:
  """`length` bytes of `data` from `start` as int32, zero-padded past the end."""
  padded = tf.strings.join([data, tf.constant(b"\0" * length)])
  return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, start, length), tf.uint8), tf.int32)


def _tail(data: tf.Tensor) -> tf.Tensor:
  """The last (up to) 64 bytes of `data` as int32 [<= 64]."""
  start = tf.maximum(tf.strings.length(data) - _TAIL_BYTES, 0)
  return tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, _TAIL_BYTES), tf.uint8),
                 tf.int32)


def _contains(haystack: tf.Tensor, needle: bytes) -> tf.Tensor:
  """Whether the byte string `needle` occurs in the int32 byte vector `haystack`."""
  starts = tf.maximum(tf.shape(haystack)[0] - len(needle) + 1, 0)
  hit = tf.ones([starts], tf.bool)
  for offset, byte in enumerate(needle):
    hit = tf.logical_and(hit, tf.equal(haystack[offset:offset + starts], byte))
  return tf.reduce_any(hit)


def _uint_le(head: tf.Tensor, start: int, width: int) -> tf.Tensor:
  return sum(tf.cast(head[start + i], tf.int64) * 256**i for i in range(width))


def _uint_be(head: tf.Tensor, start: int, width: int) -> tf.Tensor:
  return sum(tf.cast(head[start + i], tf.int64) * 256**(width - 1 - i) for i in range(width))


def _starts_with(head: tf.Tensor, prefix: bytes, at: int = 0) -> tf.Tensor:
  return tf.reduce_all(tf.equal(head[at:at + len(prefix)], list(prefix)))


def _sniff_format(head: tf.Tensor) -> tf.Tensor:
  """Format code (`_JPEG`, `_PNG`, ...) from the first 32 bytes, `_UNKNOWN` otherwise."""
  checks = [
      (_JPEG, _starts_with(head, b"\xff\xd8\xff")),
      (_PNG, _starts_with(head, b"\x89PNG\r\n\x1a\n")),
      (_GIF, tf.logical_or(_starts_with(head, b"GIF87a"), _starts_with(head, b"GIF89a"))),
      (_BMP, _starts_with(head, b"BM")),
      (_WEBP, tf.logical_and(_starts_with(head, b"RIFF"), _starts_with(head, b"WEBP", at=8))),
  ]
  code = tf.constant(_UNKNOWN)
  for value, hit in reversed(checks):
    code = tf.where(hit, value, code)
  return code


def _looks_complete(data: tf.Tensor, head: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
  """Whether the file ends the way its format requires, i.e. was not cut short.

  JPEG: an EOI marker (FF D9) in the last 64 bytes; entropy-coded data never contains FF D9,
  so a truncated file fails this. PNG: an IEND chunk in the last 64 bytes. GIF: the trailer
  byte 0x3B last. BMP and WebP: the size recorded in the header fits in the data.
  """
  size = tf.cast(tf.strings.length(data), tf.int64)
  tail = _tail(data)
  return tf.switch_case(fmt, [
      lambda: tf.constant(False),
      lambda: _contains(tail, b"\xff\xd9"),
      lambda: _contains(tail, b"IEND"),
      lambda: tf.equal(tail[-1], 0x3B),  # a GIF is at least 6 bytes long
      lambda: tf.logical_and(_uint_le(head, 2, 4) <= size, _uint_le(head, 10, 4) < size),
      lambda: _uint_le(head, 4, 4) + 8 <= size,
  ])


def _header_pixels(data: tf.Tensor, head: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
  """Pixel count announced by the header (0 where the format is not parsed here)."""

  def jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
    return shape[0] * shape[1]

  return tf.switch_case(fmt, [
      lambda: tf.constant(0, tf.int64),
      jpeg,
      lambda: _uint_be(head, 16, 4) * _uint_be(head, 20, 4),
      lambda: _uint_le(head, 6, 2) * _uint_le(head, 8, 2),
      lambda: tf.constant(0, tf.int64),
      lambda: tf.constant(0, tf.int64),
  ])


def _precheck(data: tf.Tensor, max_pixels: int):
  """(decodable-looking: bool, is_jpeg: bool) from the header and the tail alone."""
  head = _bytes_at(data, 0, _HEADER_BYTES)
  fmt = _sniff_format(head)
  complete = tf.logical_and(tf.not_equal(fmt, _UNKNOWN), _looks_complete(data, head, fmt))
  pixels = tf.cond(complete, lambda: _header_pixels(data, head, fmt),
                   lambda: tf.constant(0, tf.int64))
  return tf.logical_and(complete, pixels <= max_pixels), tf.equal(fmt, _JPEG)


def _size_ok(height, width, min_size: int, max_pixels: int) -> tf.Tensor:
  height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
  return tf.logical_and(tf.minimum(height, width) >= min_size, height * width <= max_pixels)


def _decode_any(data: tf.Tensor, channels: int) -> tf.Tensor:
  image = tf.io.decode_image(data, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _never_raise_eagerly(decode_fn, dummy_fn):
  """Runs `decode_fn() -> (image, ok)`; in eager mode a decoder error gives (dummy, False).

  In graph mode (inside `Dataset.map`) an error propagates to the dataset instead, where the
  builder's `ignore_errors` drops the element and counts it as skipped.
  """
  if not tf.executing_eagerly():
    return decode_fn()
  try:
    return decode_fn()
  except tf.errors.InvalidArgumentError:
    return dummy_fn(), tf.constant(False)


def dct_scale(crop_height, crop_width, min_side: int) -> tf.Tensor:
  """The largest libjpeg DCT scale r in `DCT_RATIOS` with min(crop // r) >= `min_side`.

  Returns int32 index into `DCT_RATIOS` (0 = full size).
  """
  shortest = tf.minimum(crop_height, crop_width)
  fits = tf.stack([shortest // r >= min_side for r in DCT_RATIOS[1:]])
  return tf.reduce_sum(tf.cast(fits, tf.int32))


def _decode_and_crop_scaled(data, window, channels: int, min_side: int, dct_method: str):
  """`decode_and_crop_jpeg` of `window` at the largest DCT scale keeping `min_side` pixels.

  libjpeg scales by 1/r inside the IDCT (a box-like prefilter at a fraction of the full
  decode's cost); the window is then taken in the scaled image: (top // r, left // r,
  height // r, width // r), which stays inside it since libjpeg's scaled size is ceil(H / r).
  """
  top, left, height, width = tf.unstack(window)

  def at(r):
    scaled = tf.stack([top // r, left // r, tf.maximum(height // r, 1), tf.maximum(width // r, 1)])
    return lambda: tf.image.decode_and_crop_jpeg(data, scaled, channels=channels, ratio=r,
                                                 dct_method=dct_method)

  return tf.switch_case(dct_scale(height, width, min_side), [at(r) for r in DCT_RATIOS])


def _decode_checked(data, channels, min_size, max_pixels, crop_window_fn=None,
                    dct_method: str = _JPEG_DCT, dct_min_side: int | None = None):
  """Decodes (optionally cropping) after the format, completeness and size checks.

  Args:
    data: tf.string scalar.
    crop_window_fn: None, or `fn(height, width) -> int32 [4]` (top, left, height, width);
      JPEG crops are decoded fused with `decode_and_crop_jpeg`.
    dct_method: libjpeg's IDCT for JPEGs (see `decode_random_resized_crop`).
    dct_min_side: with a crop window, JPEG crops are decoded downscaled by the largest DCT
      scale that keeps their shorter side >= this (`_decode_and_crop_scaled`); None = 1:1.

  Returns:
    (image uint8 [h, w, channels], ok bool); a black [min_size, min_size] dummy if not ok.
  """
  dummy = lambda: tf.zeros([min_size, min_size, channels], tf.uint8)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(data)
    ok = _size_ok(shape[0], shape[1], min_size, max_pixels)
    # The accurate integer IDCT gives PIL's (libjpeg's default) pixels exactly.
    if crop_window_fn is None:
      decode = lambda: tf.io.decode_jpeg(data, channels=channels, dct_method=dct_method)
    elif dct_min_side is None:
      decode = lambda: tf.image.decode_and_crop_jpeg(
          data, crop_window_fn(shape[0], shape[1]), channels=channels, dct_method=dct_method)
    else:
      decode = lambda: _decode_and_crop_scaled(data, crop_window_fn(shape[0], shape[1]),
                                               channels, dct_min_side, dct_method)
    return _set_rgb_shape(tf.cond(ok, decode, dummy), channels), ok

  def other():
    image = _decode_any(data, channels)
    shape = tf.shape(image)
    ok = _size_ok(shape[0], shape[1], min_size, max_pixels)
    if crop_window_fn is None:
      crop = lambda: image
    else:
      def crop():
        top, left, h, w = tf.unstack(crop_window_fn(shape[0], shape[1]))
        return image[top:top + h, left:left + w]
    return _set_rgb_shape(tf.cond(ok, crop, dummy), channels), ok

  def rejected():
    return dummy(), tf.constant(False)

  def run():
    looks_ok, is_jpeg = _precheck(data, max_pixels)
    return tf.cond(looks_ok, lambda: tf.cond(is_jpeg, jpeg, other), rejected)

  return _never_raise_eagerly(run, dummy)


def _set_rgb_shape(image: tf.Tensor, channels: int) -> tf.Tensor:
  image.set_shape([None, None, channels])
  return image


def decode_image_bytes(data: tf.Tensor, channels: int = 3, min_size: int = DEFAULT_MIN_SIZE,
                       max_pixels: int = DEFAULT_MAX_PIXELS):
  """Decodes JPEG/PNG/GIF (first frame)/BMP/WebP bytes without raising on recognisable junk.

  Args:
    data: tf.string scalar, the encoded file.
    channels: 3 gives RGB (grayscale is repeated, alpha dropped, CMYK JPEG converted).
    min_size: smallest accepted height and width in pixels.
    max_pixels: largest accepted height * width (checked from the header before decoding
      for JPEG, PNG and GIF).

  Returns:
    (image uint8 [height, width, channels], ok bool). When not ok the image is a black
    [min_size, min_size, channels] dummy.
  """
  return _decode_checked(data, channels, min_size, max_pixels)


# ----------------------------------------------------------------------------- crops


def random_resized_crop_window(height, width, seed, scale=(0.2, 1.0),
                               ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision's `RandomResizedCrop.get_params`, stateless.

  Up to 10 candidates: area fraction ~ U(scale), log aspect (w / h) ~ U(log ratio),
  w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first candidate that
  fits is placed uniformly. If none fits: the largest centred crop whose aspect is clamped
  to `ratio`.

  Args:
    height, width: int32 scalars, the source image size.
    seed: int [2] stateless seed.

  Returns:
    int32 [4]: (top, left, crop_height, crop_width).
  """
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  area = h_f * w_f * tf.random.stateless_uniform(
      [attempts], seeds[0], scale[0], scale[1], tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]), tf.float64))
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  def sampled():
    h, w = crop_h[first], crop_w[first]
    top = tf.random.stateless_uniform([], seeds[2], 0, height - h + 1, tf.int32)
    left = tf.random.stateless_uniform([], seeds[3], 0, width - w + 1, tf.int32)
    return tf.stack([top, left, h, w])

  def central():
    in_ratio = w_f / h_f
    h = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
    w = tf.where(in_ratio > ratio[1], tf.round(h_f * ratio[1]), w_f)
    h, w = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
    return tf.stack([(height - h) // 2, (width - w) // 2, h, w])

  return tf.cond(tf.reduce_any(fits), sampled, central)


def resize_uint8(image: tf.Tensor, size, method: str = "bicubic") -> tf.Tensor:
  """Resizes to `size` (int, (height, width), or an int32 [2] tensor) with antialiasing like
  PIL; uint8 out."""
  size = (size, size) if isinstance(size, int) else size
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method=method, antialias=True)
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  if isinstance(size, (tuple, list)):
    resized.set_shape([*size, image.shape[-1]])
  return resized


@registry.register("decode")
def get_decode(channels: int = 3, min_size: int = DEFAULT_MIN_SIZE,
               max_pixels: int = DEFAULT_MAX_PIXELS, key: str = "image"):
  """Decodes `example[key]` bytes to uint8 [height, width, channels]; flags bad images.

  Sets `_valid` False (with a black dummy image) for unknown formats, truncated files and
  images smaller than `min_size` or larger than `max_pixels`.
  """

  def fn(example):
    image, ok = decode_image_bytes(example[key], channels, min_size, max_pixels)
    example[key] = image
    return _and_valid(example, ok)

  return fn


@registry.register("decode_random_resized_crop")
def get_decode_random_resized_crop(size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                                   method: str = "bicubic", min_size: int = DEFAULT_MIN_SIZE,
                                   max_pixels: int = DEFAULT_MAX_PIXELS, key: str = "image",
                                   dct_method: str = _JPEG_DCT):
  """`decode` then `random_resized_crop`, fused for JPEG (only the crop window is decoded).

  Writes uint8 [size, size, 3] to `example[key]`; bad images as in `decode`. The crop
  window equals `random_resized_crop`'s for the same example seed.

  The defaults reproduce PIL + torchvision (accurate IDCT, antialiased bicubic). Cheaper
  choices for throughput: `method='bilinear'` (antialiased triangle kernel, about half the
  resize cost; softer than bicubic at the 1-2.2x downscales of 256 px crops of ~640x480
  photos) and `dct_method='INTEGER_FAST'` (libjpeg's fast IDCT; pixels differ by a few
  levels from PIL's).
  """

  def fn(example):
    seed = example_seed(example, _SALT_CROP, "decode_random_resized_crop")
    window = lambda height, width: random_resized_crop_window(height, width, seed, scale, ratio)
    image, ok = _decode_checked(example[key], 3, min_size, max_pixels, window, dct_method)
    example[key] = resize_uint8(image, size, method)
    return _and_valid(example, ok)

  return fn


def _fit_within(image: tf.Tensor, side: int, pixels: int) -> tf.Tensor:
  """`image` shrunk (antialiased bicubic, aspect kept) to sides <= `side`, area <= `pixels`.

  Only crops that the DCT scales cannot bring that small take this path: crops of non-JPEG
  images larger than it, or JPEG crops whose shorter side exceeds 16 * size.
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  factor = tf.minimum(side / tf.maximum(h_f, w_f), tf.sqrt(pixels / (h_f * w_f)))

  def shrink():
    new = [tf.maximum(tf.cast(tf.floor(n * factor), tf.int32), 1) for n in (h_f, w_f)]
    return resize_uint8(image, tf.stack(new))

  return _set_rgb_shape(tf.cond(factor < 1, shrink, lambda: image), image.shape[-1])


@registry.register("decode_crop_canvas")
def get_decode_crop_canvas(size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                           min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                           key: str = "image", dct_method: str = _JPEG_DCT):
  """The host half of `decode_random_resized_crop` when the accelerator does the rest.

  Decodes only the random crop window (the same window `decode_random_resized_crop` draws
  for the same example seed), at the largest JPEG DCT scale that keeps the crop's shorter
  side >= `size`, and packs its pixels row-major at the start of a flat zero canvas:
  `example[key]` uint8 [3 * canvas_pixels(size, ratio)] and `example[key + '_hw']` int32 [2]
  = the crop's (height, width). `input_pipeline.device_ops`' `resize_canvas(size, canvas=
  canvas_side(size, ratio))` unpacks and resizes each crop to size x size on the
  accelerator (flip, RandAugment and normalisation follow there). Bad images as in `decode`.

  Flat rather than a square [side, side, 3] canvas: 26% fewer bytes (1.05 MB at size 256)
  to pad, batch and transfer, which is what this op's host time goes on after the decode.
  Compared with the all-host path, crops >= 2 * size on their shorter side (large photos) are
  prefiltered by libjpeg's scaled IDCT, and the bicubic resize runs on the accelerator.
  """
  side, pixels = canvas_side(size, ratio), canvas_pixels(size, ratio)

  def fn(example):
    seed = example_seed(example, _SALT_CROP, "decode_crop_canvas")
    window = lambda height, width: random_resized_crop_window(height, width, seed, scale, ratio)
    image, ok = _decode_checked(example[key], 3, min_size, max_pixels, window, dct_method,
                                dct_min_side=size)
    image = _fit_within(image, side, pixels)
    flat = tf.reshape(image, [-1])
    packed = tf.pad(flat, [[0, 3 * pixels - tf.size(flat)]])
    packed.set_shape([3 * pixels])
    example[key] = packed
    example[key + "_hw"] = tf.shape(image)[:2]
    return _and_valid(example, ok)

  return fn


@registry.register("random_resized_crop")
def get_random_resized_crop(size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                            method: str = "bicubic", key: str = "image"):
  """torchvision-style RandomResizedCrop of a decoded uint8 image to [size, size, 3]."""

  def fn(example):
    image = example[key]
    seed = example_seed(example, _SALT_CROP, "random_resized_crop")
    shape = tf.shape(image)
    top, left, h, w = tf.unstack(random_resized_crop_window(shape[0], shape[1], seed, scale,
                                                            ratio))
    example[key] = resize_uint8(image[top:top + h, left:left + w], size, method)
    return example

  return fn


@registry.register("resize")
def get_resize(size, method: str = "bicubic", key: str = "image"):
  """Resizes to [size, size] (or (height, width)) ignoring the aspect, as ALBEF's eval does."""

  def fn(example):
    example[key] = resize_uint8(example[key], size, method)
    return example

  return fn


@registry.register("flip")
def get_flip(prob: float = 0.5, key: str = "image"):
  """Horizontal flip with probability `prob`."""

  def fn(example):
    seed = example_seed(example, _SALT_FLIP, "flip")
    flip = tf.random.stateless_uniform([], seed) < prob
    image = example[key]
    example[key] = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return example

  return fn


# ----------------------------------------------------------------------------- RandAugment


def _per_channel(values: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
  """`values` [3] repeated to the image's shape [height, width, 3].

  Elementwise ops against this run at memory speed; broadcasting a [3] vector against the
  innermost axis is several times slower on CPU (Eigen's small-inner-dimension path).
  """
  return tf.reshape(tf.tile(values, [tf.size(image) // 3]), tf.shape(image))


def _channel_indices(image: tf.Tensor) -> tf.Tensor:
  """int32 [pixels * 3]: value + 256 * channel, the index into per-channel tables [3 * 256]."""
  return tf.reshape(tf.cast(image, tf.int32) + _per_channel(tf.constant([0, 256, 512]), image),
                    [-1])


def _apply_tables(image: tf.Tensor, indices: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """out[..., c] = table[c, image[..., c]] for a uint8 lookup table [3, 256]."""
  return tf.reshape(tf.gather(tf.reshape(table, [-1]), indices), tf.shape(image))


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, maps [min, max] linearly onto [0, 255] (ALBEF/PIL, cutoff 0).

  out = uint8(clip(v * scale + offset, 0, 255)) with scale = 255 / (max - min) and
  offset = -min * scale, in float64 like PIL's table (so values match it exactly); a
  constant channel is left unchanged (scale 1, offset 0). Computed per pixel rather than
  through a 256-entry table: a gather per pixel costs more than the arithmetic.
  """
  flat = tf.reshape(image, [-1, 3])
  low = tf.cast(tf.reduce_min(flat, axis=0), tf.float64)
  high = tf.cast(tf.reduce_max(flat, axis=0), tf.float64)
  stretch = high > low
  scale = tf.where(stretch, 255.0 / tf.maximum(high - low, 1.0), 1.0)
  offset = tf.where(stretch, -(low * scale), 0.0)
  out = tf.cast(image, tf.float64) * _per_channel(scale, image) + _per_channel(offset, image)
  return tf.cast(tf.clip_by_value(out, 0, 255), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation per channel, PIL's variant as ALBEF writes it.

  With hist the 256-bin histogram and `last` the count in its highest non-empty bin:
  step = (sum(hist) - last) // 255; if step == 0 the channel is unchanged; otherwise
  table = clip((cumsum([step // 2, hist[0..254]]) // step), 0, 255).
  """
  indices = _channel_indices(image)
  hist = tf.reshape(tf.cast(tf.math.bincount(indices, minlength=768, maxlength=768), tf.int64),
                    [3, 256])
  last_bin = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), axis=[1]), axis=1,
                             output_type=tf.int32)
  last = tf.gather(hist, last_bin, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last) // 255  # [3]
  shifted = tf.concat([(step // 2)[:, None], hist[:, :-1]], axis=1)
  table = tf.clip_by_value(tf.cumsum(shifted, axis=1) // tf.maximum(step, 1)[:, None], 0, 255)
  table = tf.where((step > 0)[:, None], table, tf.range(256, dtype=tf.int64)[None, :])
  return _apply_tables(image, indices, tf.cast(table, tf.uint8))


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """uint8(clip(v * factor, 0, 255)) in float32 (ALBEF's table)."""
  scaled = tf.clip_by_value(tf.cast(image, tf.float32) * factor, 0, 255)
  return tf.cast(scaled, tf.uint8)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blends with a smoothed copy on interior pixels; the 1-pixel border is kept.

  smooth = round(conv3x3(image, [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13)) (valid positions),
  out = uint8(clip(smooth + factor * (image - smooth), 0, 255)). ALBEF casts without the
  clip, which wraps around for factor > 1; clipping is what PIL's ImageEnhance does.
  """
  pixels = tf.cast(image, tf.float32)
  # The kernel is a 3x3 box plus 4x the centre; the box sum is separable.
  rows = pixels[:-2] + pixels[1:-1] + pixels[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  interior = pixels[1:-1, 1:-1]
  smooth = tf.round((box + 4.0 * interior) / 13.0)
  blended = tf.cast(tf.clip_by_value(smooth + factor * (interior - smooth), 0, 255), tf.uint8)
  border = [[1, 1], [1, 1], [0, 0]]
  is_interior = tf.pad(tf.ones_like(blended, tf.bool), border)
  return tf.where(is_interior, tf.pad(blended, border), image)


def affine(image: tf.Tensor, matrix, fill: int = 128) -> tf.Tensor:
  """cv2.warpAffine semantics: dst(p) = src(M^-1 p), bilinear, constant `fill` outside.

  Args:
    image: uint8 [height, width, 3].
    matrix: float [2, 3], the forward map M from source to destination pixel
      coordinates (pixel centres at integer coordinates, x right, y down).

  Returns:
    uint8 [height, width, 3], rounded half to even.
  """
  matrix = tf.cast(tf.convert_to_tensor(matrix), tf.float32)
  linear, shift = matrix[:, :2], matrix[:, 2:]
  inverse = tf.linalg.inv(linear)
  inverse_shift = -tf.matmul(inverse, shift)
  transform = tf.concat([tf.reshape(tf.concat([inverse, inverse_shift], axis=1), [6]),
                         tf.zeros([2])], axis=0)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform[None],
      output_shape=tf.stack([height, width]), fill_value=float(fill),
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def rotation_matrix(height, width, degrees) -> tf.Tensor:
  """cv2.getRotationMatrix2D((W / 2, H / 2), degrees, 1): counter-clockwise for degrees > 0."""
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b = tf.cos(angle), tf.sin(angle)
  cx, cy = tf.cast(width, tf.float32) / 2, tf.cast(height, tf.float32) / 2
  return tf.stack([tf.stack([a, b, (1 - a) * cx - b * cy]),
                   tf.stack([-b, a, b * cx + (1 - a) * cy])])


def translate_pixels(image: tf.Tensor, dx, dy, fill: int = 128) -> tf.Tensor:
  """`affine` with M = [[1, 0, dx], [0, 1, dy]] for integer shifts, by padding and slicing.

  dst(x, y) = src(x - dx, y - dy), `fill` where that falls outside; equal to the bilinear
  `affine` (integer shifts interpolate nothing) at a fraction of its cost.

  Args:
    image: uint8 [height, width, 3].
    dx, dy: int32 scalars (tensors allowed).
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  dx, dy = tf.cast(dx, tf.int32), tf.cast(dy, tf.int32)
  pad_x, pad_y = tf.abs(dx), tf.abs(dy)
  padded = tf.pad(image, [[pad_y, pad_y], [pad_x, pad_x], [0, 0]], constant_values=fill)
  return padded[pad_y - dy:pad_y - dy + height, pad_x - dx:pad_x - dx + width]


def shear_x(image: tf.Tensor, shear, fill: int = 128) -> tf.Tensor:
  """`affine` with M = [[1, shear, 0], [0, 1, 0]], as one linear interpolation per row.

  Row y samples src(x - shear * y, y): with t = -shear * y, k = floor(t), f = t - k,
  dst(x, y) = (1 - f) * src(x + k, y) + f * src(x + k + 1, y), `fill` outside the image,
  rounded half to even. Each row's window is one gather of whole pixels, so this costs
  about half of the general projective transform, which interpolates in 2-D per channel.

  Args:
    image: uint8 [height, width, 3].
    shear: float scalar (tensor allowed).

  Returns:
    uint8 [height, width, 3]; within 1 of `affine` (float rounding of the weights).
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  shear = tf.cast(shear, tf.float32)
  margin = tf.cast(tf.math.ceil(tf.abs(shear) * tf.cast(height, tf.float32)), tf.int32) + 2
  padded = tf.pad(image, [[0, 0], [margin, margin], [0, 0]], constant_values=fill)
  offsets = -shear * tf.range(tf.cast(height, tf.float32))  # [height]
  whole = tf.floor(offsets)
  fraction = (offsets - whole)[:, None]  # [height, 1]
  columns = margin + tf.cast(whole, tf.int32)[:, None] + tf.range(width + 1)[None, :]
  window = tf.cast(tf.gather(padded, columns, batch_dims=1), tf.float32)  # [h, w + 1, 3]
  # Rows as [height, (width + 1) * 3]: the per-row weight broadcasts along a long axis.
  window = tf.reshape(window, [height, (width + 1) * 3])
  left, right = window[:, :-3], window[:, 3:]
  out = left + fraction * (right - left)
  return tf.reshape(tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8), shape)


def shear_y(image: tf.Tensor, shear, fill: int = 128) -> tf.Tensor:
  """`affine` with M = [[1, 0, 0], [shear, 1, 0]]: `shear_x` of the transposed image."""
  transposed = tf.transpose(image, [1, 0, 2])
  return tf.transpose(shear_x(transposed, shear, fill), [1, 0, 2])


def _randaug_op(name: str, magnitude: float, fill: int):
  """One RandAugment op as `fn(image, sign) -> image`; sign is +-1 for the signed ops."""
  enhance, shear, shift, degrees = randaug_levels(magnitude)

  def size(image):
    return tf.shape(image)[0], tf.shape(image)[1]

  def translate(image, dx, dy):
    # ALBEF's shift is M pixels: whole at integer magnitudes, where slicing is exact.
    if float(shift).is_integer():
      return translate_pixels(image, tf.cast(dx, tf.int32), tf.cast(dy, tf.int32), fill)
    return affine(image, [[1.0, 0.0, dx], [0.0, 1.0, dy]], fill)

  ops = {
      "Identity": lambda image, sign: image,
      "AutoContrast": lambda image, sign: autocontrast(image),
      "Equalize": lambda image, sign: equalize(image),
      "Brightness": lambda image, sign: brightness(image, enhance),
      "Sharpness": lambda image, sign: sharpness(image, enhance),
      "ShearX": lambda image, sign: shear_x(image, sign * shear, fill),
      "ShearY": lambda image, sign: shear_y(image, sign * shear, fill),
      "TranslateX": lambda image, sign: translate(image, -sign * shift, 0.0),
      "TranslateY": lambda image, sign: translate(image, 0.0, -sign * shift),
      "Rotate": lambda image, sign: affine(image, rotation_matrix(*size(image), sign * degrees),
                                           fill),
  }
  if name not in ops:
    raise ValueError(f"randaug: unknown op {name!r}; known: {sorted(ops)}")
  return ops[name]


def rand_augment(image: tf.Tensor, seed, num_ops: int = 2, magnitude: float = 7,
                 ops=ALBEF_OPS, prob: float = 0.5, fill: int = 128) -> tf.Tensor:
  """ALBEF's RandomAugment(N, M): N ops drawn with replacement, each applied with `prob`.

  Levels (M = magnitude, out of 10): Brightness/Sharpness factor M/10 * 1.8 + 0.1; shear
  M/10 * 0.3; translate M/10 * 10 px; rotate M/10 * 30 degrees; the geometric ones get a
  random sign and fill uncovered pixels with `fill`.

  Args:
    image: uint8 [height, width, 3].
    seed: int [2] stateless seed.

  Returns:
    uint8 [height, width, 3].
  """
  branches = [_randaug_op(name, magnitude, fill) for name in ops]
  for k in range(num_ops):
    choice_seed, apply_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, k), 3))
    choice = tf.random.stateless_uniform([], choice_seed, 0, len(branches), tf.int32)
    apply = tf.random.stateless_uniform([], apply_seed) <= prob
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    current = image
    image = tf.cond(
        apply,
        lambda: tf.switch_case(choice, [lambda op=op: op(current, sign) for op in branches]),
        lambda: current)
    image.set_shape(current.shape)
  return image


@registry.register("randaug")
def get_randaug(num_ops: int = 2, magnitude: float = 7, ops=ALBEF_OPS, prob: float = 0.5,
                fill: int = 128, key: str = "image"):
  """ALBEF's RandomAugment on a uint8 image (see `rand_augment`)."""
  ops = tuple(ops)
  _ = [_randaug_op(name, magnitude, fill) for name in ops]  # unknown names fail at build time

  def fn(example):
    seed = example_seed(example, _SALT_RANDAUG, "randaug")
    example[key] = rand_augment(example[key], seed, num_ops, magnitude, ops, prob, fill)
    return example

  return fn


# ----------------------------------------------------------------------------- value ranges


@registry.register("normalize")
def get_normalize(kind: str = "clip", key: str = "image"):
  """float32 (v / 255 - mean) / std per channel; kind `clip` or `imagenet`."""
  if kind not in NORMALIZATIONS:
    raise ValueError(f"normalize: unknown kind {kind!r}; known: {sorted(NORMALIZATIONS)}")
  mean, std = NORMALIZATIONS[kind]

  # (v / 255 - mean) / std as one multiply-add.
  scale = tf.constant([1.0 / (255.0 * s) for s in std])
  offset = tf.constant([-m / s for m, s in zip(mean, std)])

  def fn(example):
    image = example[key]
    example[key] = (tf.cast(image, tf.float32) * _per_channel(scale, image) +
                    _per_channel(offset, image))
    return example

  return fn


@registry.register("value_range")
def get_value_range(vmin: float = 0.0, vmax: float = 1.0, key: str = "image"):
  """float32 v / 255 * (vmax - vmin) + vmin."""

  def fn(example):
    pixels = tf.cast(example[key], tf.float32) / 255.0
    example[key] = pixels * (vmax - vmin) + vmin
    return example

  return fn
