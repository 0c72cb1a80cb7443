"""ALBEF's augmentation constants, one copy for the tf.data ops (`ops_image`) and their JAX twins
(`device_ops`). Imports neither TensorFlow nor JAX, so either side (and the benchmarks) can use it.
"""
import math

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

# ALBEF's RandomAugment op set (no colour-changing ops).
ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX",
             "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10.0
TRANSLATE_PIXELS = 10.0


def randaug_levels(magnitude: float) -> tuple[float, float, float, float]:
  """RandAugment's level -> argument maps at `magnitude` (out of `MAX_LEVEL`), in float64.

  Returns:
    (enhance, shear, shift, degrees): the Brightness / Sharpness factor M/10 * 1.8 + 0.1, the
    shear M/10 * 0.3, the translation M/10 * 10 pixels and the rotation M/10 * 30 degrees.
  """
  level = magnitude / MAX_LEVEL
  return level * 1.8 + 0.1, level * 0.3, level * TRANSLATE_PIXELS, level * 30.0


def canvas_side(size: int, ratio=(3 / 4, 4 / 3)) -> int:
  """Longest crop side (a multiple of 8) `ops_image.decode_crop_canvas` writes for `size`, `ratio`.

  A crop decoded at the largest DCT scale keeping its shorter side >= size has that side
  < 2 * size (else a scale twice as large would do), so its longer side is below
  2 * size * max aspect; for ALBEF's ratio range and size 256 that is 683 -> 688.
  """
  longest = 2 * size * max(ratio[1], 1 / ratio[0])
  return int(math.ceil(longest / 8) * 8)


def canvas_pixels(size: int, ratio=(3 / 4, 4 / 3)) -> int:
  """Most crop pixels `ops_image.decode_crop_canvas` writes: shorter side < 2 * size, longer
  side < 2 * size * max aspect (349,526 for ALBEF's ratio range and size 256)."""
  return int(math.ceil(2 * size * 2 * size * max(ratio[1], 1 / ratio[0])))
