"""Model FLOPs per image of each method's full pretraining step, counted from the jaxpr (no compile).

  python benchmarks/method_flops.py [--methods=albef,mamo,vicha,mvp,vlmixer] [--batch=8]

Each method's full recipe (`configs/<method>.py`, no arguments) is traced once on a one-device
mesh with synthetic inputs of the recipe's shapes; `vlpjax.flops` counts every dot and
convolution (forward, backward, teacher forward). Nothing is compiled or run, so this is a
CPU-only, minutes-long measurement of each method's compute relative to ALBEF: the figure
`python -m vlpjax.compare --budget=flops` equalises. For VLMixer, whose step reads two streams,
"per image" is per example of the step's global batch (text and image streams together).
"""
import os
import sys
import time

from absl import app, flags

# The repository root before benchmarks/ (benchmarks/input_pipeline.py would shadow the package).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_METHODS = flags.DEFINE_list("methods", ["albef", "mamo", "vicha", "mvp", "vlmixer"], "Methods to count.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch of the traced step (FLOPs/img do not depend on it).")


def main(argv):
  del argv
  from vlpjax import compare, config_lib
  rows = []
  for method in _METHODS.value:
    config = config_lib.load_config(f"configs/{method}.py")
    with config.unlocked():
      config.batch_size = _BATCH.value
      config.model.remat = "none"  # model FLOPs, not the rematerialised forwards
    start = time.perf_counter()
    gflops = compare.pretrain_cost(config)["gflops_per_img"]
    rows.append((method, gflops, time.perf_counter() - start))
    print(f"{method}: {gflops:.1f} GFLOP/img ({rows[-1][2]:.0f} s to trace)", flush=True)
  base = dict((m, g) for m, g, _ in rows).get("albef")
  print("| method | GFLOP/img (train step) | vs ALBEF |\n|---|---|---|")
  for method, gflops, _ in rows:
    print(f"| {method} | {gflops:.1f} | {gflops / base:.2f}x |" if base else f"| {method} | {gflops:.1f} | |")


if __name__ == "__main__":
  app.run(main)
