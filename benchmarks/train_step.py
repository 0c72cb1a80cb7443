"""Train-step compute benchmark on synthetic input: img/s, model FLOPs/img, MFU, memory, compile time.

  python benchmarks/train_step.py --config=configs/albef.py --batch=128 --text_len=30 --steps=20 \
      --peak_tflops=989   # H100 SXM dense bf16

Several configs in one run (one table):
  python benchmarks/train_step.py --config=configs/albef.py,configs/mamo.py --batch=128

Model FLOPs are counted from the step's jaxpr (vlpjax/flops.py: student forward + backward,
teacher forward), with remat off; MFU = FLOPs/img * img/s / peak.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("config", "configs/albef.py", "Comma-separated config files (optionally :ARG each).")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_integer("text_len", 30, "Text length in tokens.")
flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_float("peak_tflops", 989.0, "Peak dense TFLOP/s of one device for MFU (H100 SXM bf16: 989).")
flags.DEFINE_string("dtype", "", "Override the compute dtype (float32 / bfloat16).")
flags.DEFINE_bool("remat", False, "Rematerialise each layer in the backward pass.")
flags.DEFINE_string("rules", "dp", "Sharding rule preset.")
FLAGS = flags.FLAGS


def bench_one(spec: str) -> dict:
  import jax
  import numpy as np
  from vlpjax import flops, optim, sharding, state as state_lib, step as step_lib, synthetic
  from vlpjax.models import vlp

  from vlpjax import config_lib
  config = config_lib.load_config(spec)
  config.batch_size = FLAGS.batch
  config.input.max_len = FLAGS.text_len
  config.input.synthetic = True
  config.queue_size = config.queue_size - config.queue_size % FLAGS.batch
  if FLAGS.dtype:
    config.model.dtype = FLAGS.dtype
  mesh = sharding.make_mesh(dict(data=-1))
  rules = sharding.logical_rules(FLAGS.rules)

  def build(remat):
    config.model.remat = remat
    model = vlp.VLPModel(vlp.ModelConfig.from_config(config.model))
    abstract_params = jax.eval_shape(lambda: state_lib.make_init_fn(model, __import__("optax").identity(), 0)(
        jax.random.PRNGKey(0)).params)
    tx, schedule = optim.make_optimizer(config.optim, params=abstract_params, total_steps=1000, steps_per_epoch=100)
    abstract, shardings = state_lib.abstract_state(model, tx, config.queue_size, mesh, rules)
    step = step_lib.make_train_step(model, tx, config, mesh=mesh, rules=rules, state_shardings=shardings,
                                    schedule=schedule, alpha_ramp_steps=100)
    return model, tx, abstract, shardings, step

  model, _, abstract, _, step = build(False)
  batch_shapes = synthetic.batch_shapes(config, FLAGS.batch)
  flops_per_img = flops.count_flops(step.jitted, abstract, batch_shapes) / FLAGS.batch
  model, tx, abstract, shardings, step = build(FLAGS.remat)
  state = state_lib.create_state(model, tx, config.queue_size, shardings, jax.random.PRNGKey(0))
  batches = synthetic.SyntheticIterator(config, mesh, FLAGS.batch, seed=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, next(batches)).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  data = [next(batches) for _ in range(FLAGS.steps)]
  t0 = time.perf_counter()
  for batch in data:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - t0
  img_s = FLAGS.steps * FLAGS.batch / seconds
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None:
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return dict(config=spec, device=f"{jax.device_count()}x {device.device_kind}", batch=FLAGS.batch,
              dtype=config.model.dtype, remat=FLAGS.remat, img_s=img_s,
              gflop_img=flops_per_img / 1e9,
              mfu=flops_per_img * img_s / (FLAGS.peak_tflops * 1e12 * jax.device_count()),
              peak_gib=peak / 2**30, compile_s=compile_s, loss=float(np.asarray(metrics["loss"])))


def main(argv):
  del argv
  rows = []
  for spec in FLAGS.config.split(","):
    rows.append(bench_one(spec))
    print(f"done: {rows[-1]}", flush=True)
  header = "| config | device | batch | dtype | remat | img/s | GFLOP/img | MFU | peak mem GiB | compile s |"
  print(header)
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['device']} | {r['batch']} | {r['dtype']} | {r['remat']} | {r['img_s']:.1f} | "
          f"{r['gflop_img']:.2f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  app.run(main)
