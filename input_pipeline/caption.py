"""The `caption` input format: image-caption pairs for pretraining, and retrieval eval data.

Sources (`config.input.source`): `demo` (the embedded demo set), `json` (ALBEF's annotation
files + an image folder), `tfrecord`, `tfds`, `mixture` (weighted parts, each a source).
Examples carry `image` (bytes), `image_id` and `captions` (string [k]); the ops choose, clean
and tokenize one caption per image.

Default training ops (used when `config.input.pp` is ''): ALBEF's pretraining transform
(docs/method_spec.md §1.3), the caption tokenized and MLM-masked per batch (`DEFAULT_OPS`).

Eval data: `EvalData`, every image of a split with the eval image ops, and every caption
tokenized, with the image <-> caption index maps the retrieval metrics need.
"""
from typing import Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import config_fields
from input_pipeline import formats
from input_pipeline import pipeline
from input_pipeline import sources

AUTOTUNE = tf.data.AUTOTUNE
SOURCE_KINDS = ("demo", "json", "tfrecord", "tfds", "mixture")
_EVAL_SEED = 0
_get = config_fields.get

# ALBEF's pretraining ops; the pixel ops of `pp` move to the accelerator with device_augment.
DEFAULT_OPS = formats.TrainOps(
    pp=("decode_random_resized_crop({image_size}, scale=(0.2, 1.0))|flip|randaug(2, 7)"
        "|normalize('clip')|choose_caption|clean_caption({caption_max_words})"),
    batch_pp="tokenize({max_len})|mask_tokens({mlm_prob})",
    device_augment_pp=("decode_crop_canvas({image_size}, scale=(0.2, 1.0))|choose_caption"
                       "|clean_caption({caption_max_words})"),
    device_pp="resize_canvas({image_size}, canvas={canvas})|flip|randaug(2, 7)|normalize('clip')")


def make_source(cfg, *, split: str, process_index: int = 0, process_count: int = 1
                ) -> sources.Source:
  """The configured caption source for `split`, restricted to this process's part."""
  kind = _get(cfg, "source")
  part = dict(process_index=process_index, process_count=process_count)
  data_dir = _get(cfg, "data_dir") or None
  if kind == "demo":
    return sources.demo_source(split, data_dir=data_dir, config=_get(cfg, "demo_config"), **part)
  if kind == "json":
    return sources.json_source(
        config_fields.as_list(config_fields.for_split(cfg, "annotations", split)),
        _get(cfg, "image_root"), path_strip=_get(cfg, "path_strip"), **part)
  if kind == "tfrecord":
    return sources.tfrecord_source(config_fields.for_split(cfg, "tfrecord_pattern", split),
                                   **part)
  if kind == "tfds":
    field_map = _get(cfg, "field_map")
    return sources.tfds_source(_get(cfg, "tfds_name"), split, data_dir=data_dir,
                               field_map=dict(field_map) if field_map else None, **part)
  if kind == "mixture":
    parts = [make_source(p, split=split, **part) for p in _get(cfg, "mixture")]
    return sources.mixture(parts, [float(p["weight"]) for p in _get(cfg, "mixture")])
  raise ValueError(f"config.input.source = {kind!r}; known: {SOURCE_KINDS}")


def train_ops(cfg) -> formats.TrainOps:
  """ALBEF's pretraining ops; the per-batch MLM masking only when `mlm_prob` > 0."""
  if float(_get(cfg, "mlm_prob")) > 0:
    return DEFAULT_OPS
  return DEFAULT_OPS._replace(batch_pp="tokenize({max_len})")


def eval_pp(cfg) -> str:
  """The eval image ops: resize to `image_size` (aspect ignored, as ALBEF), CLIP normalisation."""
  del cfg  # the same string for every config; its placeholder is filled by the caller
  return "decode|resize({image_size})|normalize('clip')"


def eval_text_pp(cfg) -> str:
  """The eval caption ops: `eval_text_pp`, or clean_caption(30)|tokenize(eval_max_len or
  max_len)."""
  return _get(cfg, "eval_text_pp") or "clean_caption({caption_max_words})|tokenize({eval_len})"


# ----------------------------------------------------------------------------- eval data


class EvalData:
  """One retrieval eval split: padded image and caption batches and the index maps.

  Every process computes the same global maps; `image_batches` / `text_batches` yield this
  process's part (images and captions `i::n`), padded to the same number of fixed-size
  batches on every process, with `valid` False on padding rows.

  Attributes:
    captions: all raw captions of the split, image by image.
    txt2img: int32 [num_texts], the image index of each caption.
    img2txt: per image, the indices of its captions.
    image_ids: int64 [num_images], the source's image ids.
    text_ids, text_mask: int32 [num_texts, L], all captions tokenized.
    num_invalid_images: images found undecodable in the last full `image_batches` pass;
      they stay in the index as all-zero images (so indices still line up), and are logged.
    extra_fields: further numeric fields of the image batches, name -> (shape, dtype) of one
      row: what the eval image ops add besides the image (ViCHA's concept_ids, concept_mask).
  """

  def __init__(self, *, images: tf.data.Dataset, image_shape: tuple, num_images: int,
               captions: list[str], txt2img: np.ndarray, image_ids: np.ndarray,
               text_ids: np.ndarray, text_mask: np.ndarray, batch_size: int,
               process_index: int, process_count: int, name: str, extra_fields: dict | None = None):
    self._images = images
    self._image_shape = image_shape
    self.extra_fields = dict(extra_fields or {})
    self.num_images = num_images
    self.captions = captions
    self.txt2img = txt2img
    self.img2txt = [[] for _ in range(num_images)]
    for text, image in enumerate(txt2img):
      self.img2txt[image].append(text)
    self.image_ids = image_ids
    self.text_ids = text_ids
    self.text_mask = text_mask
    self.batch_size = batch_size
    self._process_index = process_index
    self._process_count = process_count
    self._name = name
    self.num_invalid_images = 0

  @property
  def num_texts(self) -> int:
    return len(self.captions)

  def _padded_rows(self, total: int) -> np.ndarray:
    return pipeline.padded_process_rows(total, self.batch_size, self._process_index,
                                        self._process_count)

  def image_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """dict(image float32 [B, H, W, 3], image_index int32 [B] (-1 on padding), valid [B], and
    each of `extra_fields` [B, ...]).

    Images the ops flagged invalid, and those whose decoding raised (missing from the
    decoded stream), are all-zero rows at their index, so the index maps stay aligned.
    """
    invalid = 0
    rows = self._padded_rows(self.num_images)
    matched = pipeline.match_decoded(self._images.as_numpy_iterator(), rows, "image_index")
    for start in range(0, len(rows), self.batch_size):
      indices = rows[start:start + self.batch_size]
      images = np.zeros([len(indices), *self._image_shape], np.float32)
      extra = {key: np.zeros([len(indices), *shape], dtype) for key, (shape, dtype) in self.extra_fields.items()}
      for k, (index, example) in enumerate(zip(indices, matched)):
        if index < 0:
          continue
        if example is not None and example["_valid"]:
          images[k] = example["image"]
          for key in extra:
            extra[key][k] = example[key]
        else:
          invalid += 1
      yield {**extra, "image": images, "image_index": indices.astype(np.int32), "valid": indices >= 0}
    if invalid:
      logging.warning("eval %s: %d undecodable images kept as all-zero images", self._name,
                      invalid)
    self.num_invalid_images = invalid

  def text_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """dict(text_ids, text_mask int32 [B, L], text_index int32 [B] (-1 on padding), valid [B])."""
    rows = self._padded_rows(self.num_texts)
    for start in range(0, len(rows), self.batch_size):
      indices = rows[start:start + self.batch_size]
      valid = indices >= 0
      take = np.where(valid, indices, 0)
      yield {"text_ids": self.text_ids[take] * valid[:, None],
             "text_mask": self.text_mask[take] * valid[:, None],
             "text_index": indices.astype(np.int32), "valid": valid}


def _eval_texts(cfg, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """All captions through the eval text ops: (text_ids, text_mask) int32 [num_texts, L]."""
  text_pp = pipeline.build_ops(eval_text_pp(cfg), cfg, "eval_text_pp")

  def prepare(index, caption):
    example = text_pp({"caption": caption, "_seed": pipeline.example_seed(_EVAL_SEED, index),
                       "_valid": tf.constant(True)})
    return {"text_ids": example["text_ids"], "text_mask": example["text_mask"]}

  ds = (tf.data.Dataset.from_tensor_slices(tf.constant(captions, tf.string)).enumerate()
        .map(pipeline.no_autograph(prepare), num_parallel_calls=AUTOTUNE, deterministic=True)
        .batch(1024))
  parts = list(ds.as_numpy_iterator())
  return (np.concatenate([p["text_ids"] for p in parts]),
          np.concatenate([p["text_mask"] for p in parts]))


def retrieval_eval_data(cfg: ml_collections.ConfigDict, source: sources.Source, *,
                        batch_size: int, process_index: int, process_count: int) -> EvalData:
  """`EvalData` of `source`: images with the eval ops, every caption tokenized.

  Images are decoded with `eval_pp` (default decode|resize(image_size)|normalize('clip'));
  captions with `eval_text_pp` (default clean_caption(30)|tokenize(eval_max_len or max_len)).
  Image i is the i-th example of the source in its order; its captions are consecutive.
  """
  # One pass for the captions and ids (image bytes are read but not decoded).
  listing = source.examples().map(
      pipeline.no_autograph(lambda e: {"captions": e["captions"], "image_id": e["image_id"]}))
  captions, txt2img, image_ids = [], [], []
  for image_index, example in enumerate(listing.as_numpy_iterator()):
    image_ids.append(example["image_id"])
    for caption in example["captions"]:
      captions.append(caption.decode("utf-8"))
      txt2img.append(image_index)
  num_images = len(image_ids)
  if num_images == 0 or not captions:
    raise ValueError(f"eval source {source.name}: no images with captions")
  text_ids, text_mask = _eval_texts(cfg, captions)

  image_pp = pipeline.build_ops(_get(cfg, "eval_pp") or eval_pp(cfg), cfg, "eval_pp")

  def prepare(index, example):
    source_keys = set(example)
    example["_seed"] = pipeline.example_seed(_EVAL_SEED, index)
    example = image_pp(example)
    # Besides the image, any numeric field the eval ops add is a further image-side model input
    # (ViCHA's concept_ids, concept_mask), batched with the image.
    extra = {k: v for k, v in example.items()
             if k not in source_keys and not k.startswith("_") and v.dtype != tf.string}
    return {**extra, "image": example["image"], "image_index": index, "_valid": example["_valid"]}

  images = (source.examples().enumerate().shard(process_count, process_index)
            .map(pipeline.no_autograph(prepare), num_parallel_calls=AUTOTUNE, deterministic=True)
            .ignore_errors().prefetch(AUTOTUNE))
  image_shape = images.element_spec["image"].shape
  if not image_shape.is_fully_defined() or images.element_spec["image"].dtype != tf.float32:
    raise ValueError(f"eval image ops give {images.element_spec['image']}; they must resize "
                     "and normalise to a fixed float32 shape")
  extra_fields = {}
  for key, spec in images.element_spec.items():
    if key in ("image", "image_index", "_valid"):
      continue
    if not spec.shape.is_fully_defined():
      raise ValueError(f"eval image ops give field {key!r} of shape {spec.shape}; batched fields need a "
                       "fixed shape")
    extra_fields[key] = (tuple(spec.shape), spec.dtype.as_numpy_dtype)
  return EvalData(images=images, image_shape=tuple(image_shape), num_images=num_images,
                  extra_fields=extra_fields,
                  captions=captions, txt2img=np.asarray(txt2img, np.int32),
                  image_ids=np.asarray(image_ids), text_ids=text_ids, text_mask=text_mask,
                  batch_size=batch_size, process_index=process_index,
                  process_count=process_count, name=source.name)


def make_eval_data(cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                   process_index: int | None = None, process_count: int | None = None
                   ) -> EvalData:
  """Retrieval eval data of the caption source for `split` (`retrieval_eval_data`).

  JSON and TFRecord sources read `eval_annotations` / `eval_tfrecord_pattern` for any split
  other than the training split.
  """
  process_index, process_count = pipeline.resolve_processes(process_index, process_count)
  return retrieval_eval_data(cfg, make_source(cfg, split=split), batch_size=batch_size,
                             process_index=process_index, process_count=process_count)


formats.register(formats.Format(
    name="caption", source_kinds=SOURCE_KINDS, make_source=make_source, train_ops=train_ops,
    eval_pp=eval_pp, make_eval_data=make_eval_data))
