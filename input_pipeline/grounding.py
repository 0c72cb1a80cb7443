"""Grounded-word annotations and concept vocabularies as the unpaired pipeline reads them.

Offline (`python -m input_pipeline.grounded_words vocab / annotate`) a concept vocabulary and, per
caption, its grounded words are written once; the ops (`input_pipeline.ops_mix`) read them
through the lookup tables built here:

  grounding table  cleaned caption (ALBEF `pre_caption`, first `max_words` words, exactly the
                   string the `clean_caption` op outputs) -> "start,end,concept;..." word spans
                   (end exclusive; spans reaching past `max_words` are dropped). Keyed by the
                   caption text, it serves any source whose captions the annotation covers
                   (JSON, TFRecord, TFDS, the demo); a caption it lacks has no grounded word.
  label table      object label of the image corpus -> concept id (`label_to_id`).

The demo's vocabulary and annotations are built once beside the demo data (`demo_annotations`).
"""
import functools
import json
import os

from absl import logging
import tensorflow as tf

from input_pipeline import words as words_lib


def demo_annotations(data_dir: str | None = None, config: str = "default") -> dict[str, str]:
  """Paths of the demo's concept vocabulary and grounded-word annotations, built on first use.

  Written once into `<data_dir>/vlmixer_demo_<config>/` (the demo's TFDS data dir, as
  `demo_data.build_demo` resolves it): `concepts.json` (`grounded_words.build_vocab` of the
  training scenes' objects: shapes and colour-shape pairs, caption synonyms as aliases, the
  `rules` normaliser, so no spaCy is needed) and `grounded_{train,test}.json` (each scene's five
  captions and their `grounded_words`, `grounded_words.annotate_entries`), and `order.json`, the
  image ids of each split in the order of the demo's TFDS files (so that a text stream and an
  image stream that read complementary TFDS slices, e.g. 'train[:50%]' and 'train[50%:]', read
  complementary sets of scenes; read once with only `image_id` decoded).

  Returns:
    {"concept_vocab": path, "train": path, "test": path, "order": path}.
  """
  from input_pipeline import demo_data  # pylint: disable=import-outside-toplevel
  from input_pipeline import grounded_words  # pylint: disable=import-outside-toplevel
  from input_pipeline import object_labels  # pylint: disable=import-outside-toplevel
  data_dir = demo_data._resolve_data_dir(data_dir)  # pylint: disable=protected-access
  root = os.path.join(data_dir, f"vlmixer_demo_{config}")
  paths = {"concept_vocab": os.path.join(root, "concepts.json"),
           "train": os.path.join(root, "grounded_train.json"),
           "test": os.path.join(root, "grounded_test.json"),
           "order": os.path.join(root, "order.json")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  with demo_data.build_lock(root, "vlmixer_demo"):
    if all(os.path.exists(p) for p in paths.values()):
      return paths
    counts, aliases = grounded_words.demo_label_counts("train", config, colors=True)
    vocab = grounded_words.build_vocab([(counts, 1)], "rules", aliases)
    for split in ("train", "test"):
      entries = [{"image_id": int(i), "caption": list(c)}
                 for i, _, c in object_labels.demo_scenes(split, config)]
      annotated, stats = grounded_words.annotate_entries(entries, vocab)
      _write_json_atomic(annotated, paths[split])
      logging.info("vlmixer demo annotations %s: %s", paths[split], stats)
    _write_json_atomic(_demo_file_order(data_dir, config), paths["order"])
    _write_json_atomic(vocab.to_json(), paths["concept_vocab"])
  return paths


def _demo_file_order(data_dir: str | None, config: str) -> dict[str, list[int]]:
  """{split: image ids in the TFDS file order} of the demo set (built first if needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from input_pipeline import demo_data  # pylint: disable=import-outside-toplevel
  builder = demo_data.build_demo(data_dir, config)
  out = {}
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding({"image_id": True}))
    out[split] = [int(e["image_id"]) for e in ds.as_numpy_iterator()]
  return out


def _write_json_atomic(obj, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def grounded_captions(paths: tuple[str, ...], max_words: int) -> dict[str, str]:
  """{cleaned caption: "s,e,c;..."} of `grounded_words annotate` outputs (see the module doc).

  Raises ValueError naming the file and entry when an entry lacks `grounded_words` or its
  spans do not fit its captions.
  """
  table = {}
  for path in paths:
    entries = words_lib.read_json(path, "grounded-word annotations")
    if not isinstance(entries, list):
      raise ValueError(f"grounded-word annotations {path}: expected a JSON list of entries")
    for index, entry in enumerate(entries):
      where = f"grounded-word annotations {path}: entry {index}"
      if not isinstance(entry, dict) or "caption" not in entry or "grounded_words" not in entry:
        raise ValueError(f"{where}: needs 'caption' and 'grounded_words' (the output of "
                         "`python -m input_pipeline.grounded_words annotate`)")
      captions, spans = entry["caption"], entry["grounded_words"]
      if isinstance(captions, str):
        captions, spans = [captions], [spans]
      if not isinstance(spans, list) or len(spans) != len(captions):
        raise ValueError(f"{where}: 'grounded_words' must hold one span list per caption")
      for text, caption_spans in zip(captions, spans):
        cleaned = words_lib.caption_words(text, max_words)[0]
        key = " ".join(cleaned)
        if key in table:
          continue
        kept = []
        for span in caption_spans:
          if not (isinstance(span, list) and len(span) == 3 and all(isinstance(v, int) for v in span)):
            raise ValueError(f"{where}: grounded word span {span!r} is not [start, end, concept]")
          if span[1] <= len(cleaned):
            kept.append(",".join(map(str, span)))
        table[key] = ";".join(kept)
  return table


@functools.lru_cache(maxsize=8)
def grounding_table(paths: tuple[str, ...], max_words: int) -> tf.lookup.StaticHashTable:
  """The grounding table of `paths` (cleaned caption -> spans string; '' when absent)."""
  table = grounded_captions(paths, max_words)
  logging.info("grounding table: %d captions (%d grounded) from %s", len(table),
               sum(bool(v) for v in table.values()), ", ".join(paths))
  keys, values = (list(table) or [""]), (list(table.values()) or [""])
  with tf.init_scope():  # a resource every later tf.data function can capture
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(values)), default_value="")


def load_label_to_id(path: str) -> dict[str, int]:
  """`label_to_id` of a concept vocabulary JSON (`grounded_words.ConceptVocab`)."""
  data = words_lib.read_json(path, "concept vocabulary")
  if not isinstance(data, dict) or not isinstance(data.get("label_to_id"), dict):
    raise ValueError(f"concept vocabulary {path}: needs a 'label_to_id' object (the output of "
                     "`python -m input_pipeline.grounded_words vocab`)")
  return {str(k): int(v) for k, v in data["label_to_id"].items()}


def num_concepts(path: str) -> int:
  """The number of concepts of a concept vocabulary JSON."""
  data = words_lib.read_json(path, "concept vocabulary")
  return len(data.get("concepts", ())) if isinstance(data, dict) else 0


@functools.lru_cache(maxsize=8)
def label_table(path: str) -> tf.lookup.StaticHashTable:
  """Object label -> concept id (-1 when the vocabulary has no such label)."""
  mapping = load_label_to_id(path)
  keys, values = (list(mapping) or [""]), (list(mapping.values()) or [-1])
  with tf.init_scope():
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(values, tf.int32)),
        default_value=-1)
