"""Pretraining and finetuning: `python -m vlpjax.main --config=CONFIG[:ARG] --workdir=DIR [--config.x.y=V ...]`.

CONFIG is a file of configs/ (found from any directory). ARG picks a size: nothing = the full
recipe on your data (given by path, e.g. --config.input.annotations=coco.json
--config.input.image_root=/data/images --config.input.tokenizer.path=vocab.txt), `demo` =
minutes on a CPU on the embedded demo data, `tiny` = the tests' seconds-long run; `,key=value`
pairs vary it (`demo,steps=300`, `res=384,batch=64`). Any field is overridden with
--config.<path>=<value> (e.g. --config.batch_size=256 --config.objectives.itc.queue_size=0).

Rerunning the command resumes from the workdir's last checkpoint. SIGTERM or Ctrl-C finish the
current step, write a checkpoint and exit (status 128 + signal); the rerun resumes exactly.
Config and data errors end in one line (--debug shows the traceback).

Run the same command on every host of a TPU pod slice or GPU cluster: with several processes
configured (TPU metadata, SLURM, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables) `jax.distributed.initialize()` connects them first.
"""
import os
import signal
import sys
import time

from absl import flags, logging

if __name__ == "__main__":
  # Flags exist only when this module is the program, so importing it (tests, notebooks)
  # never clashes with another entry point's flags.
  from vlpjax import config_lib
  config_lib.define_config_flag("config", lock_config=True)  # configs/ also found outside the repository
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and exports.")
  flags.mark_flags_as_required(["config", "workdir"])
  FLAGS = flags.FLAGS


def wants_distributed() -> bool:
  """True when this process is one of several (pod slice, cluster, or explicit env)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize_distributed() -> None:
  if not wants_distributed():
    return
  import jax
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO records of Orbax and TFDS internals: per-file save/restore chatter."""

  def filter(self, record):
    if record.levelno >= logging.logging.WARNING:
      return True
    return not any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/", "/jax/_src/"))


def main(argv):
  del argv
  start = time.time()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Validate before TensorFlow or JAX touch any device: a bad key fails in milliseconds.
  from vlpjax import config_lib
  config_lib.validate(FLAGS.config)
  initialize_distributed()
  import jax
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data must not grab accelerator memory
  from vlpjax import train
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(summary(results, time.time() - start, FLAGS.workdir))
  if results.get("stopped_by"):
    sys.exit(128 + int(getattr(signal, results["stopped_by"])))


def summary(results: dict, seconds: float, workdir: str) -> str:
  """The closing lines: what happened, the eval numbers, the wall time."""
  step = results.get("step")
  if results.get("complete"):
    head = f"run already complete at step {step}; nothing to do ({workdir})"
  elif results.get("stopped_by"):
    head = f"stopped by {results['stopped_by']} at step {step}; the rerun of this command resumes from there"
  else:
    head = f"finished at step {step} ({workdir})"
  lines = [head]
  prefixes = sorted({k.split("/")[0] for k in results if k.startswith("eval")})
  for prefix in prefixes:
    shown = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(prefix + "/") and isinstance(v, float)}
    if "r_mean" in shown:
      keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
      lines.append(f"{prefix}: " + ", ".join(f"{k}={shown[k]:.2f}" for k in keys if k in shown)
                   + (f" ({int(shown.get('num_images', 0))} images, {int(shown.get('num_texts', 0))} captions)"
                      if "num_images" in shown else ""))
    else:
      lines.append(f"{prefix}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
  lines.append(f"wall time {seconds / 60:.1f} min")
  return "\n".join(lines)


if __name__ == "__main__":
  from vlpjax import cli
  cli.run(main, __doc__ + "\nConfigs:\n" + cli.config_listing())
