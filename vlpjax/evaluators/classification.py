"""Classification evaluation (SNLI-VE, NLVR2): accuracy, per-class accuracy, confusion counts.

Protocol (docs/method_spec.md Appendix G): accuracy of the argmax prediction over the examples of the
split. The model kind picks the forward: `ve` -> `cls_logits(image, ...)`, `nlvr` ->
`nlvr_logits(image0, image1, ...)`. Batches are the fixed-size padded batches of
`input_pipeline.tasks.make_eval_data` (`label` int [B], `valid` bool [B]); predictions are
computed by one jitted function (built once per `Evaluator`) and read back at the end.
"""
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlpjax.evaluators import common
from vlpjax.models import classify as classify_models
from vlpjax.models import concepts

EVAL_KEYS = ()

CLASS_NAMES = {
    "ve": ("contradiction", "neutral", "entailment"),
    "nlvr": ("false", "true"),
}


def accuracy_metrics(predictions, labels, num_classes: int,
                     class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
  """Accuracy, per-class accuracy and confusion counts of predicted vs true classes.

  Args:
    predictions, labels: int [N] class indices in [0, num_classes).
    num_classes: C.
    class_names: C names for the keys (default 'class0', 'class1', ...).

  Returns:
    'accuracy': 100 * mean(predictions == labels);
    'num_examples': N;
    'class_accuracy/<name>': 100 * #(label = c, prediction = c) / #(label = c), NaN for a class
      without examples;
    'confusion/<true>_as_<predicted>': the count of examples of class <true> predicted as
      <predicted> (C * C keys, row-major).

  Raises:
    ValueError: no examples, mismatched lengths, or a class index outside [0, C).
  """
  predictions = np.asarray(predictions).astype(np.int64).ravel()
  labels = np.asarray(labels).astype(np.int64).ravel()
  names = list(class_names) if class_names is not None else [f"class{c}" for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"accuracy_metrics: {len(names)} class names for {num_classes} classes")
  if predictions.shape != labels.shape or not labels.size:
    raise ValueError(f"accuracy_metrics: needs equally many (> 0) predictions and labels; got "
                     f"{predictions.shape[0]} and {labels.shape[0]}")
  for what, values in (("labels", labels), ("predictions", predictions)):
    if values.min() < 0 or values.max() >= num_classes:
      raise ValueError(f"accuracy_metrics: {what} outside [0, {num_classes}): {sorted(set(values.tolist()))}")
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  out = {"accuracy": 100.0 * float(np.trace(confusion)) / labels.size, "num_examples": float(labels.size)}
  for c, name in enumerate(names):
    total = confusion[c].sum()
    out[f"class_accuracy/{name}"] = 100.0 * float(confusion[c, c]) / total if total else float("nan")
  for t, true_name in enumerate(names):
    for p, predicted_name in enumerate(names):
      out[f"confusion/{true_name}_as_{predicted_name}"] = float(confusion[t, p])
  return out


def model_task(model) -> str:
  """'ve' or 'nlvr' from the model class; ValueError for any other model."""
  if isinstance(model, classify_models.NLVRModel):
    return "nlvr"
  if isinstance(model, classify_models.VEModel):
    return "ve"
  raise ValueError(f"classification evaluation needs config.model.kind 've' or 'nlvr'; "
                   f"got {type(model).__name__}")


def make_predict_fn(model, mesh: Optional[Mesh] = None):
  """Jitted `predict(params, batch) -> int32 [B]` argmax class, and the batch keys it reads.

  With a `mesh` the predictions are replicated, so every process can read them.
  """
  task = model_task(model)
  if task == "nlvr":
    keys = ("image0", "image1", "text_ids", "text_mask")

    def logits(params, batch):
      return model.apply({"params": params}, batch["image0"], batch["image1"], batch["text_ids"],
                         batch["text_mask"], **concepts.batch_concepts(batch, pair=True), method=model.nlvr_logits)
  else:
    keys = ("image", "text_ids", "text_mask")

    def logits(params, batch):
      return model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_mask"],
                         **concepts.batch_concepts(batch), method=model.cls_logits)

  def predict(params, batch):
    return jnp.argmax(logits(params, batch), axis=-1).astype(jnp.int32)

  return jax.jit(common.with_replicated_outputs(predict, mesh)), keys


def _predict_all(predict, keys: Sequence[str], params, batches: Iterable[dict], mesh: Optional[Mesh]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`predict_all` with a given jitted `predict` (from `make_predict_fn`) and placed params."""
  predictions, labels, valid, indices = [], [], [], []
  # The concept strings (ViCHA) go in when the batches carry them.
  for inputs, batch in common.device_batches(batches, keys, mesh, "classification evaluation", host_keys=("label",),
                                             optional=concepts.CONCEPT_KEYS + concepts.PAIR_CONCEPT_KEYS):
    predictions.append(common.settle(predict(params, inputs)))
    labels.append(np.asarray(batch["label"]))
    valid.append(np.asarray(batch["valid"]).astype(bool))
    indices.append(np.asarray(batch["index"]) if "index" in batch else np.full([len(valid[-1])], -1))
  if not valid:
    raise ValueError("classification evaluation: no batches")
  valid = np.concatenate(valid)
  predictions = np.concatenate([np.asarray(p) for p in predictions])
  indices = np.concatenate(indices)[valid]
  if np.any(indices < 0):
    indices = np.arange(int(valid.sum()))
  return predictions[valid], np.concatenate(labels)[valid], indices


def predict_all(model, params, batches: Iterable[dict], mesh: Optional[Mesh] = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Predictions, batch labels and example indices of the valid rows of fixed-size padded batches.

  Args:
    model: a `VEModel` or `NLVRModel`; params: its params (kept in their sharding when on the mesh).
    batches: dicts with the model inputs, `label` int [B], `valid` bool [B] and optionally
      `index` int [B] (the example's row in the split).
    mesh: optional; every batch is split over its batch axes (B must divide).

  Returns:
    (predictions, labels, indices): int [num_valid] each, valid rows in batch order; indices are
    the batches' `index` (or the valid rows' running position when the batches have none).
  """
  predict, keys = make_predict_fn(model, mesh)
  return _predict_all(predict, keys, common.place_params(params, mesh), batches, mesh)


def _metrics(model, predictions, labels, indices, true_labels=None) -> dict[str, float]:
  if true_labels is not None:
    labels = np.asarray(true_labels)[indices]
  names = CLASS_NAMES[model_task(model)]
  num_classes = model.config.num_classes
  return accuracy_metrics(predictions, labels, num_classes, names if len(names) == num_classes else None)


def evaluate(model, params, batches: Iterable[dict], *, true_labels=None,
             mesh: Optional[Mesh] = None) -> dict[str, float]:
  """`accuracy_metrics` of the model's argmax predictions on the valid rows of `batches`.

  Args:
    model, params, batches, mesh: as `predict_all`.
    true_labels: optional int [N], the ground truth of example i of the split (the eval data's
      `labels`), looked up by each valid row's `index`; default the batches' `label`. A row the
      input pipeline could not read arrives all zero, its `label` included; the split's labels
      keep its true class.
  """
  return _metrics(model, *predict_all(model, params, batches, mesh), true_labels=true_labels)


# ----------------------------------------------------------------------------- evaluator contract


class Evaluator(common.Evaluator):
  """Classification metrics on `config.eval.split` of `config.input`: data and `predict` built once.

  Every process scores the whole split (`make_eval_data` with its default single process).
  `data`: optional eval data with the `tasks.make_eval_data` contract (batches(), num_examples,
  optionally labels).
  """

  def make_functions(self):
    self._predict, self._keys = make_predict_fn(self.model, self.mesh)
    return dict(predict=self._predict)

  def make_data(self):
    from input_pipeline import tasks
    return tasks.make_eval_data(self.config.input, split=self.config.eval.split, batch_size=self.batch_size)

  def evaluate(self, params) -> dict[str, float]:
    data = self.data
    results = _metrics(self.model, *_predict_all(self._predict, self._keys, params, data.batches(), self.mesh),
                       true_labels=getattr(data, "labels", None))
    if results["num_examples"] != data.num_examples:
      raise ValueError(f"classification evaluation: {int(results['num_examples'])} valid rows in the batches, "
                       f"but the split has {data.num_examples} examples")
    return results


def run(config, model, params, *, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """One-off `Evaluator(config, model, mesh)(params)` (evaluator contract)."""
  return Evaluator(config, model, mesh)(params)


def format_results(results: dict[str, float]) -> str:
  """Accuracy line, per-class accuracies, and the confusion matrix (rows true, columns predicted)."""
  names = [k.split("/", 1)[1] for k in results if k.startswith("class_accuracy/")]
  lines = [f"accuracy {results['accuracy']:.2f}  ({int(results['num_examples'])} examples)",
           "per class: " + "  ".join(f"{n} {results[f'class_accuracy/{n}']:.2f}" for n in names)]
  corner = "true/pred"
  width = max([len(n) for n in names] + [len(corner)])
  lines.append(f"{corner:>{width}}  " + "  ".join(f"{n:>{width}}" for n in names))
  for t in names:
    row = "  ".join(f"{int(results[f'confusion/{t}_as_{p}']):>{width}d}" for p in names)
    lines.append(f"{t:>{width}}  {row}")
  return "\n".join(lines)
