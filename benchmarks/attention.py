"""Attention kernel micro-benchmark: XLA's composed attention vs the cuDNN fused kernel, forward +
backward, at the shapes of the ALBEF pretraining step (ViT-B/16 at 256 px: 257 tokens; BERT
text: 30 tokens; 12 heads of 64), bf16. cuDNN's training kernels refuse ViT's odd 257 tokens;
`layers.padded_dot_product_attention` pads them (to 264 or 320, padded keys masked) and is
timed too (the FLOP rate counts the unpadded work).

  python benchmarks/attention.py            # GPU; prints one table

Tells whether the attention implementation is worth switching in the train step (a candidate
for the low MFU recorded in docs/benchmarks.md).
"""
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlpjax.models import layers  # noqa: E402


def bench(fn, *args, repeats=50):
  out = jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def main():
  rows = []
  for name, batch, length in (("vit 257 tokens", 128, 257), ("vit 257 tokens", 256, 257),
                              ("text 30 tokens", 128, 30)):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (batch, length, 12, 64), jnp.bfloat16) for key in keys)
    flops = 4 * batch * 12 * length * length * 64 * 3  # fwd (2 matmuls) + bwd (4) = 3x fwd
    variants = [("xla", None), ("cudnn", None)]
    if length % 8:
      variants += [("cudnn padded to x8", 8), ("cudnn padded to x64", 64)]
    for impl, multiple in variants:
      def loss(q, k, v, impl=impl, multiple=multiple):
        if multiple:
          out = layers.padded_dot_product_attention(q, k, v, multiple=multiple, implementation="cudnn")
        else:
          out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return out.astype(jnp.float32).sum()
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        seconds = bench(step, q, k, v)
        rows.append((name, batch, impl, seconds * 1e3, flops / seconds / 1e12))
      except Exception as e:  # cuDNN may refuse a shape; say so in the table
        rows.append((name, batch, impl, float("nan"), float("nan")))
        print(f"{impl} failed for {name} B={batch}: {type(e).__name__}: {str(e)[:200]}")
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| shape | batch | implementation | ms (fwd+bwd) | TFLOP/s |\n|---|---|---|---|---|")
  for name, batch, impl, ms, tflops in rows:
    print(f"| {name} | {batch} | {impl} | {ms:.3f} | {tflops:.1f} |")


if __name__ == "__main__":
  main()
