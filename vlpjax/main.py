"""Entry point: `python -m vlpjax.main --config=configs/mamo.py[:ARG] --workdir=DIR [--config.x.y=v]`.

Run the same command on every host of a TPU pod slice or GPU cluster: with several processes
configured (TPU metadata, SLURM, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables) `jax.distributed.initialize()` connects them first.
"""
import os

from absl import app, flags, logging

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
    shown = {k: round(v, 4) for k, v in results.items() if isinstance(v, float) and k.startswith("eval/")}
    print(f"final step {results.get('step')}: {shown}")


if __name__ == "__main__":
  app.run(main)
