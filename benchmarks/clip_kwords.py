"""Speed of ViCHA's concept scoring (`input_pipeline.concepts.ConceptScorer`) and the CLIP port's
float32 agreement with transformers' CLIPModel at full size, on random weights:

  python benchmarks/clip_kwords.py                         # CLIP ViT-B/16, 10k words (accelerator)
  python benchmarks/clip_kwords.py --model=tiny --images=64 --batches=8,16 --words=300   # CPU smoke

Part 1 (parity, --parity): one CLIP ViT-B/16 from transformers (random init, float32, on the CPU)
and the Flax port of the same weights; relative L2 error of both towers' embeddings at JAX's
default float32 matmul precision and at 'highest' (TF32 on GPUs makes the default differ).
Part 2: text tower over the vocabulary once, then the image tower + cosine top-15 over
--images random images per batch size and dtype (host arrays, transfer included), after a
compile call: images/s and MFU against --peak_tflops (the image fn's XLA-counted FLOPs).
Images come as preprocessed arrays: decoding (tf.data, CPU) is not timed here.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_enum("model", "b16", ["b16", "tiny"], "b16: CLIP ViT-B/16 (OpenAI's shapes); tiny: a CPU smoke model.")
flags.DEFINE_integer("words", 10_000, "Vocabulary size (random token ids, 1-4 BPE tokens a word).")
flags.DEFINE_integer("images", 8192, "Images timed per setting.")
flags.DEFINE_list("batches", ["256", "1024"], "Image batch sizes.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_bool("parity", True, "Compare with transformers' CLIPModel first (needs torch + transformers).")
flags.DEFINE_float("peak_tflops", 989.0, "Dense bf16 peak of the chip, for MFU (H100 / H200 SXM: 989).")
FLAGS = flags.FLAGS


def clip_config(name: str):
  from vlpjax.models import clip as clip_model
  if name == "b16":
    return clip_model.ClipConfig(
        vision=clip_model.ClipVisionConfig(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                                           mlp_dim=3072),
        text=clip_model.ClipTextConfig(text_pool="argmax"), embed_dim=512)
  return clip_model.ClipConfig(
      vision=clip_model.ClipVisionConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128),
      text=clip_model.ClipTextConfig(vocab_size=1000, width=64, depth=2, num_heads=2, mlp_dim=128, eos_token_id=999,
                                     bos_token_id=998, text_pool="argmax"), embed_dim=32)


class RandomWords:
  """A tokenizer stand-in: word i -> 1..4 fixed random ids (below the start / end tokens)."""

  def __init__(self, cfg, words: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    self.bos_id, self.eos_id = cfg.text.vocab_size - 2, cfg.text.vocab_size - 1
    self.ids = [list(rng.integers(1, self.bos_id, rng.integers(1, 5))) for _ in range(words)]
    self.words = [str(i) for i in range(words)]

  def encode(self, word: str):
    return self.ids[int(word)]

  def tokenize(self, texts, length):
    import numpy as np
    ids = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      tokens = [self.bos_id] + self.encode(text)[:length - 2] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
    return ids, (ids > 0).astype(np.int32)


def parity(cfg) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from vlpjax.convert import clip as clip_convert
  from vlpjax.models import clip as clip_model
  hf_config = transformers.CLIPConfig(
      text_config=dict(vocab_size=cfg.text.vocab_size, hidden_size=cfg.text.width, intermediate_size=cfg.text.mlp_dim,
                       num_hidden_layers=cfg.text.depth, num_attention_heads=cfg.text.num_heads,
                       max_position_embeddings=cfg.text.context_length, eos_token_id=2,
                       bos_token_id=cfg.text.bos_token_id, pad_token_id=0),
      vision_config=dict(hidden_size=cfg.vision.width, intermediate_size=cfg.vision.mlp_dim,
                         num_hidden_layers=cfg.vision.depth, num_attention_heads=cfg.vision.num_heads,
                         image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size),
      projection_dim=cfg.embed_dim)
  torch.manual_seed(0)
  model = transformers.CLIPModel(hf_config).eval()
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  _, params, report = clip_convert.convert_state_dict(state, cfg)
  assert not report.failures(), report.table()
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(8, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.text.vocab_size - 2, (8, 20)).astype(np.int32)
  ids[:, 12] = cfg.text.vocab_size - 1
  ids[:, 13:] = 0
  mask = (ids > 0).astype(np.int32)
  mask[:, 13:] = 0
  with torch.no_grad():
    ref_text = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                       attention_mask=torch.tensor(mask)).pooler_output.numpy()
    ref_image = model.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
  port = clip_model.CLIP(cfg)
  for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision):
      text = jax.jit(lambda p, i, m: port.apply({"params": p}, i, m, method=port.encode_text))(params, ids, mask)
      image = jax.jit(lambda p, x: port.apply({"params": p}, x, method=port.encode_image))(params, jnp.asarray(pixels))
    for name, ours, ref in (("text", text, ref_text), ("image", image, ref_image)):
      rel = np.linalg.norm(np.asarray(ours) - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
      print(f"parity {jax.default_backend()} precision={precision:8s} {name:5s}: max relative L2 error {rel.max():.2e}")


def main(argv):
  del argv
  import jax
  import numpy as np
  from vlpjax.models import clip as clip_model
  from input_pipeline import concepts
  cfg = clip_config(FLAGS.model)
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  if FLAGS.parity:
    parity(cfg)
  params = clip_model.init_params(cfg)
  words = RandomWords(cfg, FLAGS.words)
  rows = []
  for dtype in FLAGS.dtypes:
    for batch in map(int, FLAGS.batches):
      start = time.perf_counter()
      scorer = concepts.ConceptScorer.create(cfg, params, words, words.words, batch_size=batch, dtype=dtype)
      jax.block_until_ready(scorer.text_feats)
      text_s = time.perf_counter() - start
      images = np.random.default_rng(0).normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
      images = images.astype(np.float32)
      jax.block_until_ready(scorer.top_k(images))  # compile
      flops = scorer.image_fn.lower(scorer.params, images, scorer.text_feats).compile().cost_analysis()
      flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan")) / batch
      steps = max(1, FLAGS.images // batch)
      start = time.perf_counter()
      outs = [scorer.top_k(images) for _ in range(steps)]
      jax.block_until_ready(outs)
      seconds = time.perf_counter() - start
      rate = steps * batch / seconds
      rows.append((dtype, batch, text_s, rate, flops / 1e9, rate * flops / (FLAGS.peak_tflops * 1e12) * 100))
  print(f"| dtype | batch | text tower, {FLAGS.words} words + compile (s) | images/s | GFLOPs/img | MFU % |")
  print("|---|---|---|---|---|---|")
  for dtype, batch, text_s, rate, gflops, mfu in rows:
    print(f"| {dtype} | {batch} | {text_s:.1f} | {rate:,.0f} | {gflops:.1f} | {mfu:.1f} |")


if __name__ == "__main__":
  app.run(main)
