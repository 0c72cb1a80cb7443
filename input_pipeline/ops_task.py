"""tf.data ops of the downstream task formats (`input_pipeline.tasks`): VQA answer targets, a
chain of image ops on each image of a pair (NLVR2), class labels from names, RefCOCO+ boxes.

Registered ops: tokenize_answers, answer_scores, each_image, class_label, normalize_boxes, pad_boxes.
"""
from typing import Sequence

import tensorflow as tf

from input_pipeline import ops_image  # noqa: F401  registers the image ops `each_image` chains
from input_pipeline import ops_text
from input_pipeline import registry
from input_pipeline import sources

_SALT_EACH_IMAGE = 1000  # + image slot: the seed of each image of `each_image`


@registry.register("tokenize_answers")
def tokenize_answers(max_answers: int, max_len: int, kind: str = "sentencepiece",
                     model: str | None = None, key: str = "answers",
                     weight_key: str = "answer_weights", out: str = "answer", lower: bool = True):
  """Tokenizes a question's answers into a fixed number of rows.

  `example[key]` string [k] and `example[weight_key]` float [k] become
  `example[out + "_ids"]`, `example[out + "_mask"]` int32 [max_answers, max_len]
  (`[CLS] answer [SEP]`, padded) and `example[out + "_weight"]` float32 [max_answers]. The
  `max_answers` heaviest answers are kept (ties in order); rows after them are all zero, with
  weight 0.
  """
  tokenizer = ops_text.load_tokenizer(kind, model, lower)

  def fn(example):
    answers = ops_text._get_strings(example, key, "tokenize_answers")
    weights = tf.cast(example[weight_key], tf.float32)
    order = tf.argsort(weights, direction="DESCENDING", stable=True)[:max_answers]
    ids, mask = tokenizer.encode_tf(tf.gather(answers, order), max_len, append_sep=True)
    rows = [[0, max_answers - tf.shape(order)[0]]]
    ids, mask = tf.pad(ids, rows + [[0, 0]]), tf.pad(mask, rows + [[0, 0]])
    weights = tf.pad(tf.gather(weights, order), rows)
    ids.set_shape([max_answers, max_len])
    mask.set_shape([max_answers, max_len])
    weights.set_shape([max_answers])
    return {**example, f"{out}_ids": ids, f"{out}_mask": mask, f"{out}_weight": weights}

  return fn


@registry.register("answer_scores")
def answer_scores(answer_list: str = "", source: str = "", demo_config: str = "default", data_dir: str = "",
                  annotators: int = 10, key: str = "answers", weight_key: str = "answer_weights",
                  out: str = "answer_scores"):
  """VQA soft scores over a fixed answer vocabulary: the target of a classifier head (VinVL / MVP).

  The vocabulary is the list the VQA evaluator scores with, in its order: the JSON list at
  `answer_list` (`config.input.answer_list`), or with `source='demo'` the demo's answer list
  (`demo_tasks`, built if needed). Real data needs `answer_list`: a classifier's vocabulary is
  fixed before training. `example[key]` string [k]
  (distinct answers) and `example[weight_key]` float [k] (the fraction of annotators who gave
  each) become `example[out]` float32 [C]: min(1, weight * annotators / 3), VQA's soft score
  min(1, count / 3), at each answer's index; answers outside the vocabulary score nothing.
  """
  if not answer_list and source == "demo":
    from input_pipeline import demo_tasks  # pylint: disable=import-outside-toplevel  (PIL, numpy)
    answer_list = demo_tasks.answer_list_file(demo_tasks.build_demo_task("vqa", demo_config, root=data_dir or None))
  if not answer_list:
    raise ValueError("answer_scores: the classifier's answer vocabulary needs config.input.answer_list (a JSON "
                     "list of answers) on non-demo data")
  vocabulary = sources.read_answer_list(answer_list)
  size = len(vocabulary)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(vocabulary), tf.range(size, dtype=tf.int64)), -1)

  def fn(example):
    answers = ops_text._get_strings(example, key, "answer_scores")
    weights = tf.cast(example[weight_key], tf.float32)
    index = table.lookup(answers)
    known = index >= 0
    scores = tf.minimum(1.0, weights * (annotators / 3.0))
    target = tf.scatter_nd(tf.boolean_mask(index, known)[:, None], tf.boolean_mask(scores, known), [size])
    target.set_shape([size])
    return {**example, out: target}

  return fn


@registry.register("each_image")
def each_image(spec: str, keys: Sequence[str] = ("image0", "image1")):
  """Runs the image op chain `spec` (ops on key 'image') on each of `keys`.

  Each image gets its own seed (the example seed folded with its slot), so two images of one
  example are augmented independently; `_valid` is ANDed over them. Only the image and the
  seed reach the inner ops.
  """
  inner = registry.parse(spec)
  keys = tuple(keys)

  def fn(example):
    out = dict(example)
    for slot, key in enumerate(keys):
      sub = {"image": example[key]}
      if "_seed" in example:
        sub["_seed"] = tf.cast(tf.random.experimental.stateless_fold_in(
            tf.cast(example["_seed"], tf.int64), _SALT_EACH_IMAGE + slot), tf.int64)
      sub = inner(sub)
      out[key] = sub["image"]
      if "_valid" in sub:
        out["_valid"] = tf.logical_and(out.get("_valid", True), sub["_valid"])
    return out

  return fn


@registry.register("class_label")
def class_label(classes: Sequence[str], key: str = "label_name", out: str = "label"):
  """`example[out]` int32 = index of the string `example[key]` in `classes`.

  An unknown name gives label 0 and sets `_valid` False.
  """
  names = tf.constant(list(classes), tf.string)

  def fn(example):
    hits = tf.equal(names, ops_text._get_strings(example, key, "class_label"))
    label = tf.argmax(tf.cast(hits, tf.int32), output_type=tf.int32)
    valid = tf.logical_and(example.get("_valid", True), tf.reduce_any(hits))
    return {**example, out: label, "_valid": valid}

  return fn


@registry.register("normalize_boxes")
def normalize_boxes(key: str = "bbox", out: str = "gt_box", image_key: str = "image"):
  """Pixel boxes [..., 4+] (x, y, width, height) -> (ymin, xmin, ymax, xmax) in [0, 1].

  Divides by the size of `example[image_key]`, which must be the decoded image the boxes
  refer to: run it after `decode` and before any crop or resize (a resize that ignores the
  aspect, as the eval ops do, keeps normalised boxes valid). float32 [..., 4] out.
  """

  def fn(example):
    shape = tf.cast(tf.shape(example[image_key]), tf.float32)
    height, width = shape[0], shape[1]
    x, y, w, h = tf.unstack(tf.cast(example[key], tf.float32)[..., :4], axis=-1)
    box = tf.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=-1)
    return {**example, out: tf.clip_by_value(box, 0.0, 1.0)}

  return fn


@registry.register("pad_boxes")
def pad_boxes(num: int, key: str = "proposals", mask_out: str = "proposal_mask"):
  """Boxes [k, 4] -> [num, 4] (the first `num`, zero rows after) and `mask_out` bool [num]."""

  def fn(example):
    boxes = tf.reshape(tf.cast(example[key], tf.float32), [-1, 4])[:num]
    count = tf.shape(boxes)[0]
    padded = tf.pad(boxes, [[0, num - count], [0, 0]])
    padded.set_shape([num, 4])
    mask = tf.range(num) < count
    return {**example, key: padded, mask_out: mask}

  return fn
