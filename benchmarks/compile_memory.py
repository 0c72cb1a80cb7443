"""Compile time and compiled memory of full-size train steps, per remat policy, without running them.

Lowers and compiles the jitted train step on abstract inputs (nothing is allocated or run) and
prints, per config and `config.model.remat` policy: lower and compile seconds (compile also in
process CPU seconds, steadier than wall time on a shared machine) and
`compiled.memory_analysis()` (arguments, outputs, temporaries = activations and workspace,
aliased = donated state, generated code). On CPU the compile time is a proxy for the graph
size (the issue's 'before' figure for the layers-under-scan work); the memory figures are
XLA:CPU's buffer assignment, which differs from a GPU's (no cuDNN attention, other fusions), so
compare policies with each other rather than with a GPU's peak.

  nice python benchmarks/compile_memory.py --config=configs/albef.py,configs/mamo.py \
      --policies=none,full,dots,dots_all --batch=128     # full size, CPU: minutes per compile
  python benchmarks/compile_memory.py --config=configs/mamo.py:tiny --batch=16   # smoke

The step is the one `benchmarks/train_step.py` times (same config changes: synthetic input,
text length 30, queue a multiple of the batch).
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("config", "configs/albef.py,configs/mamo.py", "Comma-separated config files (optionally :ARG).")
flags.DEFINE_string("policies", "none", "Comma-separated remat policies (config.model.remat) per config.")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_integer("text_len", 30, "Text length in tokens.")
flags.DEFINE_string("dtype", "", "Override the compute dtype (float32 / bfloat16).")
flags.DEFINE_string("rules", "dp", "Sharding rule preset.")
flags.DEFINE_string("scan", "", "Comma-separated config.model.scan_layers values per policy (e.g. false,true); "
                    "empty keeps the config's.")
FLAGS = flags.FLAGS


def measure(spec: str, policy: str, scan=None) -> dict:
  import jax
  from vlpjax import sharding, state as state_lib, step as step_lib, synthetic
  from benchmarks import common

  config = common.prepare_config(spec, batch=FLAGS.batch, text_len=FLAGS.text_len, dtype=FLAGS.dtype,
                                 rules=FLAGS.rules, scan_layers=scan)
  config.model.remat = policy
  mesh = sharding.make_mesh(dict(data=-1))
  setup = state_lib.setup_state(config, mesh)
  step = step_lib.train_step_for(setup)
  batch = synthetic.batch_shapes(config, FLAGS.batch)
  t0 = time.perf_counter()
  lowered = step.lower(setup.abstract, batch)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  mem = compiled.memory_analysis()
  gib = lambda n: n / 2**30  # noqa: E731
  return dict(config=spec, policy=setup.model.config.remat, scan=setup.model.config.scan_layers, device=f"{jax.device_count()}x {jax.devices()[0].device_kind}",
              batch=FLAGS.batch, dtype=config.model.dtype, lower_s=t1 - t0, compile_s=t2 - t1, compile_cpu_s=c2 - c1,
              argument_gib=gib(mem.argument_size_in_bytes), output_gib=gib(mem.output_size_in_bytes),
              temp_gib=gib(mem.temp_size_in_bytes), alias_gib=gib(mem.alias_size_in_bytes),
              code_mib=mem.generated_code_size_in_bytes / 2**20,
              total_gib=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                            - mem.alias_size_in_bytes))


def main(argv):
  del argv
  rows = []
  from benchmarks import common
  scans = [common.parse_bool(v) for v in FLAGS.scan.split(",")] if FLAGS.scan else [None]
  for spec in FLAGS.config.split(","):
    for policy in FLAGS.policies.split(","):
      for scan in scans:
        rows.append(measure(spec, policy, scan))
        print(f"done: {rows[-1]}", flush=True)
  print("| config | remat | scan | device | batch | dtype | lower s | compile s | compile CPU s | args GiB | outputs GiB | "
        "temp GiB | aliased GiB | total GiB | code MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['policy']} | {r['scan']} | {r['device']} | {r['batch']} | {r['dtype']} | {r['lower_s']:.1f} | "
          f"{r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | {r['argument_gib']:.2f} | {r['output_gib']:.2f} | {r['temp_gib']:.2f} | "
          f"{r['alias_gib']:.2f} | {r['total_gib']:.2f} | {r['code_mib']:.1f} |")


if __name__ == "__main__":
  app.run(main)
