"""VQA accuracy: the answer normalisation and both metrics ('official' 2021, 'albef2016').

The slow references below transcribe the two versions of GT-Vision-Lab/VQA `vqaEval.py`
`evaluate()` step by step (answers as dicts with ids, mutated in place, the leave-one-out loop
over `item != datum`), with this module's `process_punctuation` / `process_digit_article` as the
normalisation primitives (those have their own hand cases).
"""
import sys
import types

import ml_collections
import numpy as np
import pytest

import input_pipeline

from vlpjax.evaluators import vqa as vqa_eval

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"), ("2", "2"), ("a dog.", "dog"), ("dont", "don't"), ("yes!", "yes"), ("1,000", "1000"),
    ("the cat's", "cat's"), ("  Yes\n", "yes"), ("3.5", "3.5"), ("no.", "no"), ("left-hand", "left hand"),
    ("red , white", "red white"), ("An Apple", "apple"), ("ten", "10"), ("none", "0"),
    ("isnt it", "isn't it"),
    # Official quirk: a digit-comma-digit anywhere deletes every other mark instead of spacing it.
    ("1,000-2,000", "10002000"),
])
def test_normalize_answer_hand_cases(raw, expected):
  assert vqa_eval.normalize_answer(raw) == expected


# ----------------------------------------------------------------------------- slow references


def _loop(res, gts):
  accs = []
  for datum in gts:
    others = [item for item in gts if item != datum]
    accs.append(min(1, len([item for item in others if item["answer"] == res]) / 3))
  return sum(accs) / len(accs)


def _official_2021(prediction, gt_answers):
  """vqaEval.py after "fixed processing answers bug" (2021)."""
  gts = [{"answer_id": i, "answer": a} for i, a in enumerate(gt_answers)]
  for g in gts:
    g["answer"] = g["answer"].replace("\n", " ").replace("\t", " ").strip()
  res = prediction.replace("\n", " ").replace("\t", " ").strip()
  if len({g["answer"] for g in gts}) > 1:
    for g in gts:
      g["answer"] = vqa_eval.process_digit_article(vqa_eval.process_punctuation(g["answer"]))
    res = vqa_eval.process_digit_article(vqa_eval.process_punctuation(res))
  return _loop(res, gts)


def _albef_2016(prediction, gt_answers):
  """The 2016 vqaEval.py that ALBEF and LAVIS ship."""
  res = prediction.replace("\n", " ").replace("\t", " ").strip()
  res = vqa_eval.process_digit_article(vqa_eval.process_punctuation(res))
  gts = [{"answer_id": i, "answer": a} for i, a in enumerate(gt_answers)]
  if len({g["answer"] for g in gts}) > 1:
    for g in gts:
      g["answer"] = vqa_eval.process_punctuation(g["answer"])
  return _loop(res, gts)


REFERENCES = {"official": _official_2021, "albef2016": _albef_2016}
# Spellings that the normalisation, the stripping or the unanimity rule tell apart.
_VOCAB = ["yes", "Yes", "yes.", "yes!", "yes ", " yes\n", "no", "No.", "2", "two", "Two", "3", "dog", "a dog",
          "the Dog", "dont", "don't", "left-hand", "left hand", "1,000", "1000", "red,white", "it's"]


def _random_question(rng):
  kind = rng.integers(3)
  if kind == 0:  # unanimous, possibly only up to surrounding whitespace
    base = str(rng.choice(["yes", "2", "Dog", "yes!", "don't"]))
    answers = [base + str(rng.choice(["", " ", "\n", "\t "])) for _ in range(10)]
  elif kind == 1:  # a few spellings
    answers = [str(a) for a in rng.choice(rng.choice(_VOCAB, size=3, replace=False), size=10)]
  else:
    answers = [str(a) for a in rng.choice(_VOCAB, size=10)]
  return str(rng.choice(_VOCAB + answers)), answers


@pytest.mark.parametrize("metric", vqa_eval.VQA_METRICS)
def test_vqa_accuracy_matches_slow_reference_on_random_answers(metric):
  rng = np.random.default_rng(0)
  values = []
  for _ in range(600):
    prediction, answers = _random_question(rng)
    expected = REFERENCES[metric](prediction, answers)
    got = vqa_eval.vqa_accuracy(prediction, answers, metric)
    assert got == pytest.approx(expected, abs=1e-12), (metric, prediction, answers)
    values.append(expected)
  # The draw covers every accuracy level, not just 0 and 1.
  assert {round(v, 6) for v in values} >= {0.0, 0.3, 0.6, 0.9, 1.0}


def test_the_two_metrics_differ_on_the_random_draw():
  rng = np.random.default_rng(1)
  questions = [_random_question(rng) for _ in range(300)]
  differ = sum(vqa_eval.vqa_accuracy(p, a, "official") != vqa_eval.vqa_accuracy(p, a, "albef2016")
               for p, a in questions)
  assert differ > 30


# ----------------------------------------------------------------------------- hand cases


@pytest.mark.parametrize("metric,prediction", [("official", "2"), ("albef2016", "two")])
@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_by_hand(metric, prediction, matches, expected):
  # 10 annotators, `matches` of them said "2": e.g. 3 matches -> (3 * min(1, 2/3) + 7 * 1) / 10 = 0.9.
  answers = ["2"] * matches + ["3"] * (10 - matches)
  assert vqa_eval.vqa_accuracy(prediction, answers, metric) == pytest.approx(expected, abs=1e-12)


# (prediction, ground truth, official 2021, albef 2016)
HAND_CASES = [
    # Unanimous ground truth: the official code compares the stripped strings as they are.
    ("yes", ["yes"] * 10, 1.0, 1.0),
    ("Yes", ["yes"] * 10, 0.0, 1.0),
    ("yes.", ["yes"] * 10, 0.0, 1.0),
    ("two", ["2"] * 10, 0.0, 1.0),
    ("2", ["2"] * 10, 1.0, 1.0),
    (" yes \n", ["yes"] * 10, 1.0, 1.0),
    ("yes!", ["yes!"] * 10, 1.0, 0.0),        # 2016: the prediction is normalised, the answers not
    ("Dog", ["Dog"] * 10, 1.0, 0.0),
    # Trailing spaces: stripped in 2021 (one distinct answer); 2016 compares them as written.
    ("yes", ["yes "] * 10, 1.0, 0.0),
    ("yes", ["yes"] * 3 + ["yes  "] * 7, 1.0, 0.9),
    # Disagreeing answers: 2021 normalises them fully, 2016 only removes punctuation.
    ("yes", ["yes!"] * 5 + ["no"] * 5, 1.0, 0.0),  # 2016: "yes!" -> "yes " (a space, kept)
    ("No", ["no."] * 5 + ["yes"] * 5, 1.0, 1.0),
    ("yes", ["Yes"] * 5 + ["no"] * 5, 1.0, 0.0),   # mixed case: lower-cased only in 2021
    ("YES", ["Yes"] * 5 + ["no"] * 5, 1.0, 0.0),
    ("2", ["two"] * 4 + ["2"] * 3 + ["3"] * 3, 1.0, 0.9),
    ("dog", ["a dog"] * 2 + ["the dog"] * 2 + ["cat"] * 6, 1.0, 0.0),  # articles
    ("the dog", ["a dog"] * 2 + ["dog"] * 2 + ["cat"] * 6, 1.0, 0.6),
    ("don't", ["dont"] * 3 + ["no"] * 7, 0.9, 0.0),  # contractions ("dont" -> "don't")
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9, 0.9),
    ("left hand", ["left-hand"] * 4 + ["right"] * 6, 1.0, 1.0),
]


@pytest.mark.parametrize("prediction,answers,official,albef2016", HAND_CASES)
def test_hand_cases(prediction, answers, official, albef2016):
  assert vqa_eval.vqa_accuracy(prediction, answers, "official") == pytest.approx(official, abs=1e-12)
  assert vqa_eval.vqa_accuracy(prediction, answers, "albef2016") == pytest.approx(albef2016, abs=1e-12)
  # The hand values are what the transcriptions of the two official codes give.
  assert _official_2021(prediction, answers) == pytest.approx(official, abs=1e-12)
  assert _albef_2016(prediction, answers) == pytest.approx(albef2016, abs=1e-12)


def test_single_answer_and_errors():
  # One answer has no annotator subsets: exact match of both normalised forms, in both metrics.
  for metric in vqa_eval.VQA_METRICS:
    assert vqa_eval.vqa_accuracy("Two", ["two"], metric) == 1.0
    assert vqa_eval.vqa_accuracy("3", ["two"], metric) == 0.0
    with pytest.raises(ValueError, match="no ground-truth"):
      vqa_eval.vqa_accuracy("yes", [], metric)
  with pytest.raises(ValueError, match=r"config.eval.vqa_metric='vqa2'"):
    vqa_eval.vqa_accuracy("yes", ["yes"] * 10, "vqa2")
  with pytest.raises(ValueError, match=r"config.eval.vqa_metric='official2021'.*albef2016"):
    vqa_eval.accuracy_metrics(["yes"], [["yes"] * 10], metric="official2021")
  # The evaluator checks the config value before it reads any data.
  config = ml_collections.ConfigDict(dict(input={}, eval=dict(split="val", batch_size=4, vqa_metric="vqa")))
  with pytest.raises(ValueError, match="config.eval.vqa_metric='vqa'"):
    vqa_eval.run(config, model=None, params=None)
  assert "vqa_metric" in vqa_eval.EVAL_KEYS


def test_accuracy_metrics_per_type_and_unscored_questions():
  predictions = ["yes", "2", "red", "blue"]
  answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 10, []]
  results = vqa_eval.accuracy_metrics(predictions, answers, ["yes/no", "number", "other", "other"])
  np.testing.assert_allclose(results["accuracy"], 100 * (1 + 0.6 + 1) / 3)
  np.testing.assert_allclose(results["accuracy_yes_no"], 100.0)
  np.testing.assert_allclose(results["accuracy_number"], 60.0)
  assert results["num_questions"] == 4 and results["num_scored"] == 3
  unscored = vqa_eval.accuracy_metrics(["yes"], [[]])
  assert "accuracy" not in unscored and "no ground truth" in vqa_eval.format_results(unscored)
  assert "60.00" in vqa_eval.format_results(results)


def test_accuracy_metrics_follows_the_metric():
  predictions = ["Yes", "two", "no"]
  answers = [["yes"] * 10, ["2"] * 10, ["no"] * 10]
  official = vqa_eval.accuracy_metrics(predictions, answers, ["yes/no", "number", "yes/no"])
  albef = vqa_eval.accuracy_metrics(predictions, answers, ["yes/no", "number", "yes/no"], metric="albef2016")
  np.testing.assert_allclose([official["accuracy"], official["accuracy_yes_no"], official["accuracy_number"]],
                             [100 / 3, 50.0, 0.0])
  np.testing.assert_allclose([albef["accuracy"], albef["accuracy_yes_no"], albef["accuracy_number"]],
                             [100.0, 100.0, 100.0])


@pytest.mark.parametrize("eval_extra,expected", [({}, 50.0), (dict(vqa_metric="official"), 50.0),
                                                 (dict(vqa_metric="albef2016"), 100.0)])
def test_run_scores_with_the_configured_metric(monkeypatch, tmp_path, eval_extra, expected):
  # The predictions are fixed (no model); only the wiring config.eval.vqa_metric -> accuracy is tested.
  data = types.SimpleNamespace(
      question_ids=[7, 8], answer_list=["Yes", "no"], answers=[["yes"] * 10, ["no"] * 10],
      candidate_ids=np.zeros((2, 2), np.int32), candidate_mask=np.ones((2, 2), np.int32),
      batches=lambda: iter(()))
  fake = types.ModuleType("input_pipeline.tasks")
  fake.make_eval_data = lambda cfg, split, batch_size: data
  monkeypatch.setitem(sys.modules, "input_pipeline.tasks", fake)
  monkeypatch.setattr(input_pipeline, "tasks", fake, raising=False)
  monkeypatch.setattr(vqa_eval, "make_predict_fn", lambda *args, **kwargs: None)
  monkeypatch.setattr(vqa_eval, "_predict_answers", lambda *args, **kwargs: np.array([0, 1]))
  model = types.SimpleNamespace(config=types.SimpleNamespace(vqa_mode="generate"))
  config = ml_collections.ConfigDict(dict(input={}, eval=dict(split="val", batch_size=2, predictions="",
                                                              **eval_extra)))
  results = vqa_eval.run(config, model, params=None)
  assert results["accuracy"] == pytest.approx(expected) and results["num_scored"] == 2
