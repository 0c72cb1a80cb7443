"""Retrieval evaluation speed: the full Flickr30K-size protocol on random weights and inputs.

Flickr30K 1k test = 1,000 images, 5,000 captions, ITM rerank of the top 128 in both directions
(at most (1,000 + 5,000) x 128 = 768k fused pairs, fewer after merging the pairs both directions
share), ViT-B/16 at 384 px and BERT-base (6 text + 6 fusion layers), bf16:

  python benchmarks/retrieval_eval.py                          # full size (accelerator)
  python benchmarks/retrieval_eval.py --model=tiny --images=100 --k_test=16 --image_size=64 \
      --dtype=float32                                          # CPU smoke

Prints one table: seconds per phase (embed images, embed texts, ITC + top-k, ITM rerank, ranks)
of a warm evaluation, and the end-to-end time of three successive evaluations with one
`retrieval.Scorer` (the first compiles; the later ones must not), pairs scored and pairs/s.
Issue target: under 2 minutes end to end on one H100.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_enum("model", "full", ["full", "demo", "tiny"], "full: ViT-B/16 + BERT-base; demo / tiny: the CPU presets.")
flags.DEFINE_integer("images", 1000, "Test images.")
flags.DEFINE_integer("captions_per_image", 5, "Captions per image.")
flags.DEFINE_integer("k_test", 128, "ITM rerank depth (0 = ITC only).")
flags.DEFINE_integer("image_size", 384, "Image side in pixels.")
flags.DEFINE_integer("text_len", 30, "Caption tokens.")
flags.DEFINE_integer("batch", 256, "Embedding batch (images / captions per jitted call).")
flags.DEFINE_integer("itm_batch", 512, "Pairs per jitted ITM call.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_enum("image_cache", "auto", ["auto", "true", "false"],
                  "ITM rerank with the per-image key/value cache (auto: where the model supports it) or without.")
FLAGS = flags.FLAGS


def model_config(name: str, image_size: int, dtype: str) -> dict:
  from configs import common
  from input_pipeline import inputs
  if name == "full":
    vision, text = common.vit_b16(image_size), common.bert_base()
  elif name == "demo":
    vision, text = dict(common.demo_vision(), image_size=image_size), common.demo_text(inputs.DEMO_VOCAB_SIZE)
  else:
    vision, text = dict(common.tiny_vision(), image_size=image_size), common.tiny_text(inputs.DEMO_VOCAB_SIZE)
  return dict(vision=vision, text=text, fusion="cross", embed_dim=256, heads=("itc", "itm"), dtype=dtype)


def synthetic_batches(rng, num_images: int, num_texts: int, image_size: int, text_len: int, vocab: int,
                      batch: int):
  """Padded image and caption batches as the eval data yields them (random content)."""
  import numpy as np

  def pad_rows(total):
    return -(-total // batch) * batch

  image_batch = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  image_batches = [dict(image=image_batch, valid=np.arange(batch) < min(batch, num_images - start))
                   for start in range(0, pad_rows(num_images), batch)]
  lengths = rng.integers(8, text_len + 1, pad_rows(num_texts))
  mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, vocab, mask.shape).astype(np.int32) * mask
  text_batches = [dict(text_ids=ids[s:s + batch], text_mask=mask[s:s + batch],
                       valid=np.arange(batch) < min(batch, num_texts - s))
                  for s in range(0, pad_rows(num_texts), batch)]
  return image_batches, text_batches


def timed(fn):
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import ml_collections
  import numpy as np
  from vlpjax import sharding
  from vlpjax.evaluators import retrieval
  from vlpjax.models import vlp

  cfg = vlp.ModelConfig.from_config(ml_collections.ConfigDict(model_config(FLAGS.model, FLAGS.image_size,
                                                                           FLAGS.dtype)))
  model = vlp.VLPModel(cfg)
  params = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(cfg))["params"]))(
      jax.random.PRNGKey(0))
  num_texts = FLAGS.images * FLAGS.captions_per_image
  txt2img = np.repeat(np.arange(FLAGS.images), FLAGS.captions_per_image)
  img2txt = [list(range(i * FLAGS.captions_per_image, (i + 1) * FLAGS.captions_per_image))
             for i in range(FLAGS.images)]
  image_batches, text_batches = synthetic_batches(np.random.default_rng(0), FLAGS.images, num_texts,
                                                  FLAGS.image_size, FLAGS.text_len, cfg.text.vocab_size,
                                                  FLAGS.batch)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  k = FLAGS.k_test
  params = jax.device_put(params, sharding.replicated(mesh))
  image_cache = {"auto": None, "true": True, "false": False}[FLAGS.image_cache]
  scorer = retrieval.Scorer(model, k_test=k, itm_batch_size=FLAGS.itm_batch, mesh=mesh, image_cache=image_cache)

  def run_evaluate():
    scores = scorer.scores(params, image_batches, text_batches)
    return scorer.recalls(*scores, txt2img, img2txt)

  calls = []
  for n in range(3):   # the first compiles every function once; the later ones reuse them
    _, seconds = timed(run_evaluate)
    calls.append(seconds)
    print(f"evaluation {n + 1}: {seconds:.2f} s", flush=True)

  # Phase by phase, warm, with the Scorer's own steps.
  (images, image_rows), t_images = timed(lambda: scorer.embed_images(params, image_batches))
  (texts, text_rows), t_texts = timed(lambda: scorer.embed_texts(params, text_batches))
  similarities, t_itc = timed(lambda: scorer.similarities(images, image_rows, texts, text_rows))
  rows = {}
  t_rerank = 0.0
  if k:
    _, i2t_top, t2i_top = similarities
    rows["pairs"] = len(retrieval.unique_top_k_pairs(np.asarray(i2t_top), np.asarray(t2i_top), num_texts)[0])
    (scores_i2t, scores_t2i), t_rerank = timed(lambda: scorer.rerank(params, images, image_rows, texts, text_rows,
                                                                      i2t_top, t2i_top))
  else:
    scores_i2t, scores_t2i = similarities
  _, t_ranks = timed(lambda: scorer.recalls(scores_i2t, scores_t2i, txt2img, img2txt))

  pairs = rows.get("pairs", 0)
  print(f"\nretrieval eval on {jax.devices()[0].device_kind} x{jax.device_count()}: model={FLAGS.model} "
        f"({vlp.count_params(params) / 1e6:.1f}M params, {FLAGS.dtype}), {FLAGS.images} images at "
        f"{FLAGS.image_size}px, {num_texts} captions x {FLAGS.text_len} tokens, k_test={k}, "
        f"batch {FLAGS.batch}, ITM batch {FLAGS.itm_batch}, image key/value cache "
        f"{'on' if scorer.image_cache else 'off'}")
  table = [("embed images", t_images), ("embed captions", t_texts), ("ITC sims + top-k", t_itc),
           (f"ITM rerank ({pairs} pairs, {pairs / max(t_rerank, 1e-9):,.0f}/s)", t_rerank),
           ("recall ranks", t_ranks), ("evaluation 1 (compiles)", calls[0]), ("evaluation 2", calls[1]),
           ("evaluation 3", calls[2])]
  width = max(len(name) for name, _ in table)
  print(f"| {'phase':<{width}} | seconds |\n|{'-' * (width + 2)}|---------|")
  for name, seconds in table:
    print(f"| {name:<{width}} | {seconds:7.2f} |")


if __name__ == "__main__":
  app.run(main)
