"""ITM rerank with and without the per-image key/value cache: FLOPs (from the jaxpr) and time.

FLOPs: every matmul and convolution in the jaxprs of the rerank's jitted functions (counted as
`vlpjax/flops.py` counts a train step), times the number of calls an evaluation makes:
  before  ceil(P / C) calls of the every-pair scorer (C = --itm_batch pairs, each fusing its
          image's states: the cross-attention keys and values projected per pair);
  after   one cache call per block of image rows that has pairs + one call of the grouped
          scorer per chunk of `retrieval.group_pairs_by_image` (C pairs as groups of
          --texts_per_group texts of one image; its padding slots are counted as work).
P is the number of distinct (image, text) pairs of the two top-k lists. Without --run the lists
come from random unit features (no model runs: any size counts in seconds on a CPU); with --run
they are the model's own. The embeddings (ViT, text encoder) are counted too, for the whole
evaluation's ratio.

Time (--run): both Scorers evaluate the same random inputs with the model's random weights;
each evaluation runs twice (the first compiles), then the rerank phase alone is timed warm, and
the two score matrices are compared.

  # Flickr30K 1k test (1,000 images, 5,000 captions, k=128, ViT-B/16 at 384 px + BERT-base): FLOPs only
  python benchmarks/rerank_cache.py
  # the same dims, measured on a CPU at a reduced size
  python benchmarks/rerank_cache.py --images=16 --k_test=8 --itm_batch=64 --batch=16 --run
"""
import functools
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import retrieval_eval  # noqa: E402  (its model presets and synthetic batches)

flags.DEFINE_integer("texts_per_group", 0, "Texts per cached image in a chunk (0 = the Scorer's default).")
flags.DEFINE_integer("cache_block", 128, "Image rows per cache block.")
flags.DEFINE_bool("run", False, "Also run both reranks (random weights and inputs) and time them.")
FLAGS = flags.FLAGS


def _abstract(tree):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def rerank_flops(model, params, *, num_images: int, num_texts: int, rows: int, text_rows: int, image_rows,
                 text_row_ids, i2t_top, t2i_top, image_tokens: int, text_len: int, itm_batch: int,
                 texts_per_group: int, cache_block: int) -> dict:
  """FLOPs of both reranks for the given top-k lists (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vlpjax import flops
  from vlpjax.evaluators import retrieval

  cfg = model.config
  dtype = cfg.compute_dtype
  pair_images, pair_texts, inverse = retrieval.unique_top_k_pairs(i2t_top, t2i_top, num_texts)
  pairs = len(pair_images)
  image_states = jax.ShapeDtypeStruct((rows, image_tokens, cfg.vision.width), dtype)
  text_states = jax.ShapeDtypeStruct((text_rows, text_len, cfg.text.width), dtype)
  text_mask = jax.ShapeDtypeStruct((text_rows, text_len), jnp.int32)
  index = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

  per_call_before = flops.count_flops(retrieval.make_pair_score_fn(model), params, image_states, text_states,
                                      text_mask, index(itm_batch), index(itm_batch))
  calls_before = -(-pairs // itm_batch)
  groups = itm_batch // texts_per_group
  block = min(cache_block, rows)
  cache_fn = functools.partial(retrieval.make_image_cache_fn(model, None), block=block)
  cache_shape = jax.eval_shape(cache_fn, params, image_states, index())
  per_block = flops.count_flops(cache_fn, params, image_states, index())
  per_call_after = flops.count_flops(retrieval.make_cached_pair_score_fn(model), params, cache_shape, text_states,
                                     text_mask, index(groups), index(groups, texts_per_group))
  plan = retrieval.group_pairs_by_image(image_rows[pair_images], text_row_ids[pair_texts], num_rows=rows,
                                        block=block, texts_per_group=texts_per_group, groups_per_chunk=groups)
  calls_after = len(plan["chunk_block"])
  blocks_after = len(np.unique(plan["chunk_block"]))
  before = calls_before * per_call_before
  after = blocks_after * per_block + calls_after * per_call_after
  return dict(pairs=pairs, slots_after=calls_after * itm_batch, calls_before=calls_before, calls_after=calls_after,
              blocks=blocks_after, per_pair_before=per_call_before / itm_batch,
              per_pair_after=per_call_after / itm_batch, per_image_cache=per_block / block,
              before=before, after=after)


def embed_flops(model, params, *, num_images: int, num_texts: int, image_size: int, text_len: int) -> int:
  """FLOPs of embedding the split (one image and one caption, times their numbers)."""
  import jax
  import jax.numpy as jnp
  from vlpjax import flops
  from vlpjax.evaluators import retrieval

  embed_images, embed_texts = retrieval.make_embed_fns(model, keep_states=True)
  image = flops.count_flops(embed_images, params, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  text = flops.count_flops(embed_texts, params, jax.ShapeDtypeStruct((1, text_len), jnp.int32),
                           jax.ShapeDtypeStruct((1, text_len), jnp.int32))
  return num_images * image + num_texts * text


def random_top_k(num_images: int, num_texts: int, k: int, seed: int = 0):
  """Top-k lists of random unit features (ALBEF's i2t and t2i lists; ties by lower index)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(num_images, 256))
  text = rng.normal(size=(num_texts, 256))
  sims = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
  i2t = np.argsort(-sims, axis=1, kind="stable")[:, :min(k, num_texts)]
  t2i = np.argsort(-sims.T, axis=1, kind="stable")[:, :min(k, num_images)]
  return i2t, t2i


def timed(fn):
  """(fn(), wall seconds, process CPU seconds: steadier than wall time on a shared CPU)."""
  import jax
  start, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start, time.process_time() - cpu


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import ml_collections
  import numpy as np
  from vlpjax.evaluators import retrieval
  from vlpjax.models import vlp

  cfg = vlp.ModelConfig.from_config(ml_collections.ConfigDict(
      retrieval_eval.model_config(FLAGS.model, FLAGS.image_size, FLAGS.dtype)))
  model = vlp.VLPModel(cfg)
  init = lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(cfg))["params"])  # noqa: E731
  abstract_params = jax.eval_shape(init, jax.random.PRNGKey(0))
  num_images, num_texts, k = FLAGS.images, FLAGS.images * FLAGS.captions_per_image, FLAGS.k_test
  pad = lambda n: -(-n // FLAGS.batch) * FLAGS.batch  # noqa: E731
  texts_per_group = FLAGS.texts_per_group or retrieval.default_texts_per_group(FLAGS.itm_batch, 1)
  image_tokens = cfg.vision.num_patches + 1
  common_args = dict(num_images=num_images, num_texts=num_texts, rows=pad(num_images), text_rows=pad(num_texts),
                     image_rows=np.arange(num_images), text_row_ids=np.arange(num_texts), image_tokens=image_tokens,
                     text_len=FLAGS.text_len, itm_batch=FLAGS.itm_batch, texts_per_group=texts_per_group,
                     cache_block=FLAGS.cache_block)

  run = {}
  if FLAGS.run:
    params = jax.jit(init)(jax.random.PRNGKey(0))
    image_batches, text_batches = retrieval_eval.synthetic_batches(
        np.random.default_rng(0), num_images, num_texts, FLAGS.image_size, FLAGS.text_len, cfg.text.vocab_size,
        FLAGS.batch)
    scorers = {name: retrieval.Scorer(model, k_test=k, itm_batch_size=FLAGS.itm_batch, image_cache=cached,
                                      texts_per_group=texts_per_group, cache_block=FLAGS.cache_block)
               for name, cached in (("before", False), ("after", True))}
    for name, scorer in scorers.items():
      for n in range(2):   # the first compiles
        _, seconds, cpu = timed(lambda: scorer.scores(params, image_batches, text_batches))
        print(f"{name}: evaluation {n + 1} {seconds:.2f} s ({cpu:.2f} CPU s)", flush=True)
      images, image_rows = scorer.embed_images(params, image_batches)
      texts, text_rows = scorer.embed_texts(params, text_batches)
      _, i2t_top, t2i_top = scorer.similarities(images, image_rows, texts, text_rows)
      scores, seconds, cpu = timed(lambda: scorer.rerank(params, images, image_rows, texts, text_rows, i2t_top,
                                                         t2i_top))
      run[name] = dict(seconds=seconds, cpu=cpu, scores=[np.asarray(s) for s in scores])
    i2t_top, t2i_top = np.asarray(i2t_top), np.asarray(t2i_top)
    common_args.update(image_rows=image_rows, text_row_ids=text_rows)
    run["max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(run["before"]["scores"], run["after"]["scores"]))
  else:
    i2t_top, t2i_top = random_top_k(num_images, num_texts, k)

  counts = rerank_flops(model, abstract_params, i2t_top=i2t_top, t2i_top=t2i_top, **common_args)
  embed = embed_flops(model, abstract_params, num_images=num_images, num_texts=num_texts,
                      image_size=FLAGS.image_size, text_len=FLAGS.text_len)
  print(f"\nITM rerank, model={FLAGS.model} ({FLAGS.dtype}), {num_images} images at {FLAGS.image_size} px "
        f"({image_tokens} tokens), {num_texts} captions x {FLAGS.text_len} tokens, k_test={k}, ITM batch "
        f"{FLAGS.itm_batch}, {texts_per_group} texts per cached image, cache blocks of {FLAGS.cache_block} images; "
        f"top-k lists {'of the model' if FLAGS.run else 'of random features'}")
  print(f"distinct pairs {counts['pairs']:,}; grouped slots {counts['slots_after']:,} "
        f"({100 * (counts['slots_after'] / counts['pairs'] - 1):.1f}% padding); calls {counts['calls_before']} -> "
        f"{counts['calls_after']} (+{counts['blocks']} cache blocks)")
  print(f"GFLOP per pair: {counts['per_pair_before'] / 1e9:.3f} -> {counts['per_pair_after'] / 1e9:.3f}; "
        f"cache GFLOP per image {counts['per_image_cache'] / 1e9:.3f}")
  rows = [("rerank TFLOP", counts["before"] / 1e12, counts["after"] / 1e12),
          ("evaluation TFLOP (+ embeddings)", (counts["before"] + embed) / 1e12, (counts["after"] + embed) / 1e12)]
  if run:
    rows.append(("rerank seconds (warm)", run["before"]["seconds"], run["after"]["seconds"]))
    rows.append(("rerank process CPU seconds (warm)", run["before"]["cpu"], run["after"]["cpu"]))
  print("| quantity | before (every pair) | after (image cache) | ratio |\n|---|---|---|---|")
  for name, before, after in rows:
    print(f"| {name} | {before:.4g} | {after:.4g} | {before / after:.2f}x |")
  if run:
    print(f"max |score difference| {run['max_diff']:.2e}")


if __name__ == "__main__":
  app.run(main)
