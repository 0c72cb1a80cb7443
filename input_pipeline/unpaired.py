"""Unpaired input formats (VLMixer): `text_only` (sentences, no image read) and `image_only`
(images with object labels and boxes, no caption read). A run reads both as two input streams
(`config.input.streams`, `vlpjax.data`), one batch of each per step.

text_only
  Sources (`config.input.source`):
    json      ALBEF-style entries {caption: str | [str], image_id?, image?}; the image is never
              opened (nor checked). The `grounded_words annotate` output is such a file.
    demo      the embedded demo set's captions (`split`, e.g. 'train[:50%]'), read from the
              annotation cache built beside the demo data (no image is read or even rendered).
    tfrecord, tfds, mixture   as the caption format reads them (their records are read whole;
              the image bytes are never decoded).
  Grounded words come from an offline annotation (`config.input.grounding`: the output of
  `python -m input_pipeline.grounded_words annotate`; '' = the json source's own files, or the
  demo's cache), looked up per cleaned caption by the `ground_words` op (`input_pipeline.ops_mix`).
  Fields after the ops: text_ids, text_mask [L], span_start, span_end, span_concept [K]
  (`ground_words`), image_id (the caption's own image, for the pairing checks); the batch op
  `cmc` adds the mixed sequence (see `ops_mix`).

image_only
  Sources: demo (the demo set's `split`, e.g. 'train[50%:]'; labels from
  `config.input.object_label_field`: 'concepts' = "red circle", 'objects/label' = "circle"),
  json (entries {image, image_id?, objects: [{label, bbox: [ymin, xmin, ymax, xmax] in [0, 1]}]}
  + `image_root`), tfrecord / tfds (fields objects/label, objects/bbox; TFDS through
  `field_map`). Captions are never read.
  Fields after the ops: image, image_id, object_boxes [M, 4], object_concepts [M] (-1 = none;
  `object_tags`), tag_ids, tag_mask, tag_mlm_ids, tag_mlm_labels [T].

Concepts (`config.input.concept_vocab`): the `grounded_words` vocabulary JSON; its `label_to_id`
maps an image corpus label to a concept, `name_to_id` a caption's words. The demo's vocabulary
and caption annotations are built once beside the demo data (`grounding.demo_annotations`), with the
`rules` normaliser (no spaCy), colour-shape pairs and shape synonyms as aliases.

The demo feeds both streams from the one paired demo set with its pairing broken: captions from
the first half of the training scenes, images from the second half (`configs/vlmixer.py`).
"""
import json
import os
import types

import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import caption
from input_pipeline import config_fields
from input_pipeline import formats
from input_pipeline import grounding
from input_pipeline import sources

TEXT_SOURCE_KINDS = ("demo", "json", "tfrecord", "tfds", "mixture")
IMAGE_SOURCE_KINDS = ("demo", "json", "tfrecord", "tfds")
_get = config_fields.get

# Text ops: one cleaned caption, tokenized, its grounded spans as token spans; the batch op mixes.
TEXT_OPS = formats.TrainOps(
    pp=("choose_caption|clean_caption({caption_max_words})|tokenize({max_len})"
        "|ground_words({grounding!r}, demo_config={demo_config!r}, data_dir={data_dir!r}, "
        "max_words={caption_max_words}, max_spans={max_spans}, max_len={max_len})"),
    batch_pp="cmc({p_cmc}, entry_tokens={entry_tokens})|mask_tokens({mlm_prob}, key='mix')")
# Image ops: no geometric augmentation, so the boxes stay true; objects -> tags, masked.
IMAGE_OPS = formats.TrainOps(
    pp=("decode|resize({image_size})|normalize('clip')"
        "|object_tags({concept_vocab!r}, demo_config={demo_config!r}, data_dir={data_dir!r}, "
        "max_objects={max_objects}, label_field={object_label_field!r})"
        "|tokenize({max_tags}, key='tags', out='tag', append_sep=True)"
        "|mask_tokens({mlm_prob}, key='tag')"))


def resolve_paths(cfg) -> dict[str, str]:
  """`concept_vocab` and `grounding` of `cfg`; a json text source's grounding defaults to its own
  annotation files. '' elsewhere is left for the ops, where it names the demo's annotations
  (built on first use by `grounding.demo_annotations`, not while a config is validated); the
  sources of other kinds refuse '' when they are built."""
  kind = _get(cfg, "source")
  vocab, grounded = _get(cfg, "concept_vocab"), _get(cfg, "grounding")
  if kind == "json" and not grounded and _get(cfg, "format") == "text_only":
    grounded = ",".join(config_fields.as_list(_get(cfg, "annotations")))
  return {"concept_vocab": vocab, "grounding": grounded}


# ----------------------------------------------------------------------------- text-only sources


def _split_rows(split: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
  """(split name, from, to) slices of a TFDS split string such as 'train[:50%]+test'."""
  instruction = tfds.core.ReadInstruction.from_spec(split)
  infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}
  return [(a.splitname, a.from_, a.to) for a in instruction.to_absolute(infos)]


def _caption_source(label: str, captions: list[list[str]], image_ids: list[int],
                    process_index: int, process_count: int, skipped: dict | None = None
                    ) -> sources.Source:
  """A source of {captions, image_id} from in-memory lists; this process takes rows i::n."""
  part = range(process_index, len(captions), process_count)
  if not part:
    raise ValueError(f"{label}: process {process_index} of {process_count} has no entries "
                     f"({len(captions)} in all)")
  columns = sources._ragged_columns([captions[i] for i in part])  # pylint: disable=protected-access
  ids = tf.constant([image_ids[i] for i in part], tf.int64)

  def read(record):
    return sources.sanitize_captions(
        {"captions": sources._rows(*columns, record), "image_id": ids[record]})  # pylint: disable=protected-access

  return sources.Source(label, tf.data.Dataset.range(len(part)), read, len(part),
                        dict(skipped or {}), full_shuffle=True)


def _entry_captions(entry, where: str) -> list[str]:
  value = entry.get("caption", entry.get("captions")) if isinstance(entry, dict) else None
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
    raise ValueError(f"{where}: needs a field 'caption' (a string or a non-empty list of strings)")
  return value


def _json_text_source(files: list[str], split: str, process_index: int, process_count: int
                      ) -> sources.Source:
  """Captions of ALBEF-style entries; images are neither opened nor checked."""
  del split  # a json source reads its files whole
  captions, keys, all_ints = [], [], True
  skipped = {"empty_caption": 0}
  for path in files:
    for index, entry in enumerate(sources._read_json(path)):  # pylint: disable=protected-access
      kept = [c for c in _entry_captions(entry, f"annotations {path}: entry {index}") if c.strip()]
      if not kept:
        skipped["empty_caption"] += 1
        continue
      key = entry.get("image_id", entry.get("image", f"{path}:{index}"))
      all_ints &= isinstance(key, int) and not isinstance(key, bool)
      captions.append(kept)
      keys.append(key)
  if not captions:
    raise ValueError(f"json:{','.join(files)}: no entry with a caption")
  ids = sources._assign_image_ids(keys, all_ints)  # pylint: disable=protected-access
  return _caption_source("text_json:" + ",".join(files), captions, ids, process_index,
                         process_count, {k: v for k, v in skipped.items() if v})


def _demo_text_source(cfg, split: str, process_index: int, process_count: int) -> sources.Source:
  """The demo's captions of the scenes a TFDS `split` of the demo set holds (its file order, so
  'train[:50%]' here and 'train[50%:]' in an image stream are complementary), from the annotation
  cache: no image is read."""
  demo = grounding.demo_annotations(_get(cfg, "data_dir") or None, _get(cfg, "demo_config"))
  with open(demo["order"]) as f:
    order = json.load(f)
  by_id = {}
  for name in ("train", "test"):
    with open(demo[name]) as f:
      by_id.update({int(e["image_id"]): list(e["caption"]) for e in json.load(f)})
  ids = [i for name, start, stop in _split_rows(split, {k: len(v) for k, v in order.items()})
         for i in order[name][start:stop]]
  return _caption_source(f"text_demo:{_get(cfg, 'demo_config')}[{split}]", [by_id[i] for i in ids],
                         ids, process_index, process_count)


def make_text_source(cfg, *, split: str, process_index: int = 0, process_count: int = 1
                     ) -> sources.Source:
  """The text-only source of `cfg` for `split` (this process's part); see the module docstring."""
  kind = _get(cfg, "source")
  if kind not in ("demo", "json") and not _get(cfg, "grounding"):
    raise ValueError(f"config.input.grounding: a text_only {kind!r} source needs the grounded words of its "
                     "captions (`python -m input_pipeline.grounded_words annotate` output)")
  if kind == "demo":
    return _demo_text_source(cfg, split, process_index, process_count)
  if kind == "json":
    files = config_fields.as_list(config_fields.for_split(cfg, "annotations", split))
    return _json_text_source(files, split, process_index, process_count)
  if kind in TEXT_SOURCE_KINDS:
    return caption.make_source(cfg, split=split, process_index=process_index,
                               process_count=process_count)
  raise ValueError(f"config.input.source = {kind!r}; text_only reads {TEXT_SOURCE_KINDS}")


# ----------------------------------------------------------------------------- image-only sources


def _image_only(source: sources.Source) -> sources.Source:
  """`source` with its captions dropped and `_valid` reset (image-only records need none)."""

  def read(record):
    example = dict(source.read(record))
    example.pop("captions", None)
    example["_valid"] = tf.constant(True)
    return example

  return sources.Source(source.name, source.records, read, source.num_examples,
                        dict(source.skipped), source.full_shuffle)


def _json_image_source(files: list[str], image_root: str, process_index: int, process_count: int
                       ) -> sources.Source:
  """Entries {image, image_id?, objects: [{label, bbox}]}; entries whose file is missing are
  skipped and counted; bad structure raises naming the file, entry and field."""
  paths, keys, labels, boxes, all_ints = [], [], [], [], True
  skipped = {"missing_image": 0}
  for path in files:
    for index, entry in enumerate(sources._read_json(path)):  # pylint: disable=protected-access
      where = f"annotations {path}: entry {index}"
      if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise ValueError(f"{where}: needs a field 'image' (a string)")
      objects = entry.get("objects")
      if not isinstance(objects, list):
        raise ValueError(f"{where}: needs a field 'objects' (a list of {{label, bbox}})")
      entry_labels, entry_boxes = [], []
      for j, obj in enumerate(objects):
        label, bbox = (obj.get("label"), obj.get("bbox")) if isinstance(obj, dict) else (None, None)
        if not isinstance(label, str) or not (isinstance(bbox, list) and len(bbox) == 4):
          raise ValueError(f"{where}: objects[{j}] needs 'label' (a string) and 'bbox' "
                           f"([ymin, xmin, ymax, xmax] in [0, 1]), got {obj!r:.80}")
        entry_labels.append(label)
        entry_boxes.append([float(v) for v in bbox])
      image_path = os.path.join(image_root, entry["image"])
      if not os.path.isfile(image_path):
        skipped["missing_image"] += 1
        continue
      key = entry.get("image_id", entry["image"])
      all_ints &= isinstance(key, int) and not isinstance(key, bool)
      paths.append(image_path)
      keys.append(key)
      labels.append(entry_labels)
      boxes.append(entry_boxes)
  label = "image_json:" + ",".join(files)
  if not paths:
    raise ValueError(f"{label}: no usable entries (skipped: {skipped})")
  ids = sources._assign_image_ids(keys, all_ints)  # pylint: disable=protected-access
  part = list(range(process_index, len(paths), process_count))
  if not part:
    raise ValueError(f"{label}: process {process_index} of {process_count} has no entries")
  path_t = tf.constant([paths[i] for i in part])
  id_t = tf.constant([ids[i] for i in part], tf.int64)
  label_cols = sources._ragged_columns([labels[i] for i in part])  # pylint: disable=protected-access
  flat_boxes = [b for i in part for b in boxes[i]]
  box_t = tf.constant(flat_boxes, tf.float32, shape=[len(flat_boxes), 4])

  def read(record):
    flat, starts, lengths = label_cols
    return {"image": tf.io.read_file(path_t[record]), "image_id": id_t[record],
            "objects/label": sources._rows(flat, starts, lengths, record),  # pylint: disable=protected-access
            "objects/bbox": box_t[starts[record]:starts[record] + lengths[record]]}

  return sources.Source(label, tf.data.Dataset.range(len(part)), read, len(part),
                        {k: v for k, v in skipped.items() if v}, full_shuffle=True)


def make_image_source(cfg, *, split: str, process_index: int = 0, process_count: int = 1
                      ) -> sources.Source:
  """The image-only source of `cfg` for `split` (this process's part)."""
  kind = _get(cfg, "source")
  if kind != "demo" and not _get(cfg, "concept_vocab"):
    raise ValueError(f"config.input.concept_vocab: an image_only {kind!r} source needs the concept vocabulary "
                     "(`python -m input_pipeline.grounded_words vocab` output)")
  if kind == "json":
    files = config_fields.as_list(config_fields.for_split(cfg, "annotations", split))
    return _json_image_source(files, _get(cfg, "image_root"), process_index, process_count)
  if kind in ("demo", "tfrecord", "tfds"):
    return _image_only(caption.make_source(cfg, split=split, process_index=process_index,
                                           process_count=process_count))
  raise ValueError(f"config.input.source = {kind!r}; image_only reads {IMAGE_SOURCE_KINDS}")


def _resolved_ops(ops: formats.TrainOps):
  """Default ops whose `{grounding!r}` / `{concept_vocab!r}` name the resolved paths."""

  def train_ops(cfg):
    paths = resolve_paths(cfg)
    return formats.TrainOps(*(s.replace("{grounding!r}", repr(paths["grounding"]))
                              .replace("{concept_vocab!r}", repr(paths["concept_vocab"]))
                              for s in ops))

  return train_ops


formats.register(formats.Format(
    name="text_only", source_kinds=TEXT_SOURCE_KINDS, make_source=make_text_source,
    train_ops=_resolved_ops(TEXT_OPS), eval_pp=caption.eval_pp, make_eval_data=None,
    passed_fields=("image_id",)))
formats.register(formats.Format(
    name="image_only", source_kinds=IMAGE_SOURCE_KINDS, make_source=make_image_source,
    train_ops=_resolved_ops(IMAGE_OPS), eval_pp=caption.eval_pp, make_eval_data=None,
    passed_fields=("image", "image_id")))
