"""Train-step compute benchmark on synthetic input: img/s, model FLOPs/img, MFU, memory, compile time.

  python benchmarks/train_step.py --config=configs/albef.py --batch=128 --text_len=30 --steps=20 \
      --peak_tflops=989   # H100 SXM dense bf16

Several configs in one run (one table):
  python benchmarks/train_step.py --config=configs/albef.py,configs/mamo.py --batch=128

Model FLOPs are counted from the step's jaxpr (vlpjax/flops.py: student forward + backward,
teacher forward), with remat off (--remat=POLICY for the timed step); MFU = FLOPs/img * img/s / peak.
"""
import os
import re
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
flags.DEFINE_string("attention_impl", "", "Override config.model.vision.attention_impl ('xla', 'cudnn').")
flags.DEFINE_string("remat", "none", "Remat policy of every layer (config.model.remat: none, full, dots, "
                    "dots_all; true / false = full / none).")
flags.DEFINE_string("rules", "dp", "Sharding rule preset.")
flags.DEFINE_bool("scan_layers", None, "Override config.model.scan_layers (layers under nn.scan); unset keeps "
                  "the config's.")
flags.DEFINE_string("profile_dir", "", "If set: trace 3 more steps with jax.profiler into "
                    "PROFILE_DIR/<config>, write the compiled HLO there and print the device "
                    "ops that take the most time (per step).")
flags.DEFINE_integer("profile_top", 40, "Device ops to print with --profile_dir.")
flags.DEFINE_string("timing_lock", "", "A file to hold an exclusive lock on while timing: several "
                    "benchmark processes then compile in parallel (CPU) and take turns on the "
                    "accelerator (benchmarks/gpu_all.sh).")
FLAGS = flags.FLAGS


def bench_one(spec: str) -> dict:
  from vlpjax import flops, sharding, state as state_lib, step as step_lib, synthetic
  from benchmarks import common

  config = common.prepare_config(spec, batch=FLAGS.batch, text_len=FLAGS.text_len, dtype=FLAGS.dtype,
                                 rules=FLAGS.rules, attention_impl=FLAGS.attention_impl,
                                 scan_layers=FLAGS.scan_layers)
  mesh = sharding.make_mesh(dict(data=-1))

  def build(remat):
    config.model.remat = remat
    setup = state_lib.setup_state(config, mesh)
    return setup, step_lib.train_step_for(setup)

  # Model FLOPs: counted with XLA attention, whose matmuls the jaxpr shows (a cuDNN call is opaque).
  attention = config.model.vision.get("attention_impl", "")
  config.model.vision.attention_impl = "xla"
  setup, step = build("none")
  batch_shapes = synthetic.batch_shapes(config, FLAGS.batch)
  flops_per_img = flops.count_flops(step.jitted, setup.abstract, batch_shapes) / FLAGS.batch
  config.model.vision.attention_impl = attention
  setup, step = build(FLAGS.remat)
  state = setup.create(0)
  batches = synthetic.SyntheticIterator(config, mesh, FLAGS.batch, seed=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, next(batches)).compile()
  compile_s = time.perf_counter() - t0
  with _exclusive(FLAGS.timing_lock):
    return _time(spec, compiled, state, batches, compile_s, attention, config, flops_per_img)


def _exclusive(path: str):
  """A context holding an exclusive flock on `path` (no-op without one)."""
  import contextlib
  import fcntl
  if not path:
    return contextlib.nullcontext()

  @contextlib.contextmanager
  def held():
    with open(path, "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  return held()


def _time(spec, compiled, state, batches, compile_s, attention, config, flops_per_img) -> dict:
  import jax
  import numpy as np
  # The compiled executable itself runs the steps: calling `step` would compile a second time.
  for _ in range(2):
    state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  data = [next(batches) for _ in range(FLAGS.steps)]
  t0 = time.perf_counter()
  for batch in data:
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - t0
  if FLAGS.profile_dir:
    profile(spec, compiled, state, data[:3])
  img_s = FLAGS.steps * FLAGS.batch / seconds
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None:
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return dict(config=spec, device=f"{jax.device_count()}x {device.device_kind}", batch=FLAGS.batch,
              attention=attention or f"default ({'cudnn' if jax.default_backend() == 'gpu' else 'xla'})",
              dtype=config.model.dtype, remat=config.model.remat, scan=bool(config.model.scan_layers), img_s=img_s,
              gflop_img=flops_per_img / 1e9,
              mfu=flops_per_img * img_s / (FLAGS.peak_tflops * 1e12 * jax.device_count()),
              peak_gib=peak / 2**30, compile_s=compile_s, loss=float(np.asarray(metrics["loss"])))


def _scope(op_name: str) -> str:
  """The model scope of a device op from JAX's name stack (HLO metadata op_name or 'tf_op'),
  layers merged (block_3 -> block_*), backward-pass ops marked 'bwd:'."""
  parts = [re.sub(r"_\d+$", "_*", p) for p in op_name.split("/") if p and not p.startswith(
      ("jit(", "pjit(", "jvp(", "transpose(", "remat", "checkpoint", "while", "body", "cond"))]
  return ("bwd:" if "transpose(" in op_name else "") + "/".join(parts[:3])


def _hlo_op_names(hlo: str) -> dict:
  """HLO instruction name -> its metadata op_name (JAX's name stack)."""
  pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"", re.M)
  return {m.group(1): m.group(2) for m in pattern.finditer(hlo)}


def profile(spec: str, compiled, state, batches) -> None:
  """Trace len(batches) steps, save the trace and HLO, print the costliest device ops."""
  import glob
  import gzip
  import json
  import jax
  from jax.profiler import ProfileData

  directory = os.path.join(FLAGS.profile_dir, "".join(c if c.isalnum() else "_" for c in spec))
  os.makedirs(directory, exist_ok=True)
  hlo = compiled.as_text()
  with gzip.open(os.path.join(directory, "hlo.txt.gz"), "wt") as f:
    f.write(hlo)
  op_names = _hlo_op_names(hlo)
  jax.profiler.start_trace(directory)
  for batch in batches:
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))[-1]
  data = ProfileData.from_file(path)
  ops, scopes, lines = {}, {}, {}
  accelerator = any(p.name.startswith(("/device:GPU", "/device:TPU")) for p in data.planes)
  for plane in data.planes:
    # GPU kernels sit on the device plane's stream lines (inside CUDA graphs, named after their
    # HLO fusion with '_' for '.'; library GEMMs keep cuBLAS's names); the CPU backend runs
    # them on host threads (events with an 'hlo_op' stat).
    if not plane.name.startswith(("/device:GPU", "/device:TPU") if accelerator else "/host:CPU"):
      continue
    for line in plane.lines:
      lines[line.name] = lines.get(line.name, 0) + sum(1 for _ in line.events)
      if accelerator and line.name == "XLA Modules":
        continue
      for event in line.events:
        stats = dict(event.stats)
        if not accelerator and "hlo_op" not in stats:
          continue
        name = event.name if accelerator else str(stats["hlo_op"])
        op_name = op_names.get(name) or op_names.get(re.sub(r"_(\d+)$", r".\1", name)) or ""
        scope = _scope(op_name) if op_name else "(no HLO name) " + name[:48]
        entry = ops.setdefault(name, {"ns": 0.0, "count": 0, "scope": scope})
        entry["ns"] += event.duration_ns
        entry["count"] += 1
        total_scope = scopes.setdefault(scope, {"ns": 0.0, "count": 0})
        total_scope["ns"] += event.duration_ns
        total_scope["count"] += 1
  steps = len(batches)
  total = sum(e["ns"] for e in ops.values()) or 1.0
  with open(os.path.join(directory, "ops.json"), "w") as f:
    json.dump({"steps": steps, "lines": lines, "ops": ops, "scopes": scopes}, f)
  print(f"profile of {spec}: {total / steps / 1e6:.2f} ms of device ops per step; lines {lines}")
  print("| op | ms/step | % | count/step | scope |")
  for name, e in sorted(ops.items(), key=lambda kv: -kv[1]["ns"])[:FLAGS.profile_top]:
    print(f"| {name[:60]} | {e['ns'] / steps / 1e6:.3f} | {100 * e['ns'] / total:.1f} | "
          f"{e['count'] // steps} | {e['scope'][:80]} |")
  print("| scope | ms/step | % |")
  for name, e in sorted(scopes.items(), key=lambda kv: -kv[1]["ns"])[:FLAGS.profile_top]:
    print(f"| {name[:100]} | {e['ns'] / steps / 1e6:.3f} | {100 * e['ns'] / total:.1f} |")


def main(argv):
  del argv
  rows = []
  for spec in FLAGS.config.split(","):
    rows.append(bench_one(spec))
    print(f"done: {rows[-1]}", flush=True)
  header = ("| config | device | batch | dtype | ViT attention | remat | scan | img/s | GFLOP/img | MFU | "
            "peak mem GiB | compile s |")
  print(header)
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['device']} | {r['batch']} | {r['dtype']} | {r['attention']} | {r['remat']} | {r['scan']} | {r['img_s']:.1f} | "
          f"{r['gflop_img']:.2f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  app.run(main)
