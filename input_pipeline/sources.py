"""Data sources: TFDS datasets (incl. the embedded demo set), ALBEF/ViCHA JSON + image folder,
TFRecord shards written by `input_pipeline.convert`, and weighted mixtures of them.

Every source yields the common example dict:

  image       tf.string   encoded image bytes
  image_id    tf.int64    []
  captions    tf.string   [None]   (empty and non-UTF-8 captions removed)
  concepts    tf.string   [None]   optional (ViCHA `kwords`, demo object names)
  objects/label tf.string [None], objects/bbox tf.float32 [None, 4]   optional
  _valid      tf.bool     []       False when no usable caption is left

A `Source` keeps cheap *records* (paths, serialized protos) apart from `read`, which turns a
record into the common dict. The batch builder shuffles, positions and skips records before
reading them, so resuming and shuffling never read image bytes they do not use.

Each source reads only its process's part of the data (`process_index` of `process_count`):
TFDS by even splits, JSON by entries `i::n`, TFRecord by files `i::n` (records `i::n` when
there are fewer files than processes). A source whose part is empty fails at construction
with a message naming it.
"""
import collections
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

AUTOTUNE = tf.data.AUTOTUNE
MANIFEST_NAME = "manifest.json"

# TFDS feature paths of the common fields for datasets we know ('a/b' is nested).
KNOWN_FIELD_MAPS = {
    "coco_captions": {"image": "image", "image_id": "image/id", "captions": "captions/text"},
}


@dataclasses.dataclass
class Source:
  """One input source of this process.

  Attributes:
    name: names the source in messages and statistics.
    records: one pass over this process's cheap records, in a fixed order.
    read: record -> common example dict (TF ops; reads files for JSON sources).
    num_examples: records in this process's part, when known.
    skipped: examples dropped while the annotations were read, by reason.
    full_shuffle: records are small enough to permute a whole epoch at once.
  """
  name: str
  records: tf.data.Dataset
  read: Callable[[Any], dict]
  num_examples: int | None = None
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  full_shuffle: bool = False

  def examples(self) -> tf.data.Dataset:
    """One ordered pass of common example dicts."""
    return self.records.map(self.read, num_parallel_calls=AUTOTUNE, deterministic=True)

  def stream(self, *, seed: int, shuffle_buffer: int) -> tf.data.Dataset:
    """Infinite, deterministically shuffled records: a function of `seed` alone.

    Small records (JSON) are permuted a whole epoch at a time, a fresh permutation per
    epoch; others repeat and go through a `shuffle_buffer`-sized buffer.
    """
    if self.full_shuffle and self.num_examples:
      return self.records.shuffle(self.num_examples, seed=seed,
                                  reshuffle_each_iteration=True).repeat()
    records = self.records.repeat()
    if shuffle_buffer > 1:
      records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return records


def sanitize_captions(example: dict) -> dict:
  """Drops empty (whitespace-only) and non-UTF-8 captions; `_valid` is False if none is left."""
  captions = example["captions"]
  well_formed = tf.equal(
      tf.strings.unicode_transcode(captions, "UTF-8", "UTF-8", errors="replace",
                                   replacement_char=0xFFFD), captions)
  non_empty = tf.strings.length(tf.strings.strip(captions)) > 0
  captions = tf.boolean_mask(captions, tf.logical_and(well_formed, non_empty))
  example["captions"] = captions
  example["_valid"] = tf.logical_and(example.get("_valid", True), tf.size(captions) > 0)
  return example


def _process_part(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index, count = process_index or 0, process_count or 1
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} outside [0, {count})")
  return index, count


# ----------------------------------------------------------------------------- TFDS


def _nested_get(example: Mapping, path: str):
  value = example
  for part in path.split("/"):
    value = value[part]
  return value


def _nested_dict(path: str, leaf) -> dict:
  parts = path.split("/")
  out = leaf
  for part in reversed(parts):
    out = {part: out}
  return out


def _feature_paths(features: Mapping, prefix: str = "") -> list[str]:
  """'a/b' paths of the leaves of a nested feature dict (`features.get_tensor_info()`)."""
  paths = []
  for key, value in features.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      paths.extend(_feature_paths(value, path + "/"))
    else:
      paths.append(path)
  return paths


def tfds_source(name: str | tfds.core.DatasetBuilder, split: str, *, data_dir: str | None = None,
                process_index: int | None = 0, process_count: int | None = 1,
                field_map: Mapping[str, str] | None = None) -> Source:
  """Any prepared TFDS dataset, mapped to the common dict by `field_map`.

  Args:
    name: dataset name (`coco_captions`, `my_set/config:1.0.0`) or a builder.
    split: TFDS split string; this process reads `tfds.even_splits(split, n)[i]`.
    field_map: common key -> feature path ('captions/text' is nested); required keys are
      `image` and `captions`; `image_id` defaults to a hash of the TFDS record id. Known
      datasets (`KNOWN_FIELD_MAPS`) need none.
  """
  builder = tfds.builder(name, data_dir=data_dir) if isinstance(name, str) else name
  label = f"tfds:{builder.info.full_name}[{split}]"
  field_map = dict(field_map or KNOWN_FIELD_MAPS.get(builder.name) or {})
  known_paths = sorted(_feature_paths(builder.info.features.get_tensor_info()))
  for required in ("image", "captions"):
    if required not in field_map:
      raise ValueError(f"{label}: field_map needs {required!r} (common key -> feature path); "
                       f"the dataset has features {known_paths}")
  for key, path in field_map.items():
    if path not in known_paths:
      raise ValueError(f"{label}: field_map[{key!r}] = {path!r} is not a feature; features: "
                       f"{known_paths}")
  index, count = _process_part(process_index, process_count)
  part = tfds.even_splits(split, n=count)[index]
  num_examples = builder.info.splits[part].num_examples
  if num_examples == 0:
    raise ValueError(f"{label}: process {index} of {count} has no examples")
  records = builder.as_dataset(
      split=part, shuffle_files=False,
      decoders=_nested_dict(field_map["image"], tfds.decode.SkipDecoding()),
      read_config=tfds.ReadConfig(add_tfds_id="image_id" not in field_map, try_autocache=False))

  def read(record):
    example = {key: _nested_get(record, path) for key, path in field_map.items()}
    if "image_id" in field_map:
      example["image_id"] = tf.cast(example["image_id"], tf.int64)
    else:
      example["image_id"] = tf.strings.to_hash_bucket_fast(record["tfds_id"], 2**31 - 1)
    return sanitize_captions(example)

  return Source(label, records, read, num_examples)


def demo_source(split: str = "train", *, data_dir: str | None = None, config: str = "default",
                process_index: int | None = 0, process_count: int | None = 1) -> Source:
  """The embedded `vlpjax_demo` set (built locally on first use), as common dicts."""
  from input_pipeline import demo_data  # imports the TFDS builder class only when used

  builder = demo_data.build_demo(data_dir, config)
  index, count = _process_part(process_index, process_count)
  part = tfds.even_splits(split, n=count)[index]
  label = f"demo:{config}[{split}]"
  num_examples = builder.info.splits[part].num_examples
  if num_examples == 0:
    raise ValueError(f"{label}: process {index} of {count} has no examples")
  records = demo_data.load_demo(part, data_dir=data_dir, config=config)
  return Source(label, records, sanitize_captions, num_examples)


# ----------------------------------------------------------------------------- JSON


@dataclasses.dataclass
class JsonRecords:
  """Entries of ALBEF/ViCHA annotation files that point at readable images.

  Attributes:
    paths: image file paths.
    captions: per entry, its usable captions (at least one).
    image_ids: per entry, a stable int id (see `load_json_annotations`).
    concepts: per entry, its `kwords` list, or None when no entry has one.
    skipped: dropped entries by reason (`missing_image`, `unreadable_image`,
      `empty_caption`, `bad_utf8_caption`); `dropped_captions` counts single captions
      removed from entries that were kept.
    skipped_entries: (file, entry index, image, reason) of the first dropped entries.
    origins: per kept entry, (annotation file, entry index).
  """
  paths: list[str]
  captions: list[list[str]]
  image_ids: list[int]
  concepts: list[list[str]] | None
  skipped: collections.Counter
  skipped_entries: list[tuple[str, int, str, str]]
  origins: list[tuple[str, int]]


_MAX_LISTED_SKIPS = 100


def _is_text(value) -> bool:
  return isinstance(value, str)


def _is_text_list(value) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_answer_list(path: str) -> list[str]:
  """A VQA answer list: a JSON list of non-empty strings (the classifier / ranking vocabulary)."""
  answers = _read_json(path)
  if not isinstance(answers, list):
    raise ValueError(f"answer list {path} must hold a JSON list of strings")
  bad = [i for i, a in enumerate(answers) if not isinstance(a, str) or not a.strip()]
  if bad:
    raise ValueError(f"answer list {path}: entry {bad[0]} is not a non-empty string")
  return list(answers)


def _read_json(path: str):
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"annotations {path}: cannot read: {e}") from e
  # Bytes that are not UTF-8 become lone surrogates: the captions holding them are dropped
  # and counted below instead of failing the whole file.
  text = raw.decode("utf-8", errors="surrogateescape")
  try:
    entries = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"annotations {path}: not valid JSON: {e}") from e
  if not isinstance(entries, list):
    raise ValueError(f"annotations {path}: expected a JSON list of entries, got "
                     f"{type(entries).__name__}")
  return entries


def _validate_entry(path: str, index: int, entry) -> None:
  """Raises ValueError naming the file, entry and field for structurally bad entries."""
  where = f"annotations {path}: entry {index}"
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
  if not _is_text(entry.get("image")) or not entry["image"]:
    raise ValueError(f"{where}: field 'image' must be a non-empty string (got "
                     f"{entry.get('image')!r})")
  caption_fields = [k for k in ("caption", "captions") if k in entry]
  if not caption_fields:
    raise ValueError(f"{where}: needs a field 'caption' (a string or a list of strings)")
  for field in caption_fields:
    value = entry[field]
    if not (_is_text(value) or _is_text_list(value)) or value == []:
      raise ValueError(f"{where}: field {field!r} must be a string or a non-empty list of "
                       f"strings, got {value!r:.80}")
  if "kwords" in entry and not _is_text_list(entry["kwords"]):
    raise ValueError(f"{where}: field 'kwords' must be a list of strings")
  image_id = entry.get("image_id")
  if image_id is not None and (isinstance(image_id, bool) or
                               not isinstance(image_id, (int, str))):
    raise ValueError(f"{where}: field 'image_id' must be an int or a string, got {image_id!r}")


def _is_utf8(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _assign_image_ids(keys: list, all_ints: bool) -> list[int]:
  """Given int ids are kept; otherwise each distinct key gets its rank in sorted order."""
  if all_ints:
    return [int(k) for k in keys]
  rank = {key: i for i, key in enumerate(sorted(set(map(str, keys))))}
  return [rank[str(k)] for k in keys]


def load_json_annotations(annotations: str | Sequence[str], image_root: str = "", *,
                          path_strip: int = 0, check_files: bool = True) -> JsonRecords:
  """Reads ALBEF/ViCHA annotation files: a JSON list of {image, caption | [captions],
  image_id?, kwords?} per file.

  Image paths are `image_root/image` after dropping the first `path_strip` components
  (ViCHA's JSONs hold absolute paths of the authors' machine). Image ids: if every entry
  has an int `image_id` those are used; otherwise each distinct `image_id` string (or image
  path, when absent) gets its rank among the sorted distinct keys, so the ids are stable
  under reordering and do not depend on which files are present.

  Structural errors (bad JSON, wrong types, missing fields) raise ValueError naming the file
  and entry index; data problems (missing or unreadable image files, empty or non-UTF-8
  captions) drop the entry and are counted in `skipped`.
  """
  files = [annotations] if isinstance(annotations, str) else list(annotations)
  if not files:
    raise ValueError("json source: no annotation files given")
  entries = []
  for path in files:
    for index, entry in enumerate(_read_json(path)):
      _validate_entry(path, index, entry)
      entries.append((path, index, entry))
  all_ints = all(isinstance(e.get("image_id"), int) for _, _, e in entries)
  ids = _assign_image_ids(
      [e["image_id"] if e.get("image_id") is not None else e["image"] for _, _, e in entries],
      all_ints)
  with_concepts = any("kwords" in e for _, _, e in entries)
  out = JsonRecords([], [], [], [] if with_concepts else None, collections.Counter(), [], [])

  def skip(path, index, image, reason):
    out.skipped[reason] += 1
    if len(out.skipped_entries) < _MAX_LISTED_SKIPS:
      out.skipped_entries.append((path, index, image, reason))

  for (path, index, entry), image_id in zip(entries, ids):
    image = entry["image"]
    if path_strip:
      image = os.path.join(*image.split("/")[path_strip:])
    image_path = os.path.join(image_root, image)
    raw = entry.get("caption", entry.get("captions"))
    raw = [raw] if isinstance(raw, str) else raw
    utf8 = [c for c in raw if _is_utf8(c)]
    captions = [c for c in utf8 if c.strip()]
    if not captions:
      skip(path, index, image, "bad_utf8_caption" if not utf8 else "empty_caption")
      continue
    if check_files and not os.path.isfile(image_path):
      skip(path, index, image, "missing_image")
      continue
    if check_files and not os.access(image_path, os.R_OK):
      skip(path, index, image, "unreadable_image")
      continue
    out.skipped["dropped_captions"] += len(raw) - len(captions)
    out.paths.append(image_path)
    out.origins.append((path, index))
    out.captions.append(captions)
    out.image_ids.append(image_id)
    if with_concepts:
      out.concepts.append([k for k in entry.get("kwords", []) if _is_utf8(k)])
  if not out.skipped["dropped_captions"]:
    del out.skipped["dropped_captions"]
  return out


def _ragged_columns(lists: list[list[str]]):
  """(flat tf.string [total], starts int64 [n], lengths int64 [n]) of a list of lists."""
  lengths = [len(x) for x in lists]
  starts, total = [], 0
  for n in lengths:
    starts.append(total)
    total += n
  flat = [s for x in lists for s in x]
  return (tf.constant(flat, tf.string, shape=[len(flat)]), tf.constant(starts, tf.int64),
          tf.constant(lengths, tf.int64))


def _rows(flat, starts, lengths, index):
  return flat[starts[index]:starts[index] + lengths[index]]


def json_source(annotations: str | Sequence[str], image_root: str = "", *,
                process_index: int | None = 0, process_count: int | None = 1,
                path_strip: int = 0, check_files: bool = True) -> Source:
  """ALBEF/ViCHA JSON annotations + an image folder (see `load_json_annotations`).

  Records are entry indices (a whole epoch is permuted at once); `read` loads the file.
  A file that disappears or becomes unreadable after the start raises inside the pipeline,
  where the builder drops and counts it.
  """
  files = [annotations] if isinstance(annotations, str) else list(annotations)
  label = "json:" + ",".join(files)
  loaded = load_json_annotations(files, image_root, path_strip=path_strip,
                                 check_files=check_files)
  index, count = _process_part(process_index, process_count)
  if not loaded.paths:
    raise ValueError(f"{label}: no usable entries (skipped: {dict(loaded.skipped)}; first: "
                     f"{loaded.skipped_entries[:5]})")
  part = range(index, len(loaded.paths), count)
  if not part:
    raise ValueError(f"{label}: process {index} of {count} has no entries "
                     f"({len(loaded.paths)} in all)")
  paths = tf.constant([loaded.paths[i] for i in part])
  image_ids = tf.constant([loaded.image_ids[i] for i in part], tf.int64)
  captions = _ragged_columns([loaded.captions[i] for i in part])
  concepts = (_ragged_columns([loaded.concepts[i] for i in part])
              if loaded.concepts is not None else None)

  def read(record):
    i = record
    example = {"image": tf.io.read_file(paths[i]), "image_id": image_ids[i],
               "captions": _rows(*captions, i)}
    if concepts is not None:
      example["concepts"] = _rows(*concepts, i)
    return sanitize_captions(example)

  records = tf.data.Dataset.range(len(part))
  return Source(label, records, read, len(part), dict(loaded.skipped), full_shuffle=True)


# ----------------------------------------------------------------------------- TFRecord

# Features of the tf.train.Example records written by `input_pipeline.convert`.
REQUIRED_FEATURES = ("image", "image_id", "captions")
OPTIONAL_FEATURES = ("concepts", "objects/label", "objects/bbox")


def example_features(fields: Sequence[str]) -> dict:
  """tf.io parsing spec for the given common fields."""
  spec = {
      "image": tf.io.FixedLenFeature([], tf.string),
      "image_id": tf.io.FixedLenFeature([], tf.int64),
      "captions": tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
      "concepts": tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
      "objects/label": tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
      "objects/bbox": tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
  }
  return {k: spec[k] for k in fields}


def read_manifest(directory: str) -> dict | None:
  path = os.path.join(directory, MANIFEST_NAME)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def tfrecord_source(pattern: str, *, process_index: int | None = 0,
                    process_count: int | None = 1, cycle_length: int = 16) -> Source:
  """TFRecord shards of tf.train.Example with the common fields (`input_pipeline.convert`).

  The optional fields present are taken from the shards' `manifest.json` when there is one,
  otherwise all optional fields are parsed (empty when absent).
  """
  label = f"tfrecord:{pattern}"
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise ValueError(f"{label}: no files match")
  manifest = read_manifest(os.path.dirname(files[0]))
  fields = list(REQUIRED_FEATURES) + [
      f for f in OPTIONAL_FEATURES if manifest is None or f in manifest.get("fields", [])]
  index, count = _process_part(process_index, process_count)
  shard_records = len(files) < count
  mine = files if shard_records else files[index::count]
  num_examples = None
  if manifest is not None and not shard_records:
    per_file = {os.path.basename(s["file"]): s["num_examples"] for s in manifest["shards"]}
    if all(os.path.basename(f) in per_file for f in mine):
      num_examples = sum(per_file[os.path.basename(f)] for f in mine)
      if num_examples == 0:
        raise ValueError(f"{label}: process {index} of {count} has no examples (manifest)")
  records = tf.data.Dataset.from_tensor_slices(mine).interleave(
      tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(mine)), block_length=1,
      num_parallel_calls=AUTOTUNE, deterministic=True)
  if shard_records:
    records = records.shard(count, index)
  spec = example_features(fields)

  def read(record):
    example = tf.io.parse_single_example(record, spec)
    if "objects/bbox" in example:
      example["objects/bbox"] = tf.reshape(example["objects/bbox"], [-1, 4])
    return sanitize_captions(example)

  return Source(label, records, read, num_examples)


# ----------------------------------------------------------------------------- mixtures


def _fill_missing(example: dict, specs: dict) -> dict:
  """Adds the optional fields another source of a mixture has, empty."""
  for key, spec in specs.items():
    if key not in example:
      example[key] = tf.zeros([0 if d is None else d for d in spec.shape], spec.dtype)
  return example


@dataclasses.dataclass
class MixtureSource(Source):
  """A weighted mixture; `records` are read examples, so `read` is the identity."""
  parts: Sequence[Source] = ()
  weights: Sequence[float] = ()
  field_specs: dict = dataclasses.field(default_factory=dict)

  def stream(self, *, seed: int, shuffle_buffer: int) -> tf.data.Dataset:
    """Each part repeats and is shuffled on its own (seed + k), then parts are sampled."""
    streams = [
        part.stream(seed=seed + k, shuffle_buffer=shuffle_buffer)
        .map(part.read, num_parallel_calls=AUTOTUNE, deterministic=True)
        .map(lambda e: _fill_missing(e, self.field_specs))
        for k, part in enumerate(self.parts)]
    return tf.data.Dataset.sample_from_datasets(streams, list(self.weights), seed=seed,
                                                stop_on_empty_dataset=False)


def mixture(sources: Sequence[Source], weights: Sequence[float], *, seed: int = 0) -> Source:
  """Samples examples from `sources` with probabilities proportional to `weights`.

  The draw uses a fixed seed (`seed` for `examples()`, the run seed for `stream`).
  Optional fields that only some sources have are added empty to the others, so all
  share one structure.
  """
  if len(sources) != len(weights) or not sources:
    raise ValueError(f"mixture: {len(sources)} sources but {len(weights)} weights")
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"mixture: weights must be >= 0 with a positive sum, got {weights}")
  label = "mixture(" + ", ".join(f"{s.name}:{w:g}" for s, w in zip(sources, weights)) + ")"
  weights = [w / float(sum(weights)) for w in weights]
  specs = {}
  for s in sources:
    specs.update(s.examples().element_spec)
  one_pass = tf.data.Dataset.sample_from_datasets(
      [s.examples().map(lambda e: _fill_missing(e, specs)) for s in sources], weights,
      seed=seed, stop_on_empty_dataset=False)
  skipped = collections.Counter()
  for s in sources:
    skipped.update(s.skipped)
  num = None if any(s.num_examples is None for s in sources) else sum(
      s.num_examples for s in sources)
  return MixtureSource(label, one_pass, lambda e: e, num, dict(skipped), parts=tuple(sources),
                       weights=tuple(weights), field_specs=specs)
