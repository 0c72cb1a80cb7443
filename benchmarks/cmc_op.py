"""Host cost of VLMixer's cross-modal CutMix batch op (`input_pipeline/ops_mix.py`), per batch.

  python benchmarks/cmc_op.py --batch=512 --max_len=30 --max_spans=8 --entry_tokens=4

Times, on one CPU thread of this machine, the per-batch ops of the text-only stream
(`cmc(p)|mask_tokens(0.15, key='mix')`) on batches of `--batch` sentences of `--max_len` tokens with
`--max_spans` grounded occurrences, inside `tf.data.Dataset.map` (as the builder runs them): the
`cmc` op alone, and with the MLM masking of the mixed sequence that follows it.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("batch", 512, "Sentences per batch.")
flags.DEFINE_integer("max_len", 30, "Tokens per sentence.")
flags.DEFINE_integer("max_spans", 8, "Grounded occurrences per sentence (K).")
flags.DEFINE_integer("entry_tokens", 4, "Visual tokens per entry (P).")
flags.DEFINE_float("p", 0.5, "Replacement probability.")
flags.DEFINE_integer("batches", 50, "Timed batches.")
FLAGS = flags.FLAGS


def _batches(num: int):
  import numpy as np
  rng = np.random.default_rng(0)
  b, length, k = FLAGS.batch, FLAGS.max_len, FLAGS.max_spans
  lengths = rng.integers(length // 2, length + 1, b)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(5, 90, (b, length)), 0).astype(np.int32)
  start = np.full((b, k), -1, np.int32)
  end = np.full((b, k), -1, np.int32)
  concept = np.full((b, k), -1, np.int32)
  for i in range(b):  # up to K non-overlapping spans of 1-2 tokens
    t, o = 1, 0
    while o < k and t + 2 < lengths[i]:
      size = int(rng.integers(1, 3))
      start[i, o], end[i, o], concept[i, o] = t, t + size, int(rng.integers(0, 50))
      t, o = t + size + int(rng.integers(1, 3)), o + 1
  return [dict(text_ids=ids, text_mask=mask, span_start=start, span_end=end, span_concept=concept)] * num


def _time(dataset, num: int) -> float:
  it = iter(dataset)
  next(it)  # tracing and the first batch
  t0 = time.perf_counter()
  for _ in range(num):
    next(it)
  return (time.perf_counter() - t0) / num


def main(argv):
  del argv
  import tensorflow as tf
  from input_pipeline import pipeline
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(tokenizer=dict(kind="sentencepiece", path="")))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  data = _batches(FLAGS.batches + 1)
  base = tf.data.Dataset.from_tensor_slices({k: tf.stack([d[k] for d in data]) for k in data[0]})
  base = base.enumerate().map(lambda i, b: dict(b, _seed=tf.stack([tf.cast(i, tf.int64), tf.constant(1, tf.int64)])))
  rows = []
  for name, spec in (("cmc", f"cmc({FLAGS.p}, entry_tokens={FLAGS.entry_tokens})"),
                     ("cmc|mask_tokens", f"cmc({FLAGS.p}, entry_tokens={FLAGS.entry_tokens})"
                                         "|mask_tokens(0.15, key='mix')")):
    ops = pipeline.build_ops(spec, cfg, "batch_pp")
    seconds = _time(base.map(pipeline.no_autograph(ops)).with_options(options), FLAGS.batches)
    rows.append((name, seconds))
  print(f"| batch op (B={FLAGS.batch}, L={FLAGS.max_len}, K={FLAGS.max_spans}, P={FLAGS.entry_tokens}) | "
        "ms / batch | us / sentence |")
  print("|---|---|---|")
  for name, seconds in rows:
    print(f"| {name} | {1e3 * seconds:.2f} | {1e6 * seconds / FLAGS.batch:.1f} |")


if __name__ == "__main__":
  app.run(main)
