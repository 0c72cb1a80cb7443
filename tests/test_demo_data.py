"""The demo dataset: offline TFDS build, split sizes, ids, captions vs scene, pixels vs boxes."""
import glob
import io
import os

import numpy as np
from PIL import Image
import pytest

from input_pipeline import demo_data

TINY_TRAIN, TINY_TEST = 256, 64
IMAGE_SIZE = 64
PALETTE = np.array(list(demo_data.COLORS.values()), np.float64)  # [colors, 3]
COLOR_NAMES = list(demo_data.COLORS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  demo_data.build_demo(data_dir, "tiny")
  return data_dir


@pytest.fixture(scope="module")
def tiny_examples(tiny_dir):
  """All tiny examples as numpy dicts, per split."""
  return {split: list(demo_data.load_demo(split, data_dir=tiny_dir, config="tiny")
                      .as_numpy_iterator())
          for split in ("train", "test")}


def _words(text: str) -> str:
  return " " + text.replace(",", " ").replace(":", " ") + " "


def _mentions(caption: str, phrase: str) -> bool:
  return f" {phrase} " in _words(caption)


def _decode(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _nearest_class(image: np.ndarray, background: np.ndarray) -> np.ndarray:
  """Per pixel: index into COLOR_NAMES, or -1 where the background is closest."""
  references = np.concatenate([PALETTE, background[None]], axis=0)  # [colors + 1, 3]
  distances = np.linalg.norm(image[:, :, None, :].astype(np.float64) - references, axis=-1)
  nearest = distances.argmin(-1)
  return np.where(nearest == len(PALETTE), -1, nearest)


def _ink(image: np.ndarray, background: np.ndarray) -> np.ndarray:
  """Pixels that differ from the background by more than noise (~12% object coverage)."""
  return np.linalg.norm(image.astype(np.float64) - background, axis=-1) > 24


def _box_px(bbox, pad: float = 0.0):
  ymin, xmin, ymax, xmax = np.asarray(bbox) * IMAGE_SIZE
  return (int(max(np.floor(ymin - pad), 0)), int(max(np.floor(xmin - pad), 0)),
          int(min(np.ceil(ymax + pad), IMAGE_SIZE)), int(min(np.ceil(xmax + pad), IMAGE_SIZE)))


def test_tiny_splits_have_configured_sizes(tiny_dir, tiny_examples):
  builder = demo_data.build_demo(tiny_dir, "tiny")  # reuses the prepared data
  assert builder.info.splits["train"].num_examples == TINY_TRAIN
  assert builder.info.splits["test"].num_examples == TINY_TEST
  assert len(tiny_examples["train"]) == TINY_TRAIN
  assert len(tiny_examples["test"]) == TINY_TEST


def test_image_ids_unique_across_splits(tiny_examples):
  train_ids = {int(e["image_id"]) for e in tiny_examples["train"]}
  test_ids = {int(e["image_id"]) for e in tiny_examples["test"]}
  assert len(train_ids) == TINY_TRAIN and len(test_ids) == TINY_TEST
  assert not train_ids & test_ids


def test_common_example_fields(tiny_examples):
  example = tiny_examples["train"][0]
  num_objects = len(example["objects/shape"])
  assert example["image"][:8] == b"\x89PNG\r\n\x1a\n"
  assert example["captions"].shape == (5,)
  assert example["objects/bbox"].shape == (num_objects, 4)
  assert example["objects/bbox"].dtype == np.float32
  for key in ("concepts", "objects/label", "objects/color", "objects/size"):
    assert example[key].shape == (num_objects,), key
  expected_concepts = [c + b" " + s for c, s in zip(example["objects/color"],
                                                     example["objects/shape"])]
  assert list(example["concepts"]) == expected_concepts
  assert list(example["objects/label"]) == list(example["objects/shape"])


def test_captions_describe_the_scene(tiny_examples):
  synonyms = {shape: demo_data.SHAPE_SYNONYMS[shape] for shape in demo_data.SHAPES}
  for example in tiny_examples["train"] + tiny_examples["test"]:
    captions = [c.decode() for c in example["captions"]]
    colors = {c.decode() for c in example["objects/color"]}
    shapes = {s.decode() for s in example["objects/shape"]}
    assert len(captions) == 5 and len(set(captions)) >= 4
    # The first caption names every object's colour and shape.
    for color in colors:
      assert _mentions(captions[0], color), (captions[0], colors)
    for shape in shapes:
      assert any(_mentions(captions[0], word) for word in synonyms[shape]), (captions[0], shape)
    # No caption names a colour or shape that is not in the scene.
    for caption in captions:
      for color in set(COLOR_NAMES) - colors:
        assert not _mentions(caption, color), (caption, colors)
      for shape in set(demo_data.SHAPES) - shapes:
        for word in synonyms[shape]:
          assert not _mentions(caption, word), (caption, shapes)
    predicate = example["relation/predicate"].decode()
    if predicate:
      assert any(_mentions(captions[0], phrase)
                 for phrase in demo_data.RELATION_PHRASES[predicate]), (captions[0], predicate)
    else:
      assert len(shapes) == 1


def test_relation_holds_in_boxes(tiny_examples):
  seen = set()
  for example in tiny_examples["train"]:
    predicate = example["relation/predicate"].decode()
    num_objects = len(example["objects/shape"])
    if num_objects == 1:
      assert (predicate, example["relation/subject"], example["relation/object"]) == ("", -1, -1)
      continue
    seen.add(predicate)
    subject = example["objects/bbox"][example["relation/subject"]]
    obj = example["objects/bbox"][example["relation/object"]]
    ymin, xmin, ymax, xmax = 0, 1, 2, 3
    holds = {"left of": subject[xmax] <= obj[xmin], "right of": obj[xmax] <= subject[xmin],
             "above": subject[ymax] <= obj[ymin], "below": obj[ymax] <= subject[ymin]}
    assert holds[predicate], (predicate, subject, obj)
  assert seen == set(demo_data.RELATIONS)


def test_boxes_match_the_rendered_pixels(tiny_examples):
  for example in tiny_examples["test"]:
    image = _decode(example["image"])
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    background = np.median(image.reshape(-1, 3), axis=0)
    classes, ink = _nearest_class(image, background), _ink(image, background)
    outside = np.ones(classes.shape, bool)
    for bbox, color in zip(example["objects/bbox"], example["objects/color"]):
      assert np.all((bbox >= 0) & (bbox <= 1)) and bbox[0] < bbox[2] and bbox[1] < bbox[3]
      color_index = COLOR_NAMES.index(color.decode())
      y0, x0, y1, x1 = _box_px(bbox)
      inside = classes[y0:y1, x0:x1]
      counts = np.bincount(inside[inside >= 0].ravel(), minlength=len(COLOR_NAMES))
      # The object's colour dominates its box and fills a good part of it.
      assert counts.argmax() == color_index
      assert counts[color_index] >= 0.2 * inside.size
      # The box is tight: the drawn pixels reach each side of it, to pixel precision.
      y0, x0, y1, x1 = _box_px(bbox, pad=1)
      rows, cols = np.nonzero(ink[y0:y1, x0:x1])
      extent = np.array([rows.min() + y0, cols.min() + x0, rows.max() + y0 + 1,
                         cols.max() + x0 + 1])
      np.testing.assert_allclose(extent, bbox * IMAGE_SIZE, atol=1.01)
      outside[y0:y1, x0:x1] = False
    # Away from the boxes there is only background.
    assert not np.any(ink[outside])


def test_two_builds_give_identical_bytes(tiny_dir, tmp_path):
  demo_data.build_demo(str(tmp_path), "tiny")
  first = sorted(glob.glob(os.path.join(tiny_dir, "vlpjax_demo", "tiny", "*", "*.tfrecord*")))
  second = sorted(glob.glob(os.path.join(tmp_path, "vlpjax_demo", "tiny", "*", "*.tfrecord*")))
  assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
  assert len(first) >= 2
  for a, b in zip(first, second):
    with open(a, "rb") as fa, open(b, "rb") as fb:
      assert fa.read() == fb.read(), a


def test_generate_scene_is_a_function_of_the_generator_state():
  image_a, scene_a, captions_a = demo_data.generate_scene(np.random.default_rng(5), 48)
  image_b, scene_b, captions_b = demo_data.generate_scene(np.random.default_rng(5), 48)
  image_c, _, _ = demo_data.generate_scene(np.random.default_rng(6), 48)
  assert image_a.shape == (48, 48, 3) and image_a.dtype == np.uint8
  np.testing.assert_array_equal(image_a, image_b)
  assert scene_a == scene_b and captions_a == captions_b
  assert not np.array_equal(image_a, image_c)


def test_scene_statistics_cover_all_attributes():
  rng = np.random.default_rng(0)
  seen = {"shape": set(), "color": set(), "size": set(), "count": set()}
  for _ in range(300):
    _, scene, _ = demo_data.generate_scene(rng, 32)
    seen["count"].add(len(scene["objects"]))
    for obj in scene["objects"]:
      for field in ("shape", "color", "size"):
        seen[field].add(obj[field])
  assert seen == {"shape": set(demo_data.SHAPES), "color": set(COLOR_NAMES),
                  "size": set(demo_data.SIZES), "count": {1, 2, 3}}


def test_demo_captions():
  captions = demo_data.demo_captions(23)
  assert len(captions) == 23 and all(isinstance(c, str) and c for c in captions)
  assert captions == demo_data.demo_captions(23)
  assert captions != demo_data.demo_captions(23, seed=1)


def test_unknown_config_is_named(tmp_path):
  with pytest.raises(ValueError, match="huge"):
    demo_data.build_demo(str(tmp_path), "huge")


def test_custom_config_sets_image_size_and_ids(tmp_path):
  config = demo_data.DemoConfig(name="px32", image_size=32, num_train=6, num_test=3, seed=4)
  test = list(demo_data.load_demo("test", data_dir=str(tmp_path), config=config)
              .as_numpy_iterator())
  assert sorted(int(e["image_id"]) for e in test) == [6, 7, 8]
  assert all(_decode(e["image"]).shape == (32, 32, 3) for e in test)
