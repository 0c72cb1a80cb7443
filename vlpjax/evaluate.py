"""Evaluation of a checkpoint, by the kind the config names (`config.eval.kind`):

  python -m vlpjax.evaluate --config=configs/finetune_retrieval.py:flickr \
    --config.init_from.path=DIR [--workdir=DIR] [--output=results.json] [--config.x.y=v]

DIR is a params export (`<workdir>/export/<stage>`), a train checkpoint (`<workdir>/checkpoints`
or one `<step>` in it) or a `python -m vlpjax.convert` output directory. The model is built from
the config (`config.model.kind` picks a task model), its freshly initialised params are
overwritten by the checkpoint's where paths agree (`checkpoint.partial_restore` after the task
model's `remap_pretrained`, honouring `init_from.dont_load`; the loaded / skipped / new / unused
table is printed), then the eval split `config.eval.split` of `config.input` is scored by the
evaluator of `config.eval.kind` (`vlpjax/evaluators/`): retrieval (ITC all pairs + ITM rerank of
the top `k_test`; TR/IR@1/5/10, r_mean), vqa, classification (NLVR2, SNLI-VE) or grounding.
Prints the metrics, writes them as JSON (`--output`, or `<workdir>/<kind>_<split>.json`) and,
with --workdir, as TensorBoard scalars under `<workdir>/eval`.

Every process evaluates the whole split on its own devices (batches data-parallel over them).
"""
import json
import os
from typing import Any, Optional

from absl import flags, logging

if __name__ == "__main__":
  # Flags exist only when this module is the program, so importing it (tests, notebooks)
  # never clashes with another entry point's flags.
  from vlpjax import config_lib
  config_lib.define_config_flag("config", lock_config=True)  # configs/ also found outside the repository
  flags.DEFINE_string("workdir", None, "Optional directory for the JSON results and TensorBoard scalars.")
  flags.DEFINE_string("output", None, "Optional JSON results path (default <workdir>/<kind>_<split>.json).")
  flags.mark_flags_as_required(["config"])
  FLAGS = flags.FLAGS



def restore_params(config, path: str):
  """Freshly initialised params of `config.model` overwritten by those of `path`.

  Returns:
    (model, params, report): the VLPModel, host params (nested dict of np.ndarray) and the
    `checkpoint.RestoreReport`.

  Raises:
    ValueError: the checkpoint provides none of the model's params (wrong path or model size),
      or a shape mismatch (from `partial_restore`, naming the leaf).
  """
  import flax.linen as nn
  import jax
  from vlpjax import checkpoint
  from vlpjax import train
  from vlpjax.models import vlp

  model = train.build_model(config)
  init = jax.jit(lambda rng: nn.unbox(model.init({"params": rng, "dropout": rng}, *vlp.init_inputs(model.config))))
  fresh = jax.device_get(init(jax.random.PRNGKey(int(config.seed)))["params"])
  loaded = model.remap_pretrained(checkpoint.load_params(path))
  params, report = checkpoint.partial_restore(fresh, loaded, dont_load=tuple(config.init_from.get("dont_load", ())))
  if not report.loaded:
    raise ValueError(f"{path}: no parameter of the model was found in the checkpoint (its top-level keys: "
                     f"{sorted(loaded)}); is config.init_from.path the right checkpoint for this config?")
  return model, params, report


def evaluate_checkpoint(config, path: Optional[str] = None, *, workdir: Optional[str] = None,
                        verbose: bool = True) -> dict[str, Any]:
  """Metrics of the checkpoint at `path` (default `config.init_from.path`) by `config.eval.kind`.

  Args:
    config: an eval config (e.g. `config_lib.load_config("configs/finetune_retrieval.py:demo")`).
    path: the checkpoint; see the module docstring for the accepted layouts.
    workdir: optional; metrics are also written as TensorBoard scalars under `<workdir>/eval`.
    verbose: print the restore table.

  Returns:
    dict of floats; retrieval: txt_r1/5/10, img_r1/5/10, their means, r_mean, num_images, num_texts.
  """
  from vlpjax import checkpoint
  from vlpjax import config_lib
  path = path or config.init_from.get("path")
  if not path:
    raise ValueError("no checkpoint to evaluate: set config.init_from.path (--config.init_from.path=DIR)")
  if config.init_from.get("model_from_checkpoint") and path != config.init_from.get("path"):
    with config.unlocked():
      config.init_from.path = path
  checkpoint.take_model_from_checkpoint(config)
  config_lib.validate(config)
  checkpoint.check_model_compatible(path, config.model, allow=bool(config.init_from.get("allow_mismatch", False)))
  import jax
  from vlpjax import metrics as metrics_lib
  from vlpjax import evaluators
  from vlpjax import sharding as sharding_lib

  model, params, report = restore_params(config, path)
  if verbose:
    print(f"restored from {path}:\n{checkpoint.format_report(report)}", flush=True)
  mesh = sharding_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.local_devices())
  kind = config.eval.get("kind") or "retrieval"
  results = evaluators.get(kind).Evaluator(config, model, mesh)(params)
  if workdir:
    writer = metrics_lib.create_writer(workdir, process_index=jax.process_index(), collection="eval")
    writer.write_scalars(0, {f"{kind}/{k}": v for k, v in results.items()})
    writer.flush()
    writer.close()
  return results


def format_results(results: dict[str, float], kind: str = "retrieval") -> str:
  """The evaluator's short table (retrieval: TR@1 TR@5 TR@10 IR@1 IR@5 IR@10 r_mean)."""
  from vlpjax import evaluators
  return evaluators.get(kind).format_results(results)


def main(argv):
  del argv
  from vlpjax import config_lib
  config_lib.validate(FLAGS.config)  # a bad key fails before TensorFlow or JAX start
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data must not grab accelerator memory
  results = evaluate_checkpoint(FLAGS.config, workdir=FLAGS.workdir)
  split = FLAGS.config.eval.split
  kind = FLAGS.config.eval.get("kind") or "retrieval"
  print(f"{kind} on split {split!r}:\n{format_results(results, kind)}")
  output = FLAGS.output or (os.path.join(FLAGS.workdir, f"{kind}_{split}.json") if FLAGS.workdir else None)
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    extra = {k: FLAGS.config.eval[k] for k in ("k_test",) if k in FLAGS.config.eval}
    with open(output, "w") as f:
      json.dump(dict(results, checkpoint=FLAGS.config.init_from.path, split=split, kind=kind, **extra), f, indent=1)
    logging.info("wrote %s", output)
  print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
  from vlpjax import cli
  cli.run(main)
