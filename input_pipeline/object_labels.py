"""Object labels per image from dataset annotations, for MVP's object tags and VLMixer's concepts.

Readers (plain JSON, no images read):
  * COCO instances (`instances_train2014.json`): `images` (id, file_name), `categories` (id, name),
    `annotations` (image_id, category_id), one annotation per object instance.
  * Visual Genome `objects.json`: a list of {image_id, objects: [{names: [str, ...], ...}]}; VG
    image files are named `<image_id>.jpg`.
  * The embedded demo set (`demo_data`): scenes with objects (shape, colour, size), read without
    rendering the images.

Images are keyed by the base name of their file ("COCO_train2014_000000000009.jpg", "1.jpg"), which
is what an ALBEF-style annotation entry's `image` path ends with (`image_key`).
"""
import collections
import os

import numpy as np

from input_pipeline import words as words_lib


def image_key(path: str) -> str:
  """The base name of an image path: how entries are matched to COCO / VG labels."""
  return os.path.basename(str(path).rstrip("/"))


def _need(record, key: str, path: str, where: str):
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f"{path}: {where} has no {key!r} field")
  return record[key]


def _clean_name(name) -> str:
  return " ".join(str(name).lower().split())


def read_coco_instances(path: str):
  """Object labels of a COCO instances file.

  Returns:
    labels: {image file base name: [category name per instance, in annotation order]}; images
      without instances map to [].
    counts: collections.Counter {category name: instances}; every category appears (0 when it has
      no instance in this file).
  """
  data = words_lib.read_json(path, "COCO instances")
  for key in ("images", "categories", "annotations"):
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
      raise ValueError(f"{path}: a COCO instances file needs a {key!r} list")
  names = {}
  for k, c in enumerate(data["categories"]):
    names[_need(c, "id", path, f"categories[{k}]")] = _clean_name(
        _need(c, "name", path, f"categories[{k}]"))
  files = {}
  labels = {}
  for k, im in enumerate(data["images"]):
    key = image_key(_need(im, "file_name", path, f"images[{k}]"))
    files[_need(im, "id", path, f"images[{k}]")] = key
    labels[key] = []
  counts = collections.Counter({n: 0 for n in names.values()})
  for k, a in enumerate(data["annotations"]):
    image_id = _need(a, "image_id", path, f"annotations[{k}]")
    category = _need(a, "category_id", path, f"annotations[{k}]")
    if category not in names:
      raise ValueError(f"{path}: annotations[{k}] has category_id {category} not in categories")
    if image_id not in files:
      raise ValueError(f"{path}: annotations[{k}] has image_id {image_id} not in images")
    labels[files[image_id]].append(names[category])
    counts[names[category]] += 1
  return labels, counts


def read_vg_objects(path: str):
  """Object names of a Visual Genome `objects.json`.

  An object lists one or more names; each counts (lower-cased, whitespace collapsed).

  Returns:
    labels: {"<image_id>.jpg": [names, in object order]}.
    counts: collections.Counter {name: occurrences}.
  """
  data = words_lib.read_json(path, "Visual Genome objects")
  if not isinstance(data, list):
    raise ValueError(f"{path}: a Visual Genome objects file is a list of images")
  labels, counts = {}, collections.Counter()
  for k, im in enumerate(data):
    image_id = _need(im, "image_id", path, f"entry {k}")
    names = []
    for j, obj in enumerate(_need(im, "objects", path, f"entry {k}")):
      obj_names = _need(obj, "names", path, f"entry {k} objects[{j}]")
      if isinstance(obj_names, str):
        obj_names = [obj_names]
      names.extend(n for n in map(_clean_name, obj_names) if n)
    labels[f"{image_id}.jpg"] = names
    counts.update(names)
  return labels, counts


def demo_scenes(split: str = "train", config: str = "default"):
  """The scenes and captions of a demo split, exactly as the TFDS builder makes them, without
  rendering images.

  Yields:
    (image_id, scene, captions): scene = {"objects": [{shape, color, size, bbox}], "relation"}.
  """
  from input_pipeline import demo_data  # pylint: disable=import-outside-toplevel  (imports TF)
  configs = {c.name: c for c in demo_data.VlpjaxDemo.BUILDER_CONFIGS}
  if config not in configs:
    raise ValueError(f"vlpjax_demo has no config {config!r}; known: {sorted(configs)}")
  if split not in ("train", "test"):
    raise ValueError(f"demo split must be 'train' or 'test', got {split!r}")
  c = configs[config]
  num, first = (c.num_train, 0) if split == "train" else (c.num_test, c.num_train)
  # The builder's generator per example; generate_scene draws the layout and the captions
  # before it renders, so stopping there gives the same scene and captions.
  # pylint: disable=protected-access
  stream = demo_data._SPLIT_STREAMS[split]
  for index in range(num):
    rng = np.random.default_rng([c.seed, stream, index])
    objects, relation = demo_data._sample_layout(rng, c.image_size)
    captions = demo_data._describe(objects, relation, rng)
    yield first + index, demo_data._scene_dict(objects, relation, c.image_size), captions
