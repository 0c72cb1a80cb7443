"""The embedded demo set: procedurally drawn shape scenes with captions, as a local TFDS dataset.

Each image is a light, slightly tinted and noisy background with 1 to 3 non-overlapping
objects. An object has a shape (circle, square, triangle, star, cross, diamond), a colour
(8 colours) and a size (small or large); scenes with 2+ objects have one spatial relation
between two of them (left of / right of / above / below) that holds in the pixels. Five
captions per image are drawn from varied templates and synonyms; the first always names every
object with its size, colour and shape (and the relation), the others describe the scene only
in part, so that several images can fit one caption and retrieval is learnable but not trivial.

The dataset is a real TFDS `GeneratorBasedBuilder` (`vlpjax_demo`) built on first use into a
local data dir, without downloads. The scene description is kept in every example, so later
tasks can derive VQA questions, statements, entailment pairs and grounding boxes from it.

    builder = build_demo()                # ~/.cache/vlpjax/tfds or $VLPJAX_DATA_DIR
    ds = load_demo("train")               # common example dicts (see `load_demo`)
"""
import contextlib
import dataclasses
import fcntl
import math
import os

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow as tf
import tensorflow_datasets as tfds

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "cyan": (30, 190, 200),
    "black": (35, 35, 35),
}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

# Words the captions use for each attribute; the first entry is the canonical name.
SHAPE_SYNONYMS = {
    "circle": ("circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
}
SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below",
                     "below": "above"}
_COUNT_WORDS = ("zero", "one", "two", "three")
_NUM_OBJECTS_PROBS = (0.2, 0.4, 0.4)  # P(1), P(2), P(3) objects
# Object side as a fraction of the image side, per size.
_SIDE_RANGE = {"small": (0.16, 0.22), "large": (0.30, 0.38)}
_SUPERSAMPLE = 4  # render at 4x and box-filter down: area-exact anti-aliasing
_MIN_GAP_PX = 2.0  # free pixels between object boxes, so a box holds one object only
_COLOR_JITTER = 12
_NUM_CAPTIONS = 5
NO_RELATION = {"subject": -1, "predicate": "", "object": -1}

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "vlpjax", "tfds")


# ----------------------------------------------------------------------------- scene layout


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _outline(shape: str, cy: float, cx: float, r: float) -> list[tuple[float, float]]:
  """Polygon vertices (x, y) in pixels of a non-circle shape centred at (cy, cx), half-side r."""
  if shape == "square":
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "triangle":
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
  if shape == "star":
    # 5 outer points at radius r alternating with 5 inner points at 0.45 r, tip up.
    points = []
    for k in range(10):
      radius, angle = (r if k % 2 == 0 else 0.45 * r), math.radians(-90 + 36 * k)
      points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points
  if shape == "cross":
    t = r / 3  # half the arm thickness
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _extent_px(shape: str, cy: float, cx: float, r: float) -> tuple[float, float, float, float]:
  """Tight box (ymin, xmin, ymax, xmax) in pixels of the drawn shape."""
  if shape == "circle":
    return cy - r, cx - r, cy + r, cx + r
  xs, ys = zip(*_outline(shape, cy, cx, r))
  return min(ys), min(xs), max(ys), max(xs)


def _boxes_apart(a, b, gap: float) -> bool:
  return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _relation_between(subject_box, object_box) -> str | None:
  """The clear spatial relation of subject to object, or None when it is ambiguous.

  Clear means the boxes are disjoint along the dominant axis and the centre offset along
  that axis is at least 1.5x the offset along the other axis. Image y grows downwards.
  """
  dy = (subject_box[0] + subject_box[2] - object_box[0] - object_box[2]) / 2
  dx = (subject_box[1] + subject_box[3] - object_box[1] - object_box[3]) / 2
  if abs(dx) >= 1.5 * abs(dy):
    if subject_box[3] <= object_box[1]:
      return "left of"
    if object_box[3] <= subject_box[1]:
      return "right of"
  elif abs(dy) >= 1.5 * abs(dx):
    if subject_box[2] <= object_box[0]:
      return "above"
    if object_box[2] <= subject_box[0]:
      return "below"
  return None


def _try_layout(rng: np.random.Generator, image_size: int):
  """One attempt at placing 1-3 objects; returns (objects, relation) or None on failure."""
  num_objects = 1 + int(rng.choice(3, p=_NUM_OBJECTS_PROBS))
  objects, used = [], set()
  for _ in range(num_objects):
    shape, color = _pick(rng, SHAPES), _pick(rng, tuple(COLORS))
    if (shape, color) in used:  # two identical-looking objects would make captions ambiguous
      return None
    used.add((shape, color))
    size = _pick(rng, SIZES)
    r = rng.uniform(*_SIDE_RANGE[size]) * image_size / 2
    for _ in range(50):
      cy, cx = rng.uniform(r + 1, image_size - r - 1, size=2)
      box = _extent_px(shape, cy, cx, r)
      if all(_boxes_apart(box, o["box_px"], _MIN_GAP_PX) for o in objects):
        break
    else:
      return None
    objects.append({"shape": shape, "color": color, "size": size,
                    "center": (cy, cx), "radius": r, "box_px": box})
  relation = dict(NO_RELATION)
  if num_objects >= 2:
    pairs = [(i, j) for i in range(num_objects) for j in range(num_objects) if i != j]
    for k in rng.permutation(len(pairs)):
      i, j = pairs[k]
      predicate = _relation_between(objects[i]["box_px"], objects[j]["box_px"])
      if predicate is not None:
        relation = {"subject": i, "predicate": predicate, "object": j}
        break
    else:
      return None
  return objects, relation


def _sample_layout(rng: np.random.Generator, image_size: int):
  while True:
    layout = _try_layout(rng, image_size)
    if layout is not None:
      return layout


# ----------------------------------------------------------------------------- rendering


def _render(objects, rng: np.random.Generator, image_size: int) -> np.ndarray:
  """Draws the objects over a light tinted noisy background; returns uint8 [size, size, 3]."""
  gray = rng.uniform(220, 248)
  background = np.clip(gray + rng.uniform(-8, 8, size=3), 0, 255)
  image = np.broadcast_to(background, (image_size, image_size, 3)).astype(np.float64)
  big = image_size * _SUPERSAMPLE
  for obj in objects:
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cy, cx = obj["center"]
    r = obj["radius"]
    if obj["shape"] == "circle":
      s = _SUPERSAMPLE  # PIL's ellipse box includes its right and bottom pixel rows
      draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    else:
      draw.polygon([(x * _SUPERSAMPLE, y * _SUPERSAMPLE)
                    for x, y in _outline(obj["shape"], cy, cx, r)], fill=255)
    coverage = np.asarray(canvas.resize((image_size, image_size), Image.BOX),
                          np.float64)[..., None] / 255.0
    color = np.clip(np.asarray(COLORS[obj["color"]])
                    + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3), 0, 255)
    image = image * (1 - coverage) + color * coverage
  image += rng.normal(0.0, 2.5, size=image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions


def _with_article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj, rng, with_size: bool) -> str:
  words = [_pick(rng, SIZE_SYNONYMS[obj["size"]])] if with_size else []
  words += [obj["color"], _pick(rng, SHAPE_SYNONYMS[obj["shape"]])]
  return _with_article(" ".join(words))


def _join_list(phrases: list[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _object_list(objects, rng, with_size: bool) -> str:
  return _join_list([_noun_phrase(objects[i], rng, with_size)
                     for i in rng.permutation(len(objects))])


def _shapes_word(n: int) -> str:
  return "shape" if n == 1 else "shapes"


def _caption_full(objects, relation, rng) -> str:
  """Names every object with size, colour and shape, and the relation when there is one."""
  if relation["predicate"]:
    s, o = relation["subject"], relation["object"]
    caption = (f"{_noun_phrase(objects[s], rng, True)} "
               f"{_pick(rng, RELATION_PHRASES[relation['predicate']])} "
               f"{_noun_phrase(objects[o], rng, True)}")
    rest = [obj for k, obj in enumerate(objects) if k not in (s, o)]
    if rest:
      caption += " and " + _object_list(rest, rng, True)
    return caption
  return _noun_phrase(objects[0], rng, True) + " on a plain background"


def _caption_there_is(objects, relation, rng) -> str:
  del relation
  n = len(objects)
  if n == 1 or rng.random() < 0.5:
    return "there is " + _object_list(objects, rng, bool(rng.random() < 0.5))
  return f"there are {_COUNT_WORDS[n]} shapes: " + _object_list(objects, rng, False)


def _caption_count(objects, relation, rng) -> str:
  del relation
  n = len(objects)
  if n == 1:
    return f"a single {objects[0]['color']} {_pick(rng, SHAPE_SYNONYMS[objects[0]['shape']])}"
  return f"{_COUNT_WORDS[n]} shapes: " + _object_list(objects, rng, True)


def _caption_relation(objects, relation, rng) -> str:
  """The relation seen from its object (inverse predicate); 'only one shape' without one."""
  if not relation["predicate"]:
    return "only one shape: " + _noun_phrase(objects[0], rng, bool(rng.random() < 0.5))
  inverse = _INVERSE_RELATION[relation["predicate"]]
  return (f"{_noun_phrase(objects[relation['object']], rng, False)} is "
          f"{_pick(rng, RELATION_PHRASES[inverse])} "
          f"{_noun_phrase(objects[relation['subject']], rng, False)}")


def _caption_image_of(objects, relation, rng) -> str:
  del relation
  prefix = _pick(rng, ("an image of", "a picture with", "a drawing of", "a photo showing"))
  return f"{prefix} " + _object_list(objects, rng, bool(rng.random() < 0.5))


def _caption_focus(objects, relation, rng) -> str:
  """One object in detail, the others only counted."""
  del relation
  n = len(objects)
  obj = objects[int(rng.integers(n))]
  if n == 1:
    return (f"{_with_article(_pick(rng, SIZE_SYNONYMS[obj['size']]))} "
            f"{_pick(rng, SHAPE_SYNONYMS[obj['shape']])} colored {obj['color']}")
  others = n - 1
  return (f"{_noun_phrase(obj, rng, True)} and {_COUNT_WORDS[others]} other "
          f"{_shapes_word(others)}")


def _caption_colors(objects, relation, rng) -> str:
  """Only the distinct colours (in random order), no shapes."""
  del relation
  n = len(objects)
  colors = list(dict.fromkeys(objects[i]["color"] for i in rng.permutation(n)))
  if n == 1:
    return f"one {colors[0]} shape"
  return f"{_COUNT_WORDS[n]} shapes colored {_join_list(colors)}"


_PARTIAL_CAPTIONS = (_caption_there_is, _caption_count, _caption_relation, _caption_image_of,
                     _caption_focus, _caption_colors)


def _describe(objects, relation, rng: np.random.Generator) -> list[str]:
  """Five captions: the full description first, then four different partial templates."""
  templates = [_PARTIAL_CAPTIONS[i]
               for i in rng.permutation(len(_PARTIAL_CAPTIONS))[:_NUM_CAPTIONS - 1]]
  return [_caption_full(objects, relation, rng)] + [t(objects, relation, rng) for t in templates]


def _scene_dict(objects, relation, image_size: int) -> dict:
  return {
      "objects": [{
          "shape": o["shape"],
          "color": o["color"],
          "size": o["size"],
          "bbox": tuple(float(np.clip(v / image_size, 0.0, 1.0)) for v in o["box_px"]),
      } for o in objects],
      "relation": dict(relation),
  }


def generate_scene(rng: np.random.Generator, image_size: int = 64):
  """Draws one random scene.

  Args:
    rng: the only source of randomness; equal generator states give equal scenes.
    image_size: side of the square image in pixels.

  Returns:
    image: uint8 [image_size, image_size, 3].
    scene: {"objects": [{"shape", "color", "size": str, "bbox": (ymin, xmin, ymax, xmax)
      normalised to [0, 1]}], "relation": {"subject": int, "predicate": str, "object": int}},
      the relation being `NO_RELATION` (-1, "", -1) for single-object scenes.
    captions: five strings, the first naming every object in full.
  """
  objects, relation = _sample_layout(rng, image_size)
  captions = _describe(objects, relation, rng)
  image = _render(objects, rng, image_size)
  return image, _scene_dict(objects, relation, image_size), captions


def demo_captions(n: int, seed: int = 0) -> list[str]:
  """`n` captions of freshly sampled scenes (five per scene, not rendered), for tokenizers."""
  rng = np.random.default_rng([seed, 7])
  captions = []
  while len(captions) < n:
    objects, relation = _sample_layout(rng, 64)
    captions.extend(_describe(objects, relation, rng))
  return captions[:n]


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class DemoConfig(tfds.core.BuilderConfig):
  """Sizes of the demo set. Train ids are 0..num_train-1, test ids follow them."""

  image_size: int = 64
  num_train: int = 10_000
  num_test: int = 1_000
  seed: int = 0


_SPLIT_STREAMS = {"train": 0, "test": 1}  # per-split seed streams: the splits share no scene


class VlpjaxDemo(tfds.core.GeneratorBasedBuilder):
  """Procedural shape scenes with five captions each and their full scene description."""

  name = "vlpjax_demo"
  # TFDS 4.9.10 finds a packaged builder's file through `importlib_resources`, which it only
  # declares for Python < 3.9 (ModuleNotFoundError here); the answer is this very file.
  code_path = tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(__file__)))
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      DemoConfig(name="default", description="10,000 train / 1,000 test images, 64 px."),
      DemoConfig(name="tiny", num_train=256, num_test=64,
                 description="256 train / 64 test images, 64 px, for tests."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "image_id": np.int64,
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "objects": tfds.features.Sequence({
                "shape": tfds.features.Text(),
                "color": tfds.features.Text(),
                "size": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
            }),
            "relation": tfds.features.FeaturesDict({
                "subject": np.int64,
                "predicate": tfds.features.Text(),
                "object": np.int64,
            }),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {
        "train": self._generate_examples("train", config.num_train, 0),
        "test": self._generate_examples("test", config.num_test, config.num_train),
    }

  def _generate_examples(self, split: str, num_examples: int, first_id: int):
    config = self.builder_config
    for index in range(num_examples):
      rng = np.random.default_rng([config.seed, _SPLIT_STREAMS[split], index])
      image, scene, captions = generate_scene(rng, config.image_size)
      image_id = first_id + index
      yield image_id, {
          "image": image,
          "image_id": image_id,
          "captions": captions,
          "objects": [{**o, "bbox": np.asarray(o["bbox"], np.float32)} for o in scene["objects"]],
          "relation": scene["relation"],
      }


@contextlib.contextmanager
def build_lock(directory: str, name: str):
  """Serialises concurrent builds of one dataset `name` (e.g. two local processes) on one machine,
  with an exclusive lock on `directory/.{name}.lock` (also used by `demo_tasks`)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f".{name}.lock"), "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _resolve_data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or os.environ.get("VLPJAX_DATA_DIR") or DEFAULT_DATA_DIR)


def build_demo(data_dir: str | None = None,
               config: str | DemoConfig = "default") -> tfds.core.DatasetBuilder:
  """Returns the prepared `vlpjax_demo` builder, generating the data first if it is missing.

  Args:
    data_dir: TFDS data dir; default `$VLPJAX_DATA_DIR`, else `~/.cache/vlpjax/tfds`.
    config: a config name (`default`, `tiny`) or a `DemoConfig`.
  """
  data_dir = _resolve_data_dir(data_dir)
  known = [c.name for c in VlpjaxDemo.BUILDER_CONFIGS]
  if isinstance(config, str) and config not in known:
    raise ValueError(f"vlpjax_demo has no config {config!r}; known: {known}")
  builder = VlpjaxDemo(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    with build_lock(data_dir, f"vlpjax_demo-{builder.builder_config.name}"):
      # Another process may have built it while this one waited for the lock: look again.
      builder = VlpjaxDemo(config=config, data_dir=data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    builder = VlpjaxDemo(config=config, data_dir=data_dir)  # reads the finished split metadata
  return builder


def _to_common_example(example: dict) -> dict:
  """Flattens a decoded TFDS example into the common example dict of every source."""
  objects, relation = example["objects"], example["relation"]
  return {
      "image": example["image"],
      "image_id": example["image_id"],
      "captions": example["captions"],
      "concepts": tf.strings.join([objects["color"], objects["shape"]], separator=" "),
      "objects/label": objects["shape"],
      "objects/bbox": objects["bbox"],
      "objects/shape": objects["shape"],
      "objects/color": objects["color"],
      "objects/size": objects["size"],
      "relation/subject": relation["subject"],
      "relation/predicate": relation["predicate"],
      "relation/object": relation["object"],
  }


def load_demo(split: str, *, data_dir: str | None = None, config: str | DemoConfig = "default",
              shuffle_files: bool = False) -> tf.data.Dataset:
  """The demo split as common example dicts, building the dataset first if needed.

  Args:
    split: a TFDS split string: `train`, `test`, `train[:10%]`, ...
    data_dir, config: as in `build_demo`.
    shuffle_files: shuffle the order of the files read (deterministic TFDS seeds).

  Returns:
    A dataset of dicts: `image` tf.string (PNG bytes), `image_id` int64, `captions` string
    [5], `concepts` string [objects] ("red circle"), `objects/label` string [objects] (the
    shape), `objects/bbox` float32 [objects, 4] (ymin, xmin, ymax, xmax in [0, 1]),
    `objects/shape`, `objects/color`, `objects/size` string [objects], `relation/subject`,
    `relation/object` int64 (-1 when absent) and `relation/predicate` string ("" when absent).
  """
  builder = build_demo(data_dir, config)
  # No TFDS auto-cache: the trainer reads a repeated, shuffled stream and stops part way through
  # an epoch, and a partly read cache only earns TensorFlow's "cached dataset not fully read" warning.
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(_to_common_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
