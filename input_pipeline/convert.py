"""Converts ALBEF/ViCHA JSON annotations + an image folder into TFRecord shards.

    python -m input_pipeline.convert --annotations=coco.json,vg.json --image_root=/data \\
        --output=/data/tfrecords/pretrain --num_shards=64

Writes `OUTPUT/data-00000-of-00064.tfrecord` ... (tf.train.Example with the common fields:
`image` bytes as stored on disk, `image_id` int64, `captions` bytes list, `concepts` bytes
list when the JSON has `kwords`) and `OUTPUT/manifest.json` with the counts per shard and the
skipped entries with their reasons. Example i goes to shard i % num_shards, so a
`tfrecord_source` over the shards reads the examples in the JSON order.

Entries are filtered exactly as `sources.json_source` filters them (missing or unreadable
files, empty or non-UTF-8 captions). With --verify_images (default) every image is also
decoded once here, and undecodable, too small or too large images are skipped with a reason,
so training never meets them.
"""
import concurrent.futures
import io
import json
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from PIL import Image
import tensorflow as tf

from input_pipeline import ops_image
from input_pipeline import sources

if __name__ == "__main__":
  # Flags exist only when this module is the program, so importing it (tests, notebooks)
  # never clashes with another entry point's flags.
  _ANNOTATIONS = flags.DEFINE_list("annotations", None, "ALBEF/ViCHA JSON files (comma-separated).")
  _IMAGE_ROOT = flags.DEFINE_string("image_root", "", "Folder the JSON image paths are relative to.")
  _OUTPUT = flags.DEFINE_string("output", None, "Output folder for the shards and manifest.json.")
  _NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of TFRecord shards.")
  _PATH_STRIP = flags.DEFINE_integer("path_strip", 0, "Leading path components to drop from "
                                     "each JSON image path (ViCHA JSONs: 4).")
  _VERIFY = flags.DEFINE_bool("verify_images", True, "Decode every image once and skip bad ones.")
  _WORKERS = flags.DEFINE_integer("workers", 8, "Threads reading and verifying images.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace shards already in --output.")

_CHUNK = 256
_MAX_LISTED_SKIPS = 100


def shard_name(index: int, num_shards: int) -> str:
  return f"data-{index:05d}-of-{num_shards:05d}.tfrecord"


# Formats `ops_image.decode` reads (PIL names).
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")


def check_image(data: bytes, min_size: int = ops_image.DEFAULT_MIN_SIZE,
                max_pixels: int = ops_image.DEFAULT_MAX_PIXELS) -> str | None:
  """None if PIL decodes `data` fully within the size limits, else the skip reason."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in DECODABLE_FORMATS:
        return "unsupported_format"
      width, height = image.size
      if width * height > max_pixels:
        return "image_too_large"
      if min(width, height) < min_size:
        return "image_too_small"
      image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return "undecodable_image"
  return None


def _load(path: str, verify: bool) -> tuple[bytes | None, str | None]:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError:
    return None, "unreadable_image"
  reason = check_image(data) if verify else None
  return (None, reason) if reason else (data, None)


def _bytes_feature(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def make_example(image: bytes, image_id: int, captions: Sequence[str],
                 concepts: Sequence[str] | None) -> tf.train.Example:
  feature = {
      "image": _bytes_feature([image]),
      "image_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[image_id])),
      "captions": _bytes_feature([c.encode("utf-8") for c in captions]),
  }
  if concepts is not None:
    feature["concepts"] = _bytes_feature([c.encode("utf-8") for c in concepts])
  return tf.train.Example(features=tf.train.Features(feature=feature))


def convert(annotations: str | Sequence[str], image_root: str, output: str, *,
            num_shards: int = 1, path_strip: int = 0, verify_images: bool = True,
            workers: int = 8, overwrite: bool = False) -> dict:
  """Writes the shards and the manifest; returns the manifest dict."""
  if num_shards < 1:
    raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
  files = [annotations] if isinstance(annotations, str) else list(annotations)
  os.makedirs(output, exist_ok=True)
  existing = [f for f in os.listdir(output) if f.startswith("data-") and f.endswith(".tfrecord")]
  if existing and not overwrite:
    raise ValueError(f"{output} already holds {len(existing)} shards; pass --overwrite")
  for name in existing:
    os.remove(os.path.join(output, name))
  records = sources.load_json_annotations(files, image_root, path_strip=path_strip)
  skipped = records.skipped
  skipped_entries = [dict(file=f, entry=i, image=im, reason=r)
                     for f, i, im, r in records.skipped_entries]
  names = [shard_name(i, num_shards) for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(os.path.join(output, n)) for n in names]
  counts = [0] * num_shards
  written = 0
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for start in range(0, len(records.paths), _CHUNK):
      chunk = range(start, min(start + _CHUNK, len(records.paths)))
      loaded = pool.map(lambda i: _load(records.paths[i], verify_images), chunk)
      for i, (data, reason) in zip(chunk, loaded):
        if reason:
          skipped[reason] += 1
          if len(skipped_entries) < _MAX_LISTED_SKIPS:
            file, entry = records.origins[i]
            skipped_entries.append(dict(file=file, entry=entry, image=records.paths[i],
                                        reason=reason))
          continue
        concepts = records.concepts[i] if records.concepts is not None else None
        example = make_example(data, records.image_ids[i], records.captions[i], concepts)
        writers[written % num_shards].write(example.SerializeToString())
        counts[written % num_shards] += 1
        written += 1
  for writer in writers:
    writer.close()
  manifest = {
      "format": "vlpjax-tfrecord-v1",
      "annotations": files,
      "image_root": image_root,
      "num_examples": written,
      "num_shards": num_shards,
      "fields": list(sources.REQUIRED_FEATURES) + (
          ["concepts"] if records.concepts is not None else []),
      "shards": [dict(file=n, num_examples=c) for n, c in zip(names, counts)],
      "skipped": dict(skipped),
      "skipped_entries": skipped_entries,
  }
  with open(os.path.join(output, sources.MANIFEST_NAME), "w") as f:
    json.dump(manifest, f, indent=1)
  if written == 0:
    raise ValueError(f"no usable example in {files} (skipped: {dict(skipped)})")
  return manifest


def main(argv):
  del argv
  if not _ANNOTATIONS.value or not _OUTPUT.value:
    raise app.UsageError("--annotations and --output are required")
  manifest = convert(_ANNOTATIONS.value, _IMAGE_ROOT.value, _OUTPUT.value,
                     num_shards=_NUM_SHARDS.value, path_strip=_PATH_STRIP.value,
                     verify_images=_VERIFY.value, workers=_WORKERS.value,
                     overwrite=_OVERWRITE.value)
  logging.info("wrote %d examples in %d shards to %s; skipped %s", manifest["num_examples"],
               manifest["num_shards"], _OUTPUT.value, manifest["skipped"])


if __name__ == "__main__":
  from vlpjax import cli
  cli.run(main)
