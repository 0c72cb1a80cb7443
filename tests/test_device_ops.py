"""Device augmentation ops against the TensorFlow host ops they reproduce, on CPU."""
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import device_ops
from input_pipeline import ops_image


def _scene(height: int, width: int, seed: int = 0, low: int = 0, high: int = 255
           ) -> np.ndarray:
  """A smooth gradient in [low, high] with noise, like a photo; every channel differs."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
  base = low + base * (high - low) / 255
  return np.clip(base + rng.normal(0, 8, base.shape), low, high).astype(np.uint8)


IMAGES = {
    "noise": np.random.default_rng(1).integers(0, 256, (37, 41, 3)).astype(np.uint8),
    "scene": _scene(64, 64),
    # Channel ranges narrower than [0, 255]: AutoContrast's float64 rounding shows here.
    "low_contrast": _scene(48, 40, seed=2, low=30, high=180),
}

# Integer arithmetic, one float32 multiply, or whole-pixel shifts: bit-exact by construction.
# The others interpolate or blend in float32, where fused multiply-adds and TF's fast paths
# round differently on a few pixels.
_EXACT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "TranslateX", "TranslateY")


def _assert_close_levels(got: np.ndarray, want: np.ndarray, exact: bool = False):
  """At most 1 level apart on under 1% of the values (or equal); `got` holds whole numbers."""
  np.testing.assert_array_equal(got, np.round(got))
  diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
  if exact:
    assert diff.max() == 0, f"{np.sum(diff > 0)} values differ, by up to {diff.max()}"
  else:
    assert diff.max() <= 1, diff.max()
    assert np.mean(diff > 0) < 0.01, np.mean(diff > 0)


def test_constants_equal_the_host_ops():
  assert device_ops.CLIP_MEAN == ops_image.CLIP_MEAN
  assert device_ops.CLIP_STD == ops_image.CLIP_STD
  assert device_ops.IMAGENET_MEAN == ops_image.IMAGENET_MEAN
  assert device_ops.IMAGENET_STD == ops_image.IMAGENET_STD
  assert device_ops.ALBEF_OPS == ops_image.ALBEF_OPS
  # One level map serves both sides (input_pipeline/albef_augment.py).
  assert device_ops.randaug_levels is ops_image.randaug_levels
  assert device_ops.randaug_levels(7) == ops_image.randaug_levels(7) == (
      7 / 10 * 1.8 + 0.1, 7 / 10 * 0.3, 7 / 10 * 10.0, 7 / 10 * 30.0)


def test_module_imports_no_tensorflow():
  code = "import sys, input_pipeline.device_ops; sys.exit('tensorflow' in sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- pixel ops


@pytest.mark.parametrize("name", device_ops.ALBEF_OPS)
def test_randaug_op_matches_the_host_op(name):
  device_op = jax.jit(device_ops._randaug_op(name, 7, 128))
  host_op = ops_image._randaug_op(name, 7, 128)
  for image in IMAGES.values():
    for sign in (1.0, -1.0):
      got = np.asarray(device_op(jnp.asarray(image, jnp.float32), jnp.float32(sign)))
      want = host_op(tf.constant(image), tf.constant(sign)).numpy()
      _assert_close_levels(got, want, exact=name in _EXACT_OPS)


def test_autocontrast_table_equals_pils_float64_table_for_every_range():
  low, high = np.triu_indices(256, 1)  # every low < high
  low, high = low[:, None], high[:, None]
  table = np.asarray(jax.jit(device_ops._autocontrast_table)(jnp.asarray(low, jnp.int32),
                                                             jnp.asarray(high, jnp.int32)))
  values = np.arange(256)[None, :]
  scale = 255.0 / (high - low)
  pil = np.clip(values * scale + -(low * scale), 0, 255).astype(np.uint8)
  in_range = (values >= low) & (values <= high)
  np.testing.assert_array_equal(np.where(in_range, table, 0), np.where(in_range, pil, 0))


@pytest.mark.parametrize("matrix", [
    [[1, 0, 0.5], [0, 1, -0.25]],           # half-pixel shifts blend edge pixels with fill
    [[2.5, 0.1, 3], [-0.4, 0.7, -2]],       # a general affine map
    [[1, 0, -1e6 - 0.5], [0, 1, 0]],        # far outside: all neighbours read fill
    [[1, 0, -3.3e7], [0, 1, 0]],            # beyond 2^24 px: x0 + 1 == x0 in float32
    [[1, 0.21, -4e7], [0.3, 1, 0]],
    [[1, 0, 0], [0, 1, 1e30]],
])
def test_affine_matches_tf_including_far_outside_points(matrix):
  image = IMAGES["noise"]
  got = np.asarray(jax.jit(device_ops.affine)(jnp.asarray(image, jnp.float32),
                                              jnp.asarray(matrix, jnp.float32)))
  want = ops_image.affine(tf.constant(image), matrix, fill=128).numpy()
  _assert_close_levels(got, want, exact=True)


def test_single_op_randaug_applies_the_host_op_with_a_random_sign():
  images = np.stack([_scene(24, 24, seed) for seed in range(16)])
  op = jax.jit(device_ops.get_randaug(1, 7, ops=("Rotate",), prob=1.0))
  got = np.asarray(op({"image": images}, jax.random.key(0))["image"])
  host_op = ops_image._randaug_op("Rotate", 7, 128)
  signs = []
  for image, out in zip(images, got):
    candidates = {sign: host_op(tf.constant(image), tf.constant(sign)).numpy()
                  for sign in (1.0, -1.0)}
    sign = min(candidates, key=lambda s: np.abs(out - candidates[s]).sum())
    _assert_close_levels(out, candidates[sign])
    signs.append(sign)
  assert set(signs) == {1.0, -1.0}


def test_randaug_equals_a_loop_over_the_single_ops():
  """The fused batch op (one warp for all geometric ops) against each row done op by op with
  `_randaug_op` and the same draws (row key fold_in(key, row); round k's keys split from
  fold_in(row key, k))."""
  images = np.stack([_scene(20, 28, seed) for seed in range(24)]).astype(np.float32)
  key = jax.random.key(5)
  got = np.asarray(jax.jit(device_ops.get_randaug(2, 7, prob=0.7))({"image": images}, key)["image"])
  single = {name: jax.jit(device_ops._randaug_op(name, 7, 128)) for name in device_ops.ALBEF_OPS}
  drawn = set()
  for row, image in enumerate(images):
    row_key, image = jax.random.fold_in(key, row), jnp.asarray(image)
    for k in range(2):
      choice_key, apply_key, sign_key = jax.random.split(jax.random.fold_in(row_key, k), 3)
      name = device_ops.ALBEF_OPS[int(jax.random.randint(choice_key, (), 0, len(device_ops.ALBEF_OPS)))]
      sign = -1.0 if float(jax.random.uniform(sign_key)) < 0.5 else 1.0
      if float(jax.random.uniform(apply_key)) < 0.7:
        image = single[name](image, jnp.float32(sign))
        drawn.add(name)
    np.testing.assert_array_equal(got[row], np.asarray(image), err_msg=f"row {row}")
  assert len(drawn) >= 7  # most ops, geometric and not, were exercised


# ----------------------------------------------------------------------------- resize


RESIZE_CANVAS = 48
RESIZE_SIZE = 32
# (h, w): upsampling, downsampling, the whole canvas, w != h, a single row, h == size.
RESIZE_CASES = [(20, 27), (40, 35), (48, 48), (48, 13), (1, 30), (32, 32), (7, 48)]


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resize_canvas_matches_resize_uint8_and_ignores_padding(method):
  rng = np.random.default_rng(0)
  crops = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in RESIZE_CASES]
  # Non-zero garbage around each crop; it must get zero weight.
  canvas = rng.integers(1, 256, (len(crops), RESIZE_CANVAS, RESIZE_CANVAS, 3)).astype(np.uint8)
  for example, crop in zip(canvas, crops):
    example[:crop.shape[0], :crop.shape[1]] = crop
  clean = np.zeros_like(canvas)
  for example, crop in zip(clean, crops):
    example[:crop.shape[0], :crop.shape[1]] = crop
  image_hw = np.array(RESIZE_CASES, np.int32)
  op = jax.jit(device_ops.get_resize_canvas(RESIZE_SIZE, method))
  out = op({"image": canvas, "image_hw": image_hw, "text": np.arange(7)}, jax.random.key(0))
  assert set(out) == {"image", "text"}
  got = np.asarray(out["image"])
  assert got.shape == (len(crops), RESIZE_SIZE, RESIZE_SIZE, 3) and got.dtype == np.float32
  want = np.stack([ops_image.resize_uint8(tf.constant(crop), RESIZE_SIZE, method).numpy()
                   for crop in crops])
  # Pooled over the cases: the 1-row crop repeats each of its 96 values 32 times, so one tie
  # rounded the other way (a fused multiply-add in the matmul) is 1% of that image alone.
  _assert_close_levels(got, want)
  np.testing.assert_array_equal(
      np.asarray(op({"image": clean, "image_hw": image_hw}, jax.random.key(0))["image"]), got)


def test_resize_canvas_rejects_unknown_method():
  with pytest.raises(ValueError, match="lanczos3"):
    device_ops.get_resize_canvas(16, "lanczos3")


# ----------------------------------------------------------------------------- flip


def test_flip_mirrors_about_half_of_the_examples_exactly():
  images = np.random.default_rng(0).integers(0, 256, (512, 4, 5, 3)).astype(np.uint8)
  got = np.asarray(jax.jit(device_ops.get_flip())({"image": images},
                                                  jax.random.key(1))["image"])
  kept = np.all(got == images, axis=(1, 2, 3))
  mirrored = np.all(got == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(kept ^ mirrored)
  # Binomial(512, 0.5): sd 11.3; 6 sd either side.
  assert abs(mirrored.sum() - 256) < 68, mirrored.sum()
  always = jax.jit(device_ops.get_flip(1.0))({"image": images}, jax.random.key(1))["image"]
  np.testing.assert_array_equal(np.asarray(always), images[:, :, ::-1])
  never = jax.jit(device_ops.get_flip(0.0))({"image": images}, jax.random.key(1))["image"]
  np.testing.assert_array_equal(np.asarray(never), images)


# ----------------------------------------------------------------------------- randaug


def test_randaug_brightens_about_half_with_identity_and_brightness():
  images = np.full((400, 4, 4, 3), 100, np.uint8)
  op = jax.jit(device_ops.get_randaug(1, 7, ops=("Identity", "Brightness"), prob=1.0))
  got = np.asarray(op({"image": images}, jax.random.key(2))["image"])
  brightened = np.all(got == 136, axis=(1, 2, 3))  # floor(100 * 1.36)
  assert np.all(brightened | np.all(got == 100, axis=(1, 2, 3)))
  # Binomial(400, 0.5): sd 10; 6 sd either side.
  assert abs(brightened.sum() - 200) < 60, brightened.sum()


def test_randaug_with_prob_zero_is_identity():
  images = np.stack([_scene(16, 16, seed) for seed in range(8)])
  got = jax.jit(device_ops.get_randaug(2, 7, prob=0.0))({"image": images}, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(got["image"]), images)


def test_randaug_rejects_unknown_op():
  with pytest.raises(ValueError, match="Posterize"):
    device_ops.get_randaug(2, 7, ops=("Posterize",))


# ----------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("kind", ["clip", "imagenet"])
def test_normalize_matches_the_host_op(kind):
  image = IMAGES["scene"]
  got = jax.jit(device_ops.get_normalize(kind))({"image": image[None]}, jax.random.key(0))
  want = ops_image.get_normalize(kind)({"image": tf.constant(image)})["image"].numpy()
  np.testing.assert_allclose(np.asarray(got["image"])[0], want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- parse


def test_parse_rejects_unknown_op_naming_it_and_the_known_ones():
  with pytest.raises(KeyError, match=r"'posterize'.*known: flip, normalize, randaug, "
                                     r"resize_canvas"):
    device_ops.parse("flip|posterize(4)")


def test_parse_passes_arguments_and_gives_each_op_its_own_key():
  spec = "resize_canvas(8, method='bilinear')|flip(prob=0.5)|randaug(1, 7, ('Brightness',))"
  batch = {"image": np.stack([_scene(12, 12, seed) for seed in range(6)]),
           "image_hw": np.array([[12, 12], [5, 9], [12, 3], [7, 7], [10, 12], [1, 1]],
                                np.int32)}
  key = jax.random.key(5)
  got = jax.jit(device_ops.parse(spec))(batch, key)

  def by_hand(batch, key):
    ops = [device_ops.get_resize_canvas(8, method="bilinear"), device_ops.get_flip(prob=0.5),
           device_ops.get_randaug(1, 7, ("Brightness",))]
    for position, op in enumerate(ops):
      batch = op(batch, jax.random.fold_in(key, position))
    return batch

  want = jax.jit(by_hand)(batch, key)
  np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
  bicubic = jax.jit(device_ops.parse(spec.replace("bilinear", "bicubic")))(batch, key)
  assert not np.array_equal(np.asarray(bicubic["image"]), np.asarray(got["image"]))


# ----------------------------------------------------------------------------- make_augment


BATCH = 8
CANVAS = 40
SIZE = 32


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(4)
  image_hw = rng.integers(1, CANVAS + 1, (BATCH, 2)).astype(np.int32)
  image_hw[0] = (CANVAS, CANVAS)
  canvas = np.zeros((BATCH, CANVAS, CANVAS, 3), np.uint8)
  for i, (h, w) in enumerate(image_hw):
    canvas[i, :h, :w] = _scene(h, w, seed=i)
  return {"image": canvas, "image_hw": image_hw,
          "text": rng.integers(0, 1000, (BATCH, 12)).astype(np.int32)}


@pytest.fixture(scope="module")
def augment():
  return device_ops.make_augment(device_ops.ALBEF_DEVICE_PP.format(size=SIZE, canvas=CANVAS), seed=3)


def test_default_chain_outputs_normalised_images(batch, augment):
  out = augment(batch, 0)
  assert set(out) == {"image", "text"}
  image = np.asarray(out["image"])
  assert image.shape == (BATCH, SIZE, SIZE, 3) and image.dtype == np.float32
  assert np.all(np.isfinite(image))
  mean, std = np.array(device_ops.CLIP_MEAN), np.array(device_ops.CLIP_STD)
  assert np.all(image >= -mean / std - 1e-5) and np.all(image <= (1 - mean) / std + 1e-5)
  np.testing.assert_array_equal(np.asarray(out["text"]), batch["text"])


def test_make_augment_is_a_pure_function_of_seed_step_and_batch(batch, augment):
  first = np.asarray(augment(batch, 7)["image"])
  np.testing.assert_array_equal(np.asarray(augment(batch, 7)["image"]), first)
  assert not np.array_equal(np.asarray(augment(batch, 8)["image"]), first)
  other_seed = device_ops.make_augment(device_ops.ALBEF_DEVICE_PP.format(size=SIZE, canvas=CANVAS), seed=4)
  assert not np.array_equal(np.asarray(other_seed(batch, 7)["image"]), first)
  # The documented key derivation.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), device_ops._SALT), 7)
  spec = device_ops.ALBEF_DEVICE_PP.format(size=SIZE, canvas=CANVAS)
  by_hand = jax.jit(device_ops.parse(spec))(batch, key)
  np.testing.assert_array_equal(np.asarray(by_hand["image"]), first)


def test_a_rows_augmentation_depends_on_its_index_not_the_batch_size(batch, augment):
  # Rows are keyed by their index in the batch, so a prefix augments as in the whole batch.
  half = {k: v[:BATCH // 2] for k, v in batch.items()}
  np.testing.assert_array_equal(np.asarray(augment(half, 9)["image"]),
                                np.asarray(augment(batch, 9)["image"])[:BATCH // 2])


def test_make_augment_does_not_depend_on_the_sharding(batch, augment):
  mesh = Mesh(np.array(jax.devices()), ("d",))
  assert BATCH % mesh.size == 0
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P("d"))) for k, v in batch.items()}
  got = augment(sharded, 11)
  assert got["image"].sharding.is_equivalent_to(NamedSharding(mesh, P("d")), 4)
  np.testing.assert_array_equal(np.asarray(got["image"]),
                                np.asarray(augment(batch, 11)["image"]))


def test_packed_crops_unpack_and_resize_like_the_canvas():
  """`resize_canvas(canvas=)` on flat packed crops (the host's decode_crop_canvas layout)."""
  rng = np.random.default_rng(7)
  side, size = 24, 8
  crops = [(24, 18), (5, 7), (1, 24), (13, 13)]
  length = 3 * 24 * 18 + 11
  packed = rng.integers(1, 256, (len(crops), length)).astype(np.uint8)  # garbage after the crop
  canvas = np.zeros((len(crops), side, side, 3), np.uint8)
  for i, (h, w) in enumerate(crops):
    crop = _scene(h, w, seed=i)
    packed[i, :h * w * 3] = crop.ravel()
    canvas[i, :h, :w] = crop
  image_hw = np.asarray(crops, np.int32)
  unpacked = jax.vmap(device_ops.unpack, in_axes=(0, 0, None))(packed, image_hw, side)
  for i, (h, w) in enumerate(crops):
    np.testing.assert_array_equal(np.asarray(unpacked[i, :h, :w]), canvas[i, :h, :w])
  from_packed = device_ops.get_resize_canvas(size, canvas=side)(
      {"image": packed, "image_hw": image_hw}, jax.random.key(0))["image"]
  from_canvas = device_ops.get_resize_canvas(size)(
      {"image": canvas, "image_hw": image_hw}, jax.random.key(0))["image"]
  np.testing.assert_array_equal(np.asarray(from_packed), np.asarray(from_canvas))
  with pytest.raises(ValueError, match="canvas="):
    device_ops.get_resize_canvas(size)({"image": packed, "image_hw": image_hw},
                                       jax.random.key(0))
