"""Miniature VQA, NLVR2, SNLI-VE and RefCOCO+ datasets drawn from the demo scenes, in the real
annotation formats (PNG files + JSON, read by `input_pipeline.tasks` like the real data).

Every image is a procedural scene of `demo_data.generate_scene` (1 to 3 shapes of 6 kinds in 8
colours and 2 sizes, one spatial relation), so a small model can learn each task from pixels and
text, and chance levels are known (`manifest.json`, key `chance`):

  vqa      2 questions per image: "what color is the square?", "what shape is the red one?",
           "how many shapes are there?", "is there a red square?" (yes / no alternate),
           "what size is the red square?"; 10 annotator answers, 7 to 10 of them right, the
           rest plausible confusions; about 10% of training questions are VG-style (one
           answer, weight 0.5). `answer_list.json` holds the distinct answers.
  nlvr2    two scenes and two sentences per pair, one true and one false, from one template:
           "the left image contains a red circle", "both images contain a square", "the right
           image has more shapes than the left image", "the left image contains two shapes";
           labels exactly 50/50, so the sentence must be read against both images.
  snli_ve  three hypotheses per scene, one per label: entailment = a true statement ("there is
           a red square", "there are two shapes", "the red square is left of the blue
           circle"), contradiction = the same statement with a colour or shape changed to one
           absent from the image (or a wrong count), neutral = a statement about a shown object
           that no picture decides ("the red square is made of wood"). Labels in exact thirds;
           neutral is recognisable from the words alone, so a hypothesis-only model reaches 2/3.
  refcoco  scenes of 2-3 shapes; expressions "the red square", "the large blue circle", "the
           green shape", "the shape left of the green triangle" (unique referents only), with
           the referred box; proposals = every object's box, a box half off the target and two
           random boxes (exactly one proposal has IoU >= 0.5 with the target). Test splits: val
           (any expression), testA (attribute expressions), testB (relational expressions).

Every entry also carries ViCHA's visual-concept words as its released downstream files do
(`kwords`; NLVR2 `kwords1`, `kwords2`): the demo's stand-in for CLIP's top-15 words,
`concepts.demo_kwords` of the scene (its object words, 20% replaced by distractors, then
distractors), drawn from a stream of their own so the rest of the data does not change.

Splits `train` and `test` (`test` has ground truth). Built once per (task, config) under
`$VLPJAX_DEMO_DIR` or `~/.cache/vlpjax/demo_tasks`, guarded by a file lock, into a temporary
folder renamed into place, so readers only ever see complete data:

    directory = build_demo_task("vqa", "tiny")   # .../vqa-tiny/{train,test}.json, images/...
"""
import dataclasses
import json
import os
import shutil

import numpy as np
from PIL import Image

from input_pipeline import concepts
from input_pipeline import demo_data

TASKS = ("vqa", "nlvr2", "snli_ve", "refcoco")
SPLITS = ("train", "test")
VERSION = 3  # bump when the generated content changes: older builds are then rebuilt
DEFAULT_ROOT = os.path.join("~", ".cache", "vlpjax", "demo_tasks")
MANIFEST = "manifest.json"
ANSWER_LIST = "answer_list.json"

_TASK_STREAMS = {task: 100 + k for k, task in enumerate(TASKS)}
_SPLIT_STREAMS = {"train": 0, "test": 1}
_COUNT_WORDS = ("zero", "one", "two", "three")
_COLORS = tuple(demo_data.COLORS)
_SHAPES = demo_data.SHAPES
_SIZES = demo_data.SIZES


@dataclasses.dataclass(frozen=True)
class DemoTaskConfig:
  """Sizes of a task demo: examples per split (rounded down to whole images or pairs)."""
  name: str
  num_train: int
  num_test: int
  image_size: int = 64
  seed: int = 0


CONFIGS = {
    "default": DemoTaskConfig("default", num_train=3000, num_test=500),
    "tiny": DemoTaskConfig("tiny", num_train=128, num_test=64),
}


# ----------------------------------------------------------------------------- phrases


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _name(obj: dict, with_size: bool = False) -> str:
  """"red square" or "large red square"."""
  return " ".join(([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]])


def _pick(rng: np.random.Generator, options):
  options = list(options)
  return options[int(rng.integers(len(options)))]


def _absent_combination(objects, rng, keep: str | None = None) -> tuple[str, str]:
  """A (colour, shape) no object has; `keep` = 'color' or 'shape' keeps that attribute of a
  random object, so only the binding of the two attributes tells it apart."""
  present = {(o["color"], o["shape"]) for o in objects}
  obj = _pick(rng, objects)
  while True:
    color = obj["color"] if keep == "color" else _pick(rng, _COLORS)
    shape = obj["shape"] if keep == "shape" else _pick(rng, _SHAPES)
    if (color, shape) not in present:
      return color, shape


def _unique(objects, attribute: str) -> list[dict]:
  """Objects whose `attribute` value no other object shares."""
  values = [o[attribute] for o in objects]
  return [o for o in objects if values.count(o[attribute]) == 1]


# ----------------------------------------------------------------------------- VQA


def _vqa_question(kind: str, objects, rng, yes: bool):
  """(question, answer, confusions) of one question kind, or None where it does not apply."""
  if kind == "color":
    candidates = _unique(objects, "shape")
    if not candidates:
      return None
    obj = _pick(rng, candidates)
    return f"what color is the {obj['shape']}?", obj["color"], _COLORS
  if kind == "shape":
    candidates = _unique(objects, "color")
    if not candidates:
      return None
    obj = _pick(rng, candidates)
    return f"what shape is the {obj['color']} one?", obj["shape"], _SHAPES
  if kind == "count":
    # Digits, as VQA v2's annotations hold counts: the official normalisation maps a predicted
    # "two" to "2" but leaves the ground truth as written.
    return "how many shapes are there?", str(len(objects)), ("1", "2", "3")
  if kind == "exists":
    if yes:
      obj = _pick(rng, objects)
      color, shape = obj["color"], obj["shape"]
    else:
      color, shape = _absent_combination(objects, rng, _pick(rng, ("color", "shape")))
    return f"is there {_article(f'{color} {shape}')}?", "yes" if yes else "no", ("yes", "no")
  obj = _pick(rng, objects)
  return f"what size is the {_name(obj)}?", obj["size"], _SIZES


_VQA_KINDS = ("color", "shape", "count", "exists", "size")


def vqa_answers() -> list[str]:
  """Every answer `_vqa_question` can give, sorted: the demo VQA's `answer_list.json` (a
  classifier head over the answers, e.g. MVP's, sizes itself by it before the data exists)."""
  return sorted(set(_COLORS) | set(_SHAPES) | {"1", "2", "3"} | {"yes", "no"} | set(_SIZES))
_VQA_QUESTIONS_PER_IMAGE = 2


def _annotators(answer: str, confusions, rng) -> list[str]:
  """Ten answers: 7 to 10 give `answer`, the others a different one of `confusions`."""
  num_right = int(rng.integers(7, 11))
  wrong = [a for a in confusions if a != answer]
  answers = [answer] * num_right + [_pick(rng, wrong) for _ in range(10 - num_right)]
  return [answers[k] for k in rng.permutation(10)]


def _vqa_units(config: DemoTaskConfig, split: str, num: int, save):
  """Entries of the VQA demo: `_VQA_QUESTIONS_PER_IMAGE` questions of different kinds per image."""
  entries, num_exists = [], 0
  for index in range(num // _VQA_QUESTIONS_PER_IMAGE):
    rng = _rng(config, "vqa", split, index)
    image, scene, _ = demo_data.generate_scene(rng, config.image_size)
    path = save(f"images/{split}_{index:05d}.png", image)
    kinds = [_VQA_KINDS[k] for k in rng.permutation(len(_VQA_KINDS))]
    asked = 0
    for kind in kinds:
      question = _vqa_question(kind, scene["objects"], rng, yes=num_exists % 2 == 0)
      if question is None:
        continue
      num_exists += kind == "exists"
      text, answer, confusions = question
      entry = {"question_id": _SPLIT_STREAMS[split] * 1_000_000 + len(entries),
               "question": text, "image": path, "question_type": kind,
               "kwords": _kwords(config, "vqa", split, index, scene["objects"])}
      if split == "train" and rng.random() < 0.1:
        entry.update(answer=answer, dataset="vg")
      else:
        entry.update(answer=_annotators(answer, confusions, rng), dataset="vqa")
      entries.append(entry)
      asked += 1
      if asked == _VQA_QUESTIONS_PER_IMAGE:
        break
  return entries


def _vqa_accuracy(prediction: str, answers) -> float:
  """VQA accuracy of one prediction against the annotators' answers (no normalisation):
  the mean over the leave-one-out subsets of min(#matches / 3, 1)."""
  answers = list(answers)
  if len(answers) == 1:  # a VG question: one answer
    return float(prediction == answers[0])
  return float(np.mean([min(sum(a == prediction for a in answers[:k] + answers[k + 1:]) / 3, 1)
                        for k in range(len(answers))]))


def _vqa_chance(train, test) -> dict:
  """Accuracies on test of answer priors: the most frequent training answer overall, and per
  question kind (which the question's words give away)."""

  def most_frequent(entries):
    counts = {}
    for e in entries:
      for a in ([e["answer"]] if isinstance(e["answer"], str) else e["answer"]):
        counts[a] = counts.get(a, 0) + 1
    return max(sorted(counts), key=counts.get)

  overall = most_frequent(train)
  per_kind = {kind: most_frequent([e for e in train if e["question_type"] == kind])
              for kind in {e["question_type"] for e in train}}
  return {
      "most_frequent_answer": float(np.mean([_vqa_accuracy(overall, e["answer"]) for e in test])),
      "prior_per_question_type": float(np.mean(
          [_vqa_accuracy(per_kind.get(e["question_type"], overall), e["answer"]) for e in test])),
  }


# ----------------------------------------------------------------------------- NLVR2

_SIDES = ("left", "right")


def _nlvr2_contains(scenes, true: bool, rng):
  side = int(rng.integers(2))
  objects = scenes[side]
  if true:
    color, shape = _name(_pick(rng, objects)).split(" ")
  else:
    present = {(o["color"], o["shape"]) for o in objects}
    elsewhere = [(o["color"], o["shape"]) for o in scenes[1 - side]
                 if (o["color"], o["shape"]) not in present]
    if elsewhere and rng.random() < 0.5:  # false here, true in the other image
      color, shape = _pick(rng, elsewhere)
    else:
      color, shape = _absent_combination(objects, rng, _pick(rng, ("color", "shape", None)))
  return f"the {_SIDES[side]} image contains {_article(f'{color} {shape}')}"


def _nlvr2_both(scenes, true: bool, rng):
  attribute = _pick(rng, ("shape", "color"))
  left, right = ({o[attribute] for o in objects} for objects in scenes)
  values = _SHAPES if attribute == "shape" else _COLORS
  if true:
    options = sorted(left & right)
  else:  # prefer values that one image has: the other image must be checked too
    options = sorted(left ^ right) if (left ^ right and rng.random() < 0.7) else sorted(
        set(values) - (left & right))
  if not options:
    return None
  value = _pick(rng, options)
  thing = value if attribute == "shape" else f"{value} shape"
  return f"both images contain {_article(thing)}"


def _nlvr2_more(scenes, true: bool, rng):
  counts = [len(objects) for objects in scenes]
  if true and counts[0] == counts[1]:
    return None
  more = int(np.argmax(counts)) if true else (
      int(rng.integers(2)) if counts[0] == counts[1] else int(np.argmin(counts)))
  return f"the {_SIDES[more]} image has more shapes than the {_SIDES[1 - more]} image"


def _nlvr2_count(scenes, true: bool, rng):
  side = int(rng.integers(2))
  count = len(scenes[side])
  if not true:
    count = _pick(rng, [c for c in (1, 2, 3) if c != count])
  noun = "shape" if count == 1 else "shapes"
  return f"the {_SIDES[side]} image contains {_COUNT_WORDS[count]} {noun}"


_NLVR2_TEMPLATES = (_nlvr2_contains, _nlvr2_both, _nlvr2_more, _nlvr2_count)


def _nlvr2_units(config: DemoTaskConfig, split: str, num: int, save):
  """Entries of the NLVR2 demo: per pair of scenes, a true and a false sentence of one template."""
  entries = []
  for index in range(num // 2):
    rng = _rng(config, "nlvr2", split, index)
    paths, scenes = [], []
    for slot in range(2):
      image, scene, _ = demo_data.generate_scene(rng, config.image_size)
      paths.append(save(f"images/{split}_{index:05d}_img{slot}.png", image))
      scenes.append(scene["objects"])
    for k in rng.permutation(len(_NLVR2_TEMPLATES)):
      sentences = [_NLVR2_TEMPLATES[k](scenes, true, rng) for true in (True, False)]
      if None not in sentences:
        break
    for true, sentence in zip((True, False), sentences):
      entries.append({"identifier": f"{split}-{index}-{int(not true)}", "images": paths,
                      "sentence": sentence, "label": str(true),
                      **{f"kwords{slot + 1}": _kwords(config, "nlvr2", split, index, scenes[slot], slot)
                         for slot in range(2)}})
  return entries


# ----------------------------------------------------------------------------- SNLI-VE

# Properties that no drawing shows: hypotheses with them are neutral.
_UNDECIDABLE = ("is made of wood", "is made of metal", "is made of paper", "is heavy",
                "is very old", "is cold", "belongs to a child", "is for sale")


def _changed(obj, objects, rng) -> dict:
  """`obj` with its colour or its shape replaced by one that no object in the image has."""
  attribute = _pick(rng, ("color", "shape"))
  absent = [v for v in (_COLORS if attribute == "color" else _SHAPES)
            if v not in {o[attribute] for o in objects}]
  return {**obj, attribute: _pick(rng, absent)}


def _snli_ve_hypotheses(scene, rng) -> dict[str, str]:
  """{label: hypothesis} for one scene, the three from one template."""
  objects, relation = scene["objects"], scene["relation"]
  families = ["exists", "count"] + (["relation"] if relation["predicate"] else [])
  family = _pick(rng, families)
  obj = _pick(rng, objects)
  neutral = f"the {_name(obj)} {_pick(rng, _UNDECIDABLE)}"
  if family == "exists":
    with_size = bool(rng.random() < 0.5)
    return {"entailment": f"there is {_article(_name(obj, with_size))}",
            "contradiction": f"there is {_article(_name(_changed(obj, objects, rng), with_size))}",
            "neutral": neutral}
  if family == "count":
    n = len(objects)
    wrong = _pick(rng, [c for c in (1, 2, 3) if c != n])
    count = lambda c: "there is one shape" if c == 1 else f"there are {_COUNT_WORDS[c]} shapes"
    return {"entailment": count(n), "contradiction": count(wrong), "neutral": neutral}
  subject, target = objects[relation["subject"]], objects[relation["object"]]
  predicate = relation["predicate"]
  return {"entailment": f"the {_name(subject)} is {predicate} the {_name(target)}",
          "contradiction": (f"the {_name(_changed(subject, objects, rng))} is {predicate} the "
                            f"{_name(target)}"),
          "neutral": neutral}


def _snli_ve_units(config: DemoTaskConfig, split: str, num: int, save):
  """Entries of the SNLI-VE demo: three hypotheses per scene, one per label."""
  entries = []
  for index in range(num // 3):
    rng = _rng(config, "snli_ve", split, index)
    image, scene, _ = demo_data.generate_scene(rng, config.image_size)
    path = save(f"images/{split}_{index:05d}.png", image)
    hypotheses = _snli_ve_hypotheses(scene, rng)
    for label in ("entailment", "neutral", "contradiction"):
      entries.append({"image": path, "sentence": hypotheses[label], "label": label,
                      "kwords": _kwords(config, "snli_ve", split, index, scene["objects"])})
  return entries


# ----------------------------------------------------------------------------- RefCOCO+

_REFCOCO_TEST_SPLITS = ("val", "testA", "testB")  # testA: attributes, testB: relations
_EXPRESSIONS_PER_IMAGE = 2


def _attribute_expressions(objects, k: int) -> list[str]:
  obj = objects[k]
  expressions = [f"the {_name(obj)}", f"the {_name(obj, True)}"]
  for attribute, text in (("color", f"the {obj['color']} shape"), ("shape", f"the {obj['shape']}"),
                          ("size", f"the {obj['size']} shape")):
    if obj in _unique(objects, attribute):
      expressions.append(text)
  return expressions


def _relation_expressions(objects, k: int) -> list[str]:
  """"the shape <relation> the <colour> <shape>" for each anchor that singles out object k."""
  expressions = []
  for j, anchor in enumerate(objects):
    if j == k:
      continue
    relation = demo_data._relation_between(objects[k]["bbox"], anchor["bbox"])
    others = [m for m in range(len(objects)) if m not in (j, k)]
    if relation and all(demo_data._relation_between(objects[m]["bbox"], anchor["bbox"])
                        != relation for m in others):
      expressions.append(f"the shape {relation} the {_name(anchor)}")
  return expressions


def _xywh(bbox, size: int) -> list[float]:
  """Normalised (ymin, xmin, ymax, xmax) -> pixel [x, y, width, height]."""
  ymin, xmin, ymax, xmax = (v * size for v in bbox)
  return [round(xmin, 2), round(ymin, 2), round(xmax - xmin, 2), round(ymax - ymin, 2)]


def iou_xywh(a, b) -> float:
  """Intersection over union of two [x, y, w, h] boxes."""
  width = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
  height = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
  inter = width * height
  return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _proposals(boxes: list[list[float]], target: int, size: int, rng) -> list[list[float]]:
  """Every object's box, a box shifted 60% off the target (IoU 0.25 with it) and two random
  boxes, all distractors with IoU < 0.5 against every object; in random order."""
  x, y, w, h = boxes[target]
  shift = _pick(rng, ((0.6 * w, 0), (-0.6 * w, 0), (0, 0.6 * h), (0, -0.6 * h)))
  candidates = [[x + shift[0], y + shift[1], w, h]]
  for _ in range(20):
    side = rng.uniform(0.15, 0.4) * size
    candidates.append([*rng.uniform(0, size - side, size=2), side, side])
  distractors = []
  for box in candidates:
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    box = [x0, y0, min(box[0] + box[2], size) - x0, min(box[1] + box[3], size) - y0]
    if (box[2] > 1 and box[3] > 1 and len(distractors) < 3
        and all(iou_xywh(box, b) < 0.5 for b in boxes + distractors)):
      distractors.append([round(v, 2) for v in box])
  proposals = boxes + distractors
  return [proposals[k] for k in rng.permutation(len(proposals))]


def _scene_with_objects(rng, image_size: int, minimum: int):
  while True:
    image, scene, _ = demo_data.generate_scene(rng, image_size)
    if len(scene["objects"]) >= minimum:
      return image, scene


def _refcoco_units(config: DemoTaskConfig, split: str, num: int, save):
  """Entries of the grounding demo: up to two expressions (distinct targets) per scene."""
  entries, index = [], 0
  while len(entries) < num:
    rng = _rng(config, "refcoco", split, index)
    test_split = _REFCOCO_TEST_SPLITS[index % 3]
    image, scene = _scene_with_objects(rng, config.image_size, 2)
    objects = scene["objects"]
    choices = []
    for k in range(len(objects)):
      attributes, relations = _attribute_expressions(objects, k), _relation_expressions(objects, k)
      if split == "test" and test_split != "val":
        options = attributes if test_split == "testA" else relations
      else:
        options = relations if relations and rng.random() < 0.5 else attributes
      if options:
        choices.append((k, _pick(rng, options)))
    if not choices:
      index += 1
      continue
    path = save(f"images/{split}_{index:05d}.png", image)
    boxes = [_xywh(o["bbox"], config.image_size) for o in objects]
    for c in rng.permutation(len(choices))[:_EXPRESSIONS_PER_IMAGE]:
      k, text = choices[c]
      entry = {"image": path, "text": text, "kwords": _kwords(config, "refcoco", split, index, objects)}
      if split == "test":
        entry.update(ref_id=len(entries), bbox=boxes[k], split=test_split,
                     proposals=_proposals(boxes, k, config.image_size, rng))
      entries.append(entry)
    index += 1
  return entries[:num]


def _refcoco_chance(test) -> dict:
  """Per test split: the expected accuracy of a uniformly random proposal."""
  out = {}
  for split in _REFCOCO_TEST_SPLITS:
    rows = [e for e in test if e["split"] == split]
    hits = [np.mean([iou_xywh(p, e["bbox"]) >= 0.5 for p in e["proposals"]]) for e in rows]
    out[split] = float(np.mean(hits)) if hits else 0.0
  return out


# ----------------------------------------------------------------------------- building


def _rng(config: DemoTaskConfig, task: str, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([config.seed, _TASK_STREAMS[task], _SPLIT_STREAMS[split], index])


def _kwords(config: DemoTaskConfig, task: str, split: str, index: int, objects, slot: int = 0) -> list[str]:
  """The scene's stand-in concept words (ViCHA's `kwords`), from a generator of their own."""
  rng = np.random.default_rng([config.seed, _TASK_STREAMS[task], _SPLIT_STREAMS[split], index, 1000 + slot])
  return concepts.demo_kwords([o["shape"] for o in objects], [o["color"] for o in objects], rng)


_UNITS = {"vqa": _vqa_units, "nlvr2": _nlvr2_units, "snli_ve": _snli_ve_units,
          "refcoco": _refcoco_units}


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write("\n")


def generate_task(task: str, config: DemoTaskConfig, directory: str) -> dict:
  """Writes the task's images, `train.json`, `test.json` (and `answer_list.json` for VQA) and
  finally `manifest.json` into `directory`; returns the manifest."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)

  def save(relative_path: str, image: np.ndarray) -> str:
    Image.fromarray(image).save(os.path.join(directory, relative_path), format="PNG")
    return relative_path

  splits = {split: _UNITS[task](config, split, num, save)
            for split, num in (("train", config.num_train), ("test", config.num_test))}
  for split, entries in splits.items():
    _write_json(annotation_file(directory, split), entries)
  chance = {"vqa": lambda: _vqa_chance(splits["train"], splits["test"]),
            "nlvr2": lambda: {"accuracy": 0.5},
            "snli_ve": lambda: {"accuracy": 1 / 3, "hypothesis_only": 2 / 3},
            "refcoco": lambda: _refcoco_chance(splits["test"])}[task]()
  if task == "vqa":
    answers = {a for entries in splits.values() for e in entries
               for a in ([e["answer"]] if isinstance(e["answer"], str) else e["answer"])}
    _write_json(answer_list_file(directory), sorted(answers))
  manifest = {"task": task, "version": VERSION, "config": dataclasses.asdict(config),
              "num_examples": {split: len(entries) for split, entries in splits.items()},
              "chance": chance}
  _write_json(os.path.join(directory, MANIFEST), manifest)
  return manifest


def annotation_file(directory: str, split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"demo task data {directory} has splits {SPLITS}, not {split!r}")
  return os.path.join(directory, f"{split}.json")


def answer_list_file(directory: str) -> str:
  return os.path.join(directory, ANSWER_LIST)


def read_manifest(directory: str) -> dict | None:
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _is_built(directory: str, task: str, config: DemoTaskConfig) -> bool:
  manifest = read_manifest(directory)
  return (manifest is not None and manifest["task"] == task and manifest["version"] == VERSION
          and manifest["config"] == dataclasses.asdict(config))


def build_demo_task(task: str, config: str | DemoTaskConfig = "default",
                    root: str | None = None) -> str:
  """The folder of the task demo, generated first if it is missing or outdated.

  Args:
    task: one of `TASKS`.
    config: a config name (`default`, `tiny`) or a `DemoTaskConfig`.
    root: parent folder; default `$VLPJAX_DEMO_DIR`, else `~/.cache/vlpjax/demo_tasks`.

  Returns:
    `root/<task>-<config name>`, holding `train.json`, `test.json`, `images/`,
    `manifest.json` (sizes, chance levels) and, for VQA, `answer_list.json`.
  """
  if task not in TASKS:
    raise ValueError(f"no demo for task {task!r}; known: {TASKS}")
  if isinstance(config, str):
    if config not in CONFIGS:
      raise ValueError(f"demo tasks have no config {config!r}; known: {sorted(CONFIGS)}")
    config = CONFIGS[config]
  root = os.path.expanduser(root or os.environ.get("VLPJAX_DEMO_DIR") or DEFAULT_ROOT)
  name = f"{task}-{config.name}"
  directory = os.path.join(root, name)
  if _is_built(directory, task, config):
    return directory
  with demo_data.build_lock(root, name):
    # Another process may have built it while this one waited for the lock: look again.
    if not _is_built(directory, task, config):
      staging = f"{directory}.tmp-{os.getpid()}"
      shutil.rmtree(staging, ignore_errors=True)
      generate_task(task, config, staging)
      shutil.rmtree(directory, ignore_errors=True)
      os.rename(staging, directory)
  return directory
