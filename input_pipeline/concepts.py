r"""ViCHA's visual concepts (docs/method_spec.md §2.3): a noun vocabulary from the captions, then the k
vocabulary words CLIP finds closest to each image, written as `kwords` into ALBEF-format JSON.

    # 1. vocabulary: nouns of every caption (spaCy), lemmatised, lower-cased, count > min_count
    python -m input_pipeline.concepts vocab --annotations=coco.json,vg.json,sbu.json,cc3m.json \
        --output=vocab.json [--min_count=1]
    # 2. top-k words per image by CLIP cosine similarity (the towers run in JAX, sharded)
    python -m input_pipeline.concepts kwords --annotations=coco.json --image_root=/data \
        --vocab=vocab.json --clip=/ckpt/clip-vit-base-patch16 --output=coco_kwords.json [--top_k=15]
    # 3. demo stand-in: each scene's object words plus distractors at an error rate
    python -m input_pipeline.concepts demo --output_dir=/data/demo_kwords [--split=train] \
        [--error_rate=0.2] [--seed=0]

`vocab`: for every caption, the head noun of each noun chunk (ViCHA's SceneGraphParser entity
heads are the same spaCy noun-chunk roots), kept when tagged NOUN and holding a letter, then
lemmatised ("dogs" -> "dog"; ViCHA kept the surface form) and lower-cased. Words are counted over
all captions (every occurrence) and kept when count > --min_count. ViCHA's counter starts at 0,
so its `thresh` t equals --min_count=t+1 here (default 1 = ViCHA's thresh 0: at least two
occurrences). Output: a JSON list of words, most frequent first (ViCHA's keyword file format).

`kwords`: every vocabulary word is encoded raw (no prompt template, as ViCHA), every distinct
image once with CLIP's preprocessing (bicubic resize of the shorter side to the model's
resolution, centre crop, CLIP mean / std); both are L2-normalised and each image keeps the
--top_k words of highest cosine similarity, best first. The output is a copy of the annotation
list where each entry gains `kwords` (NLVR2 entries, with two `images`: `kwords1` and `kwords2`,
as ViCHA's files; an image name without extension gets '.jpg', as SNLI-VE's Flickr ids). Entries
that already have them keep them (a resumed or partly released file) unless --overwrite.
Images that cannot be read or decoded are skipped, counted and reported, never fatal: their
entries get no `kwords` key (a later run can fill them; `sources.json_source` reads an absent
`kwords` as an empty list).

`demo`: the embedded demo set has no CLIP to run, so `demo_kwords` stands in for it: the scene's
object words (colour and shape names) in object order, each replaced by a distractor with
probability --error_rate (a CLIP mistake), then distractor words up to --top_k; distractors are
drawn without repetition from the demo vocabulary minus the scene's words. It is a stand-in for
exercising the ViCHA code path, not a model of CLIP's errors. The command writes the split as
ALBEF-format JSON with `kwords` plus its PNG images, readable by `sources.json_source`.
"""
import collections
import dataclasses
import json
import os
import re
import sys
import time
from typing import Iterable, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from input_pipeline import nlp

COMMANDS = ("vocab", "kwords", "demo")
DEFAULT_TOP_K = 15
_MAX_LISTED_FAILURES = 20

if __name__ == "__main__":
  # Flags exist only when this module is the program (as in input_pipeline.convert), so importing
  # it for `demo_kwords` never clashes with another entry point's flags.
  _ANNOTATIONS = flags.DEFINE_list("annotations", None, "ALBEF/ViCHA JSON annotation files (comma-separated; "
                                   "kwords: one file).")
  _OUTPUT = flags.DEFINE_string("output", None, "vocab: the vocabulary JSON; kwords: the annotated JSON copy.")
  _MIN_COUNT = flags.DEFINE_integer("min_count", 1, "vocab: keep words seen more than this many times "
                                    "(1 = ViCHA's thresh 0).")
  _SPACY_MODEL = flags.DEFINE_string("spacy_model", nlp.DEFAULT_MODEL, "vocab: spaCy pipeline (package or path).")
  _NLP_PROCESSES = flags.DEFINE_integer("nlp_processes", 1, "vocab: spaCy worker processes.")
  _VOCAB = flags.DEFINE_string("vocab", None, "kwords / demo: vocabulary JSON (a list of words).")
  _CLIP = flags.DEFINE_string("clip", None, "kwords: Hugging Face CLIPModel directory or OpenAI / open_clip file.")
  _TOKENIZER = flags.DEFINE_string("tokenizer", None, "kwords: CLIP tokenizer (HF directory, tokenizer.json or "
                                   "bpe_simple_vocab_16e6.txt.gz); default: the --clip directory.")
  _TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "kwords: allow torch pickles / TorchScript archives "
                                    "(OpenAI's .pt files); only for files you trust.")
  _VISION_HEADS = flags.DEFINE_integer("vision_heads", None, "kwords, OpenAI layout: image attention heads "
                                       "(default width / 64).")
  _TEXT_HEADS = flags.DEFINE_integer("text_heads", None, "kwords, OpenAI layout: text attention heads "
                                     "(default width / 64).")
  _ACT = flags.DEFINE_enum("act", None, ["quick_gelu", "gelu"], "kwords, OpenAI layout: MLP activation "
                           "(default quick_gelu, or open_clip_config.json's).")
  _IMAGE_ROOT = flags.DEFINE_string("image_root", "", "kwords: folder the JSON image paths are relative to.")
  _PATH_STRIP = flags.DEFINE_integer("path_strip", 0, "kwords: leading path components to drop from each "
                                     "JSON image path (ViCHA JSONs: 4).")
  _TOP_K = flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Words kept per image.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "kwords: images (and words) per jitted batch; "
                                     "divisible by the device count.")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "kwords: compute dtype.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "kwords: recompute entries that already have kwords.")
  _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "demo: folder for demo_<split>.json and images/.")
  _SPLIT = flags.DEFINE_string("split", "train", "demo: TFDS split of the demo set.")
  _DEMO_CONFIG = flags.DEFINE_string("demo_config", "default", "demo: demo set config (default, tiny).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "demo: TFDS data dir (default $VLPJAX_DATA_DIR).")
  _ERROR_RATE = flags.DEFINE_float("error_rate", 0.2, "demo: probability that a scene word is replaced.")
  _SEED = flags.DEFINE_integer("seed", 0, "demo: seed of the distractor draws.")


# ----------------------------------------------------------------------------- annotations


def entry_images(entry, where: str) -> list[str]:
  """The image(s) of an entry: `[image]`, or NLVR2's `images` (a list of paths).

  Raises:
    ValueError: neither a non-empty string `image` nor a list of them in `images`, naming `where`.
  """
  images = entry.get("images") if isinstance(entry, dict) else None
  if isinstance(images, list) and images and all(isinstance(i, str) and i for i in images):
    return images
  if isinstance(entry, dict) and isinstance(entry.get("image"), str) and entry["image"]:
    return [entry["image"]]
  raise ValueError(f"{where} needs a non-empty string 'image' (or a list 'images')")


def kwords_fields(num_images: int) -> list[str]:
  """Where an entry keeps its words: `kwords`, or per image `kwords1`, `kwords2` (ViCHA's NLVR2 files)."""
  return ["kwords"] if num_images == 1 else [f"kwords{i + 1}" for i in range(num_images)]


def read_annotations(path: str) -> list:
  """An ALBEF/ViCHA annotation file: a JSON list of objects with `image` (or NLVR2's `images`).

  Raises:
    ValueError: unreadable, not JSON, not a list, or an entry without an image, naming the file
      and the entry.
  """
  try:
    with open(path, encoding="utf-8") as f:
      entries = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"annotations {path}: {e}") from None
  if not isinstance(entries, list):
    raise ValueError(f"annotations {path}: expected a JSON list of entries, got {type(entries).__name__}")
  for index, entry in enumerate(entries):
    entry_images(entry, f"annotations {path}: entry {index}")
  return entries


def entry_captions(entry: Mapping, where: str) -> list[str]:
  """The captions of an entry: `caption` (a string or a list), `captions`, or NLVR2's `sentence`."""
  value = entry.get("caption", entry.get("captions", entry.get("sentence")))
  value = [value] if isinstance(value, str) else value
  if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
    raise ValueError(f"{where}: field 'caption' must be a string or a list of strings, got {value!r:.80}")
  return value


# ----------------------------------------------------------------------------- vocab


def caption_nouns(doc) -> list[str]:
  """Lower-cased lemmas of the noun-chunk heads of a parsed caption that are nouns with a letter."""
  words = []
  for chunk in doc.noun_chunks:
    root = chunk.root
    lemma = root.lemma_.strip().lower()
    if root.pos_ == "NOUN" and any(c.isalpha() for c in lemma):
      words.append(lemma)
  return words


def count_nouns(captions: Iterable[str], nlp_pipeline, *, batch_size: int = 512,
                processes: int = 1) -> collections.Counter:
  """Occurrences of each caption noun (`caption_nouns`) over all `captions`."""
  counts = collections.Counter()
  for doc in nlp_pipeline.pipe(captions, batch_size=batch_size, n_process=processes):
    counts.update(caption_nouns(doc))
  return counts


def select_vocab(counts: Mapping[str, int], min_count: int) -> list[str]:
  """Words with count > min_count, most frequent first (ties alphabetical)."""
  return [w for w, c in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if c > min_count]


def build_vocab(annotation_files: Sequence[str], *, min_count: int = 1, spacy_model: str = nlp.DEFAULT_MODEL,
                processes: int = 1) -> tuple[list[str], collections.Counter]:
  """(vocabulary, noun counts) of the captions of `annotation_files`.

  Raises:
    SpacyMissingError: spaCy or the model is not installed (with the pip command).
    ValueError: a bad annotation file or entry, naming it.
  """
  pipeline = nlp.load_spacy(spacy_model, disable=("ner",))
  captions = []
  for path in annotation_files:
    for index, entry in enumerate(read_annotations(path)):
      captions += entry_captions(entry, f"annotations {path}: entry {index}")
  counts = count_nouns(captions, pipeline, processes=processes)
  return select_vocab(counts, min_count), counts


def read_vocab(path: str) -> list[str]:
  """A vocabulary file: a JSON list of words (ViCHA's keyword files), or {word: count}.

  Raises:
    ValueError: unreadable, empty, or not strings, naming the file.
  """
  try:
    with open(path, encoding="utf-8") as f:
      words = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"vocabulary {path}: {e}") from None
  words = list(words) if isinstance(words, (list, dict)) else None
  if not words or not all(isinstance(w, str) and w.strip() for w in words):
    raise ValueError(f"vocabulary {path}: expected a non-empty JSON list of words")
  unique = list(dict.fromkeys(words))
  if len(unique) < len(words):
    logging.warning("vocabulary %s: %d duplicate words dropped", path, len(words) - len(unique))
  return unique


# ----------------------------------------------------------------------------- CLIP preprocessing


def clip_resize_crop(image, size: int):
  """CLIP's preprocessing of a uint8 [h, w, 3] image -> float32 [size, size, 3].

  Bicubic resize (antialiased, rounded to uint8 like PIL) so that the shorter side is `size`
  (the longer one int(size * long / short), as torchvision), centre crop (offset
  round((side - size) / 2), as torchvision), then (x / 255 - CLIP_MEAN) / CLIP_STD.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from input_pipeline import ops_image  # pylint: disable=g-import-not-at-top
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  short = tf.minimum(height, width)
  new_h = tf.where(height <= width, tf.constant(size, tf.float64), tf.floor(size * height / short))
  new_w = tf.where(width <= height, tf.constant(size, tf.float64), tf.floor(size * width / short))
  new_size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
  resized = ops_image.resize_uint8(image, new_size, "bicubic")
  top = tf.cast(tf.round((new_h - size) / 2), tf.int32)
  left = tf.cast(tf.round((new_w - size) / 2), tf.int32)
  crop = tf.image.crop_to_bounding_box(resized, top, left, size, size)
  mean = tf.constant(ops_image.CLIP_MEAN, tf.float32) * 255.0
  std = tf.constant(ops_image.CLIP_STD, tf.float32) * 255.0
  return (tf.cast(crop, tf.float32) - mean) / std


def image_batches(paths: Sequence[str], size: int, batch_size: int):
  """tf.data batches {index int64 [b], image float32 [b, size, size, 3], ok bool [b]} over `paths`.

  Files that cannot be read and images whose decoding raises are dropped from the stream (their
  index never appears); recognisable junk comes through with ok=False (`decode_image_bytes`).
  The last batch may be short.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from input_pipeline import ops_image  # pylint: disable=g-import-not-at-top

  def load(index, path):
    image, ok = ops_image.decode_image_bytes(tf.io.read_file(path))
    return {"index": index, "image": clip_resize_crop(image, size), "ok": ok}

  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), tf.constant(list(paths))))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  return ds.batch(batch_size).prefetch(2)


def pad_batch(arrays: Mapping[str, np.ndarray], batch_size: int) -> tuple[dict, int]:
  """Pads every [n, ...] array to [batch_size, ...] by repeating row 0; returns (padded, n)."""
  n = len(next(iter(arrays.values())))
  if n == batch_size:
    return dict(arrays), n
  return {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) for k, v in arrays.items()}, n


# ----------------------------------------------------------------------------- CLIP scoring


@dataclasses.dataclass
class ConceptScorer:
  """CLIP's top-k vocabulary words for batches of images, sharded over a mesh's batch axes.

  Build with `ConceptScorer.create`; `words` and their normalised text embeddings `text_feats`
  [V, E] (replicated) are fixed, `top_k(images)` returns (indices int32 [B, k], cosines [B, k]).
  """
  params: object
  words: list[str]
  text_feats: object
  mesh: object
  batch_size: int
  k: int
  image_fn: object

  @classmethod
  def create(cls, config, params, tokenizer, words: Sequence[str], *, k: int = DEFAULT_TOP_K,
             batch_size: int = 256, dtype: str = "float32", mesh=None) -> "ConceptScorer":
    """Encodes `words` (raw, [BOS] word [EOS]) with the text tower in fixed-size batches.

    Raises:
      ValueError: `batch_size` not divisible by the mesh's batch shards, or k > len(words).
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from vlpjax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from vlpjax.models import clip as clip_model  # pylint: disable=g-import-not-at-top
    mesh = mesh if mesh is not None else sharding_lib.make_mesh({"data": -1})
    shards = sharding_lib.num_batch_shards(mesh)
    if batch_size % shards:
      raise ValueError(f"--batch_size={batch_size} is not divisible by the {shards} batch shards of the mesh")
    if not 0 < k <= len(words):
      raise ValueError(f"--top_k={k} must be in [1, {len(words)}] (the vocabulary size)")
    model = clip_model.CLIP(config, dtype=jnp.dtype(dtype))
    params = jax.device_put(params, sharding_lib.replicated(mesh))
    lengths = [len(tokenizer.encode(w)) + 2 for w in words]
    length = min(config.text.context_length, max(lengths))
    ids, mask = tokenizer.tokenize(list(words), length)

    @jax.jit
    def text_fn(params, ids, mask):
      return clip_model.normalize(model.apply({"params": params}, ids, mask, method=model.encode_text))

    feats = []
    for start in range(0, len(words), batch_size):
      batch, n = pad_batch({"ids": ids[start:start + batch_size], "mask": mask[start:start + batch_size]},
                           batch_size)
      put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh, x.ndim))  # noqa: E731
      feats.append(text_fn(params, put(batch["ids"]), put(batch["mask"]))[:n])
    text_feats = jax.device_put(jnp.concatenate(feats), sharding_lib.replicated(mesh))

    @jax.jit
    def image_fn(params, images, text_feats):
      image_feats = clip_model.normalize(model.apply({"params": params}, images, method=model.encode_image))
      cosines, indices = jax.lax.top_k(image_feats @ text_feats.T, k)  # [B, k], best first
      return indices, cosines

    return cls(params, list(words), text_feats, mesh, batch_size, k, image_fn)

  def top_k(self, images: np.ndarray):
    """images float32 [batch_size, S, S, 3] -> device arrays (indices int32 [B, k], cosines [B, k])."""
    import jax  # pylint: disable=g-import-not-at-top
    from vlpjax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    images = jax.device_put(images, sharding_lib.batch_sharding(self.mesh, images.ndim))
    return self.image_fn(self.params, images, self.text_feats)


@dataclasses.dataclass
class ImageConcepts:
  """Per image path: its top-k words (best first) or, for failed images, the reason."""
  words: dict[str, list[str]]
  failed: dict[str, str]

  def counts(self) -> dict[str, int]:
    return dict(collections.Counter(self.failed.values()))


def image_concepts(scorer: ConceptScorer, paths: Sequence[str], image_size: int) -> ImageConcepts:
  """Runs `scorer` over every image in `paths` (distinct), in fixed-size padded batches.

  Failed images are recorded in `failed` with the reason: `missing_file` (not read at all),
  `invalid_image` (recognisable junk: unknown format, truncated, too small or too large;
  `ops_image.decode_image_bytes`), `read_or_decode_error` (reading or decoding raised).
  """
  out = ImageConcepts({}, {})
  readable = []
  for path in paths:
    if os.path.isfile(path):
      readable.append(path)
    else:
      out.failed[path] = "missing_file"
  seen = np.zeros(len(readable), bool)
  started, done = time.time(), 0

  def collect(result):
    (indices, _), ok, index, n = result
    top = np.asarray(indices)[:n]
    for row in range(n):
      path = readable[int(index[row])]
      if ok[row]:
        out.words[path] = [scorer.words[i] for i in top[row]]
      else:
        out.failed[path] = "invalid_image"

  pending = None  # the previous batch: its device-to-host copy waits until this one is dispatched
  batches = image_batches(readable, image_size, scorer.batch_size).as_numpy_iterator() if readable else []
  for batch in batches:
    padded, n = pad_batch({"image": batch["image"]}, scorer.batch_size)
    seen[batch["index"]] = True
    current = (scorer.top_k(padded["image"]), batch["ok"], batch["index"], n)
    if pending is not None:
      collect(pending)
    pending = current
    done += n
    if done // scorer.batch_size % 50 == 0:
      logging.info("kwords: %d / %d images (%.1f img/s)", done, len(readable), done / (time.time() - started))
  if pending is not None:
    collect(pending)
  for index in np.flatnonzero(~seen):
    out.failed[readable[index]] = "read_or_decode_error"
  return out


def image_path(image: str, image_root: str = "", path_strip: int = 0) -> str:
  """`image_root/image` after dropping the first `path_strip` components (as `sources.json_source`);
  a name without extension gets '.jpg' (ALBEF's SNLI-VE files give Flickr ids, as `tasks` reads them)."""
  if path_strip:
    image = os.path.join(*image.split("/")[path_strip:])
  if not os.path.splitext(image)[1]:
    image += ".jpg"
  return os.path.join(image_root, image)


def _default_tokenizer_path(clip_path: str) -> str:
  return clip_path if os.path.isdir(clip_path) else os.path.dirname(os.path.abspath(clip_path))


def _write_json(path: str, value) -> None:
  """Writes through a temporary file, so an interrupted run never leaves half a JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f)
  os.replace(path + ".tmp", path)


def write_kwords(annotations: str, output: str, *, clip: str, vocab, tokenizer: Optional[str] = None,
                 image_root: str = "", path_strip: int = 0, top_k: int = DEFAULT_TOP_K, batch_size: int = 256,
                 dtype: str = "float32", overwrite: bool = False, trust_pickle: bool = False,
                 vision_heads: Optional[int] = None, text_heads: Optional[int] = None, act: Optional[str] = None,
                 mesh=None) -> dict:
  """Adds CLIP's top-k vocabulary words as `kwords` to every entry of `annotations`; writes `output`.

  Args:
    annotations: an ALBEF/ViCHA JSON file; `output`: where the annotated copy goes.
    clip: a Hugging Face CLIPModel directory or an OpenAI / open_clip file (`load_clip`).
    vocab: a vocabulary JSON path or a list of words.
    tokenizer: CLIP tokenizer path (default: the --clip directory, or the folder of the file).
    image_root, path_strip: where the images are (`image_path`).
    top_k, batch_size, dtype: words per image, images per jitted batch, compute dtype.
    overwrite: recompute entries that already have `kwords` (default: keep them).
    trust_pickle, vision_heads, text_heads, act: passed to `load_clip`.
    mesh: default all devices on the batch axis.

  An NLVR2 entry (`images`: two paths) gets `kwords1` and `kwords2`, one list per image, as
  ViCHA's NLVR2 files.

  Returns:
    Statistics: entries, images (distinct, to encode), encoded, kept_existing, failed
    (reason -> count) and failed_images (the first paths with their reasons).
  """
  from input_pipeline import clip_tokenizer  # pylint: disable=g-import-not-at-top
  from vlpjax.convert import clip as clip_convert  # pylint: disable=g-import-not-at-top
  entries = read_annotations(annotations)
  words = read_vocab(vocab) if isinstance(vocab, str) else list(vocab)
  images = [entry_images(e, "") for e in entries]
  todo = [i for i, e in enumerate(entries)
          if overwrite or not all(field in e for field in kwords_fields(len(images[i])))]
  paths = list(dict.fromkeys(image_path(image, image_root, path_strip) for i in todo for image in images[i]))
  result = ImageConcepts({}, {})
  if paths:
    config, params = clip_convert.load_clip(clip, trust_pickle=trust_pickle, vision_heads=vision_heads,
                                            text_heads=text_heads, act=act)
    try:
      tok = clip_tokenizer.load_tokenizer(tokenizer or _default_tokenizer_path(clip))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}; pass --tokenizer (an HF CLIP directory, tokenizer.json, or OpenAI's "
                              "bpe_simple_vocab_16e6.txt.gz)") from None
    if len(tok) > config.text.vocab_size:
      raise ValueError(f"tokenizer has {len(tok)} tokens but the CLIP text tower only {config.text.vocab_size}: "
                       "--tokenizer does not belong to --clip")
    scorer = ConceptScorer.create(config, params, tok, words, k=top_k, batch_size=batch_size, dtype=dtype, mesh=mesh)
    logging.info("kwords: %d words, %d images, CLIP %s at %d px", len(words), len(paths), clip,
                 config.vision.image_size)
    result = image_concepts(scorer, paths, config.vision.image_size)
  out, todo = [], set(todo)
  for i, entry in enumerate(entries):
    entry = dict(entry)
    if i in todo:
      for field, image in zip(kwords_fields(len(images[i])), images[i]):
        entry.pop(field, None)
        found = result.words.get(image_path(image, image_root, path_strip))
        if found is not None:
          entry[field] = found
    out.append(entry)
  _write_json(output, out)
  stats = dict(entries=len(entries), images=len(paths), encoded=len(result.words),
               kept_existing=len(entries) - len(todo), failed=result.counts(),
               failed_images=sorted(result.failed.items())[:_MAX_LISTED_FAILURES])
  logging.info("kwords: wrote %s: %s", output, {k: v for k, v in stats.items() if k != "failed_images"})
  for path, reason in stats["failed_images"]:
    logging.warning("kwords: skipped %s (%s)", path, reason)
  return stats


# ----------------------------------------------------------------------------- demo stand-in

# Generic words a captioned scene could also match; with the shape and colour names they give the
# demo vocabulary more than top_k + 6 words, so every list can be filled without repeats.
DEMO_SCENE_WORDS = ("shape", "object", "picture", "background", "scene", "sign")


def demo_vocabulary() -> tuple[str, ...]:
  """The demo's concept words: shape names, colour names, one-word shape synonyms, scene words."""
  from input_pipeline import demo_data  # pylint: disable=g-import-not-at-top
  words = list(demo_data.SHAPES) + list(demo_data.COLORS)
  words += [s for synonyms in demo_data.SHAPE_SYNONYMS.values() for s in synonyms if " " not in s]
  return tuple(dict.fromkeys(words + list(DEMO_SCENE_WORDS)))


def demo_kwords(shapes: Sequence[str], colors: Sequence[str], rng: np.random.Generator, *,
                error_rate: float = 0.2, top_k: int = DEFAULT_TOP_K,
                vocab: Optional[Sequence[str]] = None) -> list[str]:
  """A stand-in for CLIP's top-k concept words of a demo scene (not a model of CLIP's errors).

  The scene words are each object's colour then shape name, in object order, without repeats.
  Each is replaced, with probability `error_rate`, by a distractor; distractors then fill the
  list up to `top_k`. Distractors are drawn uniformly without repetition from `vocab` minus the
  scene words, so a list never repeats a word and never holds a scene word in a distractor slot.
  The list is shorter than `top_k` only when the vocabulary runs out.

  Args:
    shapes, colors: per object, its shape and colour names.
    rng: the only randomness: equal generator states give equal lists.
    error_rate: in [0, 1].
    top_k: list length; more scene words than this are cut.
    vocab: the distractor pool (default `demo_vocabulary()`).

  Returns:
    The words, scene words first (replaced ones in place), then distractors.
  """
  if len(shapes) != len(colors):
    raise ValueError(f"demo_kwords: {len(shapes)} shapes but {len(colors)} colours")
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f"demo_kwords: error_rate={error_rate} is not in [0, 1]")
  if top_k < 1:
    raise ValueError(f"demo_kwords: top_k={top_k} must be >= 1")
  vocab = demo_vocabulary() if vocab is None else vocab
  scene = list(dict.fromkeys(w for pair in zip(colors, shapes) for w in pair))[:top_k]
  pool = [w for w in dict.fromkeys(vocab) if w not in scene]
  distractors = iter([pool[i] for i in rng.permutation(len(pool))])
  replaced = rng.random(len(scene)) < error_rate
  words = [next(distractors, w) if r else w for w, r in zip(scene, replaced)]
  words += [w for _, w in zip(range(top_k - len(words)), distractors)]
  return words


def demo_kwords_for_image(image_id: int, shapes: Sequence[str], colors: Sequence[str], *, seed: int = 0,
                          error_rate: float = 0.2, top_k: int = DEFAULT_TOP_K,
                          vocab: Optional[Sequence[str]] = None) -> list[str]:
  """`demo_kwords` with a generator seeded by (seed, image_id): the same list for an image in
  any order, process or epoch."""
  rng = np.random.default_rng([int(seed), int(image_id)])
  return demo_kwords(shapes, colors, rng, error_rate=error_rate, top_k=top_k, vocab=vocab)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def write_demo(output_dir: str, *, split: str = "train", config: str = "default", data_dir: Optional[str] = None,
               error_rate: float = 0.2, seed: int = 0, top_k: int = DEFAULT_TOP_K,
               vocab: Optional[Sequence[str]] = None) -> str:
  """Writes a demo split as ALBEF-format JSON with stand-in `kwords` (`demo_kwords_for_image`) and
  its PNG images: OUTPUT_DIR/demo_<split>.json and OUTPUT_DIR/images/<image_id>.png.

  Returns:
    The JSON path (read it with `sources.json_source(path, image_root=output_dir)`).
  """
  from input_pipeline import demo_data  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
  entries = []
  for example in demo_data.load_demo(split, data_dir=data_dir, config=config).as_numpy_iterator():
    image_id = int(example["image_id"])
    name = f"images/{image_id}.png"
    with open(os.path.join(output_dir, name), "wb") as f:
      f.write(example["image"])
    shapes = [_text(s) for s in example["objects/shape"]]
    colors = [_text(c) for c in example["objects/color"]]
    entries.append({
        "image": name, "image_id": image_id, "caption": [_text(c) for c in example["captions"]],
        "kwords": demo_kwords_for_image(image_id, shapes, colors, seed=seed, error_rate=error_rate,
                                        top_k=top_k, vocab=vocab)})
  safe_split = re.sub(r"[^0-9A-Za-z]+", "_", split).strip("_")
  path = os.path.join(output_dir, f"demo_{safe_split}.json")
  _write_json(path, entries)
  logging.info("demo: wrote %d entries to %s", len(entries), path)
  return path


# ----------------------------------------------------------------------------- command line


def _required(command: str, **values) -> None:
  for name, value in values.items():
    if value in (None, "", []):
      raise ValueError(f"{command} needs --{name}")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m input_pipeline.concepts {{{'|'.join(COMMANDS)}}} --flag=...; "
                         f"got {argv[1:]}")
  command = argv[1]
  try:
    if command == "vocab":
      _required(command, annotations=_ANNOTATIONS.value, output=_OUTPUT.value)
      words, counts = build_vocab(_ANNOTATIONS.value, min_count=_MIN_COUNT.value, spacy_model=_SPACY_MODEL.value,
                                  processes=_NLP_PROCESSES.value)
      _write_json(_OUTPUT.value, words)
      logging.info("vocab: %d distinct nouns, %d kept (count > %d); most frequent: %s", len(counts), len(words),
                   _MIN_COUNT.value, words[:20])
    elif command == "kwords":
      _required(command, annotations=_ANNOTATIONS.value, output=_OUTPUT.value, vocab=_VOCAB.value, clip=_CLIP.value)
      if len(_ANNOTATIONS.value) != 1:
        raise ValueError(f"kwords takes one --annotations file, got {len(_ANNOTATIONS.value)}")
      stats = write_kwords(
          _ANNOTATIONS.value[0], _OUTPUT.value, clip=_CLIP.value, vocab=_VOCAB.value, tokenizer=_TOKENIZER.value,
          image_root=_IMAGE_ROOT.value, path_strip=_PATH_STRIP.value, top_k=_TOP_K.value,
          batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value,
          trust_pickle=_TRUST_PICKLE.value, vision_heads=_VISION_HEADS.value, text_heads=_TEXT_HEADS.value,
          act=_ACT.value)
      print(json.dumps({k: v for k, v in stats.items() if k != "failed_images"}))
    else:
      _required(command, output_dir=_OUTPUT_DIR.value)
      write_demo(_OUTPUT_DIR.value, split=_SPLIT.value, config=_DEMO_CONFIG.value, data_dir=_DATA_DIR.value,
                 error_rate=_ERROR_RATE.value, seed=_SEED.value, top_k=_TOP_K.value,
                 vocab=read_vocab(_VOCAB.value) if _VOCAB.value else None)
  except (ValueError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  from vlpjax import cli
  cli.run(main)
