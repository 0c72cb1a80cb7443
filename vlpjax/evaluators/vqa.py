"""VQA evaluation: answer prediction (ALBEF ranking or classifier argmax) and the official VQA accuracy.

Prediction (docs/method_spec.md §1.4):
  generate mode (ALBEF `rank_answer`): fuse the question with the image; run the answer decoder
  on `[CLS]` alone and read the probability of every candidate's first token
  (`candidate_ids[:, 1]`); keep the `k_test` candidates with the highest one; score each of them
  by its full-sequence log-likelihood sum_t log p(token_t | tokens_<t, question) over the
  tokens after `[CLS]` (its final `[SEP]` included) and, as ALBEF does, add the first token's
  log-probability once more (docs/method_spec.md App. H #15; `rank_fix=True` leaves it out); the answer
  is the best-scoring candidate.
  classify mode: argmax of the classifier head; class c is `answer_list[c]`.
Everything runs in fixed-shape jitted batches; only the chosen candidate index per question
comes back to the host, once, at the end. An `Evaluator` builds the data, the jitted predict and
the replicated candidates once and reuses them at every evaluation.

Accuracy (`vqa_accuracy`, `config.eval.vqa_metric`), per question, with 10 ground-truth answers:
  acc = (1 / 10) sum_i min(1, #{j != i : gt_j == prediction} / 3)
(the mean over the 10 leave-one-annotator-out subsets), reported in percent. What is compared:
  'official' (default): the current GT-Vision-Lab/VQA `vqaEval.py` (2021, "fixed processing
    answers bug"). Every answer is stripped of surrounding
    whitespace (newlines and tabs count). When the stripped ground-truth answers are unanimous,
    nothing else is done, to the prediction either ("Yes", "yes." and "two" score 0 against ten
    "yes" / "2"); otherwise the ground-truth answers and the prediction all get the full
    `normalize_answer` (punctuation, lower case, number words, articles, contractions).
  'albef2016': the 2016 copy that ALBEF and LAVIS ship (their papers' numbers): the prediction
    always gets the full normalisation; the ground-truth answers, as written (not stripped),
    get the punctuation step only, and only when they are not all equal.
"""
import json
import os
import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlpjax.evaluators import common
from vlpjax.models import concepts as concepts_lib
from vlpjax.objectives import vqa as vqa_objectives

# ----------------------------------------------------------------------------- official normalisation

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
# The official pattern, typo included: "(?!<=\d)" is a lookahead, not a lookbehind, so every
# period not followed by a digit is removed ("3." -> "3", "3.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official code passes re.UNICODE as `count` of re.sub: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = 32


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`.

  Each punctuation mark is deleted when the text has it next to a space or contains a
  digit-comma-digit group ("1,000"), and replaced by a space otherwise ("left-hand" ->
  "left hand"); then periods not followed by a digit are deleted.
  """
  out = text
  has_digit_comma = _COMMA_STRIP.search(text) is not None
  for mark in _PUNCTUATION:
    if mark + " " in text or " " + mark in text or has_digit_comma:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`: lower case, number words 0-10 -> digits, articles
  dropped, contractions written with their apostrophe ("dont" -> "don't"), single spaces."""
  words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  words = [word for word in words if word not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
  """A predicted answer as the official evaluation compares it ("Two" -> "2", "a dog." -> "dog")."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


VQA_METRICS = ("official", "albef2016")


def _strip(answer: str) -> str:
  return answer.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(prediction: str, gt: Sequence[str]) -> float:
  """(1 / n) sum_i min(1, #{j != i : gt_j == prediction} / 3)."""
  matches = sum(answer == prediction for answer in gt)
  # Leaving out annotator i removes one match exactly when gt_i itself matches.
  return sum(min(1.0, (matches - (answer == prediction)) / 3.0) for answer in gt) / len(gt)


def check_metric(metric: str) -> str:
  if metric not in VQA_METRICS:
    raise ValueError(f"config.eval.vqa_metric={metric!r}: must be one of {list(VQA_METRICS)}")
  return metric


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], metric: str = "official") -> float:
  """VQA accuracy of one question, in [0, 1], by `metric` (see the module doc for what each compares).

  For VQA's 10 answers, 0/1/2/3/>=4 matches give 0 / 0.3 / 0.6 / 0.9 / 1. A question with a
  single ground-truth answer (Visual Genome style) has no annotator subsets (both official codes
  score it 0 whatever the prediction); here it is scored, in either metric, by exact match of the
  fully normalised prediction and answer.

  Raises:
    ValueError: no ground-truth answer (a test question), or an unknown metric.
  """
  check_metric(metric)
  if not gt_answers:
    raise ValueError("vqa_accuracy: the question has no ground-truth answers")
  if len(gt_answers) == 1:
    return float(normalize_answer(prediction) == normalize_answer(gt_answers[0]))
  if metric == "official":
    prediction, gt = _strip(prediction), [_strip(answer) for answer in gt_answers]
    if len(set(gt)) > 1:
      prediction, gt = normalize_answer(prediction), [normalize_answer(answer) for answer in gt]
  else:
    prediction, gt = normalize_answer(prediction), list(gt_answers)
    if len(set(gt)) > 1:
      gt = [process_punctuation(answer) for answer in gt]
  return _leave_one_out(prediction, gt)


def accuracy_metrics(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]],
                     answer_types: Optional[Sequence[str]] = None,
                     metric: str = "official") -> dict[str, float]:
  """VQA accuracy in percent over the questions that have ground-truth answers.

  Args:
    predictions: the predicted answer of every question.
    gt_answers: the ground-truth answers of every question (empty for test questions).
    answer_types: optional type of every question ("yes/no", "number", "other").
    metric: 'official' or 'albef2016' (`vqa_accuracy`).

  Returns:
    num_questions, num_scored (questions with answers) and, when num_scored > 0, `accuracy` and
    `accuracy_<type>` per answer type (non-alphanumerics of the type replaced by "_").
  """
  check_metric(metric)
  if len(predictions) != len(gt_answers):
    raise ValueError(f"VQA accuracy: {len(predictions)} predictions for {len(gt_answers)} questions")
  scored = [i for i, answers in enumerate(gt_answers) if answers]
  results = {"num_questions": float(len(predictions)), "num_scored": float(len(scored))}
  if not scored:
    return results
  accuracies = {i: vqa_accuracy(predictions[i], gt_answers[i], metric) for i in scored}
  results["accuracy"] = 100.0 * float(np.mean(list(accuracies.values())))
  if answer_types is not None:
    by_type: dict[str, list[float]] = {}
    for i in scored:
      by_type.setdefault(re.sub(r"\W+", "_", answer_types[i]), []).append(accuracies[i])
    for name, values in sorted(by_type.items()):
      results[f"accuracy_{name}"] = 100.0 * float(np.mean(values))
  return results


# ----------------------------------------------------------------------------- answer ranking

Decode = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def rank_candidates(decode: Decode, q_states: jax.Array, q_mask: jax.Array, candidate_ids: jax.Array,
                    candidate_mask: jax.Array, *, k: int, rank_fix: bool = False
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ALBEF's `rank_answer`: top-k candidates by first-token probability, rescored by the full sequence.

  Args:
    decode: (ids [N, La'], mask [N, La'], q_states [N, ...], q_mask [N, Lq]) -> logits
      [N, La', V], logits[:, t] predicting token t + 1 (the model's `answer_logits`).
    q_states: [Q, Lq, D] fused question states; q_mask: [Q, Lq].
    candidate_ids: int [C, La], `[CLS] answer [SEP]` then padding; candidate_mask: [C, La].
    k: candidates kept per question (clipped to C); k <= 0 keeps all C.
    rank_fix: False = ALBEF's score, which counts the first token's log-probability twice.

  Returns:
    (best [Q] int32 candidate index, top_idx [Q, k] candidates in first-token order,
     scores [Q, k] their scores):
      first[q, c] = log softmax(decode([CLS])[q, 0])[candidate_ids[c, 1]]
      top_idx = top-k of first[q] (equal values keep the lower index first)
      scores[q, j] = sum_{t >= 1, mask} log p(candidate_ids[c, t] | c_<t, q) (+ first[q, c] unless rank_fix),
        c = top_idx[q, j]
      best[q] = top_idx[q, argmax_j scores[q, j]] (the first on ties).
  """
  num_questions = q_states.shape[0]
  num_candidates, answer_len = candidate_ids.shape
  k = num_candidates if int(k) <= 0 else min(int(k), num_candidates)
  start_ids = jnp.broadcast_to(candidate_ids[:1, :1], (num_questions, 1))
  start_logits = decode(start_ids, jnp.ones_like(start_ids), q_states, q_mask)[:, 0]  # [Q, V]
  first = jax.nn.log_softmax(start_logits.astype(jnp.float32), axis=-1)[:, candidate_ids[:, 1]]  # [Q, C]
  top_first, top_idx = jax.lax.top_k(first, k)  # [Q, k]

  row_ids = candidate_ids[top_idx].reshape(num_questions * k, answer_len)
  row_mask = candidate_mask[top_idx].reshape(num_questions * k, answer_len)
  row_question = jnp.repeat(jnp.arange(num_questions), k)
  logits = decode(row_ids, row_mask, q_states[row_question], q_mask[row_question])
  scores = -vqa_objectives.answer_nll(logits, row_ids, row_mask).reshape(num_questions, k)
  if not rank_fix:
    scores = scores + top_first
  best = jnp.take_along_axis(top_idx, jnp.argmax(scores, axis=1)[:, None], axis=1)[:, 0]
  return best.astype(jnp.int32), top_idx, scores


def make_predict_fn(model, *, k_test: int = 128, rank_fix: bool = False, mesh: Optional[Mesh] = None):
  """Jitted predict(params, image, text_ids, text_mask, candidate_ids, candidate_mask) -> int32 [B].

  The answer index of every question of the batch: into the candidates (generate mode, by
  `rank_candidates`) or into the classifier's answers (classify mode; the candidates are unused).
  Memory of the rescoring pass: B * k_test * La * V float32 logits. With a `mesh` the answers are
  replicated, so every process can read them.
  """
  mode = model.config.vqa_mode

  def predict(params, image, text_ids, text_mask, candidate_ids, candidate_mask, concepts=None):
    variables = {"params": params}
    q_states = model.apply(variables, image, text_ids, text_mask, **(concepts or {}), method=model.vqa_encode)
    if mode == "classify":
      logits = model.apply(variables, q_states[:, 0], method=model.vqa_logits)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def decode(ids, mask, states, states_mask):
      return model.apply(variables, ids, mask, states, states_mask, method=model.answer_logits)

    return rank_candidates(decode, q_states, text_mask, candidate_ids, candidate_mask, k=k_test,
                           rank_fix=rank_fix)[0]

  return jax.jit(common.with_replicated_outputs(predict, mesh))


BATCH_KEYS = ("image", "text_ids", "text_mask")


def _predict_answers(predict, params, batches, candidates, num_questions: int, mesh: Optional[Mesh]
                     ) -> np.ndarray:
  """`predict_answers` with a given jitted `predict`, placed params and placed candidates."""
  predicted, rows = [], []
  for inputs, batch in common.device_batches(batches, BATCH_KEYS, mesh, "VQA evaluation", host_keys=("index",),
                                             optional=concepts_lib.CONCEPT_KEYS):
    concepts = {k: inputs[k] for k in concepts_lib.CONCEPT_KEYS if k in inputs}  # ViCHA's, if any
    predicted.append(common.settle(predict(params, *(inputs[k] for k in BATCH_KEYS), *candidates, concepts)))
    rows.append(np.where(np.asarray(batch["valid"]).astype(bool), np.asarray(batch["index"]), -1))
  if not predicted:
    raise ValueError("VQA evaluation: no batches")
  predicted = np.concatenate([np.asarray(p) for p in predicted])
  rows = np.concatenate(rows)
  keep = rows >= 0
  answers = np.full([num_questions], -1, np.int64)
  counts = np.bincount(rows[keep], minlength=num_questions)
  if len(counts) > num_questions or np.any(counts != 1):
    raise ValueError(f"VQA evaluation: every question row 0..{num_questions - 1} must appear exactly once "
                     f"in the valid batch rows; counts range {counts.min()}..{counts.max()} over "
                     f"{len(counts)} rows")
  answers[rows[keep]] = predicted[keep]
  return answers


def predict_answers(model, params, batches, candidate_ids: np.ndarray, candidate_mask: np.ndarray,
                    num_questions: int, *, k_test: int = 128, rank_fix: bool = False,
                    mesh: Optional[Mesh] = None) -> np.ndarray:
  """The predicted answer index of every question of an eval split (one-off; see `Evaluator`).

  Args:
    model, params: a VQAModel and its params (kept in their sharding when on the mesh).
    batches: fixed-size dicts image [B,H,W,3], text_ids / text_mask [B,Lq], index int [B] (the
      question row, -1 on padding), valid bool [B].
    candidate_ids, candidate_mask: int [C, La] tokenised candidate answers (generate mode).
    num_questions: the number of question rows.
    k_test, rank_fix: see `rank_candidates`.
    mesh: optional; batches are split over its batch axes, the candidates replicated.

  Returns:
    int [num_questions] answer index per question row.

  Raises:
    ValueError: a question row missing from, or repeated in, the batches.
  """
  predict = make_predict_fn(model, k_test=k_test, rank_fix=rank_fix, mesh=mesh)
  candidates = common.put_replicated((np.asarray(candidate_ids), np.asarray(candidate_mask)), mesh)
  return _predict_answers(predict, common.place_params(params, mesh), batches, candidates, num_questions, mesh)


def write_predictions(path: str, question_ids: Sequence[int], answers: Sequence[str]) -> None:
  """EvalAI / VQA result file: a JSON list of {"question_id": int, "answer": str}."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump([{"question_id": int(q), "answer": a} for q, a in zip(question_ids, answers)], f)


# ----------------------------------------------------------------------------- evaluator contract

EVAL_KEYS = ("k_test", "predictions", "rank_fix", "vqa_metric")


class Evaluator(common.Evaluator):
  """VQA accuracy on `config.eval.split` of `config.input`: data, candidates and `predict` built once.

  `config.eval`: k_test (candidates rescored per question, ALBEF 128; 0 = all; generate mode),
  predictions (a path: write the EvalAI result JSON there at every evaluation; "" = don't),
  rank_fix (bool, default False = ALBEF's scoring), vqa_metric ('official', default, or 'albef2016';
  see `vqa_accuracy`). Splits without ground-truth answers (test)
  give only the question counts; their predictions file is what the EvalAI server scores.
  `data`: optional eval data with the `tasks.make_eval_data` contract for VQA.
  """

  def make_functions(self):
    self._metric = check_metric(self.config.eval.get("vqa_metric", "official"))  # before any compute
    self._predict = make_predict_fn(self.model, k_test=int(self.config.eval.get("k_test", 128)),
                                    rank_fix=bool(self.config.eval.get("rank_fix", False)), mesh=self.mesh)
    return dict(predict=self._predict)

  def make_data(self):
    from input_pipeline import tasks
    return tasks.make_eval_data(self.config.input, split=self.config.eval.split, batch_size=self.batch_size)

  def prepare(self):
    """Checks the answers against the model and puts the candidate answers on device, replicated."""
    data, model_config = self.data, self.model.config
    if model_config.vqa_mode == "classify" and len(data.answer_list) != model_config.num_answers:
      raise ValueError(f"VQA classify mode: the eval data's answer_list has {len(data.answer_list)} answers "
                       f"but config.model.num_answers is {model_config.num_answers}")
    if model_config.vqa_mode == "classify":  # the candidates are not read; any fixed shape will do
      candidates = (np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32))
    else:
      candidates = (np.asarray(data.candidate_ids), np.asarray(data.candidate_mask))
    self._candidates = common.put_replicated(candidates, self.mesh)

  def evaluate(self, params) -> dict[str, float]:
    data = self.data
    indices = _predict_answers(self._predict, params, data.batches(), self._candidates,
                               len(data.question_ids), self.mesh)
    answers = [data.answer_list[i] for i in indices]
    path = self.config.eval.get("predictions", "")
    if path and jax.process_index() == 0:
      write_predictions(path, data.question_ids, answers)
    return accuracy_metrics(answers, data.answers, getattr(data, "answer_types", None), self._metric)


def run(config, model, params, *, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """One-off `Evaluator(config, model, mesh)(params)` (evaluator contract)."""
  return Evaluator(config, model, mesh)(params)


def format_results(results: dict[str, float]) -> str:
  """`accuracy` (and per answer type) in percent, or the question count for unscored splits."""
  if "accuracy" not in results:
    return f"{int(results.get('num_questions', 0))} questions, no ground truth (predictions only)"
  names = ["accuracy"] + sorted(k for k in results if k.startswith("accuracy_"))
  header = "  ".join(f"{name:>16}" for name in names)
  row = "  ".join(f"{results[name]:16.2f}" for name in names)
  return f"{header}\n{row}"
