"""VQA: model (answer decoder / classifier), objectives, ranking inference and the official accuracy."""
import json
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from vlpjax import config_lib, optim, sharding, state as state_lib, step as step_lib
from vlpjax.evaluators import vqa as vqa_eval
from vlpjax.models import vlp
from vlpjax.models import vqa as vqa_model
from vlpjax.objectives import context as context_lib
from vlpjax.objectives import registry
from vlpjax.objectives import vqa as vqa_obj

VOCAB = 64
CLS_ID, SEP_ID = 2, 3
NUM_ANSWERS = 7


def _model_cfg(mode="generate", dropout=0.0, answer_layers=0) -> dict:
  text = dict(common.tiny_text(VOCAB), dropout=dropout, attention_dropout=dropout)
  return dict(kind="vqa", vqa_mode=mode, num_answers=NUM_ANSWERS, answer_layers=answer_layers,
              vision=common.tiny_vision(32), text=text, fusion="cross", embed_dim=16,
              heads=("itc", "itm", "mlm"), dtype="float32")


def _init(model, seed=0):
  inputs = vlp.init_inputs(model.config)
  init = jax.jit(lambda rng: nn.unbox(model.init({"params": rng, "dropout": rng}, *inputs)))
  return init(jax.random.PRNGKey(seed))["params"]


def _perturbed(params, seed, scale=0.02):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def generate():
  """(model, params, teacher params) of a tiny generate-mode VQA model without dropout."""
  model = vlp.build_model(_model_cfg())
  params = _init(model)
  return model, params, _perturbed(params, 1)


def _token_rows(rng, rows, length, max_tokens, sep=True):
  """[CLS] t1..tn ([SEP]) then padding, n in [1, max_tokens]: (ids, mask) int32 [rows, length]."""
  ids = np.zeros((rows, length), np.int32)
  for r in range(rows):
    n = rng.integers(1, max_tokens + 1)
    ids[r, :n + 1 + sep] = [CLS_ID, *rng.integers(4, VOCAB, size=n)] + ([SEP_ID] if sep else [])
  return ids, (ids > 0).astype(np.int32)


def _vqa_batch(seed, batch=4, slots=3, answer_len=5, question_len=6, image_size=32):
  """A random training batch in the contract shapes; question b has 1..slots answers."""
  rng = np.random.default_rng(seed)
  q_ids, q_mask = _token_rows(rng, batch, question_len, question_len - 1, sep=False)  # ALBEF: no final [SEP]
  answer_ids = np.zeros((batch, slots, answer_len), np.int32)
  weight = np.zeros((batch, slots), np.float32)
  for b in range(batch):
    n = rng.integers(1, slots + 1)
    answer_ids[b, :n] = _token_rows(rng, n, answer_len, answer_len - 2)[0]
    counts = rng.integers(1, 5, size=n)
    weight[b, :n] = counts / 10.0
  return {
      "image": rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
      "text_ids": q_ids, "text_mask": q_mask,
      "answer_ids": answer_ids, "answer_mask": (answer_ids > 0).astype(np.int32), "answer_weight": weight,
      "image_id": np.arange(batch, dtype=np.int32),
  }


# Normalisation and accuracy: tests/test_vqa_accuracy.py.


# ----------------------------------------------------------------------------- losses


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.sum(np.exp(x)))


def _reference_row_nll(logits, ids, mask, teacher_logits=None, alpha=0.0):
  """float64 loops over rows and target positions t >= 1."""
  out = np.zeros(len(ids))
  for n in range(len(ids)):
    hard = soft = 0.0
    for t in range(1, ids.shape[1]):
      if not mask[n, t]:
        continue
      log_probs = _log_softmax(np.float64(logits[n, t - 1]))
      hard -= log_probs[ids[n, t]]
      if teacher_logits is not None:
        soft -= np.sum(np.exp(_log_softmax(np.float64(teacher_logits[n, t - 1]))) * log_probs)
    out[n] = hard if teacher_logits is None else (1 - alpha) * hard + alpha * soft
  return out


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_answer_nll_matches_loop_reference(alpha):
  rng = np.random.default_rng(1)
  ids, mask = _token_rows(rng, 6, 5, 3)
  ids[-1], mask[-1] = 0, 0  # an empty (padding) row
  logits = 3 * rng.standard_normal((6, 5, VOCAB)).astype(np.float32)
  teacher = 3 * rng.standard_normal((6, 5, VOCAB)).astype(np.float32)
  got = vqa_obj.answer_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(teacher),
                           alpha)
  np.testing.assert_allclose(got, _reference_row_nll(logits, ids, mask, teacher, alpha), rtol=1e-5)
  assert float(got[-1]) == 0.0
  hard = vqa_obj.answer_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(hard, _reference_row_nll(logits, ids, mask), rtol=1e-5)


def _context(model, params, ema_params, batch, alpha=0.4, cfg=None, rng=0):
  return context_lib.Context(model=model, params=params, ema_params=ema_params, objective_state={}, batch=batch,
                             rng=jax.random.PRNGKey(rng), step=jnp.zeros((), jnp.int32),
                             alpha=jnp.asarray(alpha, jnp.float32), num_groups=1,
                             cfg=ml_collections.ConfigDict(cfg or {}))


@pytest.fixture(scope="module")
def model_fns(generate):
  """Jitted encode(params, image, ids, mask) -> q_states; decode(params, ids, mask, states, states_mask)."""
  model = generate[0]
  encode = jax.jit(lambda p, *args: model.apply({"params": p}, *args, method=model.vqa_encode))
  decode = jax.jit(lambda p, *args: model.apply({"params": p}, *args, method=model.answer_logits))
  return encode, decode


@pytest.fixture(scope="module")
def reference_logits(generate, model_fns):
  """Batch 0 and its student / teacher answer logits [B, A, La, V], one decoder pass per question."""
  _, params, ema_params = generate
  encode, decode = model_fns
  batch = {k: jnp.asarray(v) for k, v in _vqa_batch(0).items()}
  slots = batch["answer_ids"].shape[1]

  def logits_of(p):
    q_states = encode(p, batch["image"], batch["text_ids"], batch["text_mask"])
    return np.stack([decode(p, batch["answer_ids"][b], batch["answer_mask"][b],
                            jnp.repeat(q_states[b:b + 1], slots, axis=0),
                            jnp.repeat(batch["text_mask"][b:b + 1], slots, axis=0))
                     for b in range(batch["image"].shape[0])]).astype(np.float64)

  return batch, logits_of(params), logits_of(ema_params)


def _reference_vqa_loss(batch, student, teacher, alpha, distill):
  """sum_{b,a} weight * row NLL / B in float64 loops."""
  total = 0.0
  for b in range(student.shape[0]):
    rows = _reference_row_nll(student[b], np.asarray(batch["answer_ids"][b]),
                              np.asarray(batch["answer_mask"][b]), teacher[b] if distill else None, alpha)
    total += np.sum(np.asarray(batch["answer_weight"][b], np.float64) * rows)
  return total / student.shape[0]


@pytest.mark.parametrize("distill", [True, False])
def test_vqa_loss_matches_reference(generate, reference_logits, distill):
  model, params, ema_params = generate
  batch, student, teacher = reference_logits

  @jax.jit
  def loss_fn(params, ema_params, batch):
    return vqa_obj.vqa_loss(_context(model, params, ema_params, batch, 0.4, {"distill": distill}), batch)

  loss, metrics = loss_fn(params, ema_params, batch)
  np.testing.assert_allclose(loss, _reference_vqa_loss(batch, student, teacher, 0.4, distill), rtol=2e-5)
  nll = _reference_vqa_loss(batch, student, teacher, 0.0, False)
  np.testing.assert_allclose(metrics["nll"], nll, rtol=2e-5)
  assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0
  assert loss.dtype == jnp.float32
  if distill:
    assert abs(float(loss) - nll) > 1e-4  # the teacher term changes the loss


def test_vqa_loss_gradients_reach_the_student_only(generate):
  model, params, ema_params = generate
  batch = {k: jnp.asarray(v) for k, v in _vqa_batch(1).items()}

  def loss_fn(params, ema_params):
    return vqa_obj.vqa_loss(_context(model, params, ema_params, batch, 0.4, {"distill": True}), batch)[0]

  student_grads, teacher_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(params, ema_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(teacher_grads))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(student_grads))
  for path in (("answer_decoder", "layer_0", "crossattention", "key", "dense", "kernel"),
               ("answer_decoder", "embeddings", "word", "embedding"),
               ("fusion", "layer_0", "output", "dense", "kernel"),
               ("vision", "patch_embed", "kernel")):
    grad = student_grads
    for key in path:
      grad = grad[key]
    assert float(jnp.abs(grad).sum()) > 0, path


def test_vqa_loss_ignores_empty_answer_slots(generate):
  model, params, ema_params = generate
  batch = _vqa_batch(2)
  empty = batch["answer_weight"] == 0
  assert empty.any()
  # Tokens in the slots of weight 0 must not matter, even unmasked.
  changed = dict(batch, answer_ids=np.where(empty[..., None], 5, batch["answer_ids"]),
                 answer_mask=np.where(empty[..., None], 1, batch["answer_mask"]))
  loss_fn = jax.jit(lambda b: vqa_obj.vqa_loss(_context(model, params, ema_params, b), b)[0])
  np.testing.assert_allclose(loss_fn({k: jnp.asarray(v) for k, v in changed.items()}),
                             loss_fn({k: jnp.asarray(v) for k, v in batch.items()}), rtol=1e-6)


class _FakeClassifier:
  """Student for `vqa_cls`: fuse adds the mean image token; vqa_logits is a fixed linear map."""

  def __init__(self, kernel):
    self.kernel = kernel

  def fuse(self, text_states, text_mask, image_states, image_mask=None):
    return {"text_states": text_states + jnp.mean(image_states, axis=1, keepdims=True)}

  def apply(self, method, cls):
    assert method == "vqa_logits"
    return cls @ self.kernel


def test_vqa_cls_loss_matches_reference():
  rng = np.random.default_rng(3)
  batch_size, width, length = 5, 4, 3
  text = rng.standard_normal((batch_size, length, width)).astype(np.float32)
  image = rng.standard_normal((batch_size, 6, width)).astype(np.float32)
  kernel = 2 * rng.standard_normal((width, NUM_ANSWERS)).astype(np.float32)
  scores = np.minimum(1.0, rng.integers(0, 5, size=(batch_size, NUM_ANSWERS)) / 3.0) * (
      rng.random((batch_size, NUM_ANSWERS)) < 0.4)
  ctx = types.SimpleNamespace(text={"states": jnp.asarray(text)}, image={"states": jnp.asarray(image)},
                              student=_FakeClassifier(jnp.asarray(kernel)))
  batch = {"text_mask": jnp.ones((batch_size, length), jnp.int32),
           "answer_scores": jnp.asarray(scores, jnp.float32)}
  loss, metrics = vqa_obj.vqa_cls_loss(ctx, batch)

  logits = (np.float64(text[:, 0]) + np.float64(image).mean(axis=1)) @ np.float64(kernel)
  expected = 0.0
  for b in range(batch_size):
    for c in range(NUM_ANSWERS):
      p = 1 / (1 + np.exp(-logits[b, c]))
      expected -= scores[b, c] * np.log(p) + (1 - scores[b, c]) * np.log(1 - p)
  np.testing.assert_allclose(loss, expected / batch_size, rtol=1e-5)
  np.testing.assert_allclose(metrics["score"], np.mean(scores[np.arange(batch_size), logits.argmax(1)]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"answer_scores.*num_answers"):
    vqa_obj.vqa_cls_loss(ctx, {**batch, "answer_scores": batch["answer_scores"][:, :-1]})
  with pytest.raises(KeyError, match="answer_scores"):
    vqa_obj.vqa_cls_loss(ctx, {"text_mask": batch["text_mask"]})


def test_objectives_are_registered_and_check_shapes(generate):
  assert registry.get("vqa") is vqa_obj.vqa_loss and registry.get("vqa_cls") is vqa_obj.vqa_cls_loss
  model, params, ema_params = generate
  batch = {k: jnp.asarray(v) for k, v in _vqa_batch(0).items()}
  ctx = _context(model, params, ema_params, batch)
  with pytest.raises(KeyError, match="answer_weight"):
    vqa_obj.vqa_loss(ctx, {k: v for k, v in batch.items() if k != "answer_weight"})
  with pytest.raises(ValueError, match=r"answer_weight"):
    vqa_obj.vqa_loss(ctx, {**batch, "answer_weight": batch["answer_weight"][:, :1]})


# ----------------------------------------------------------------------------- model


def test_config_validation():
  with pytest.raises(ValueError, match="vqa_mode"):
    vlp.build_config(_model_cfg(mode="span"))
  with pytest.raises(ValueError, match="unknown key"):
    vlp.build_config(dict(_model_cfg(), answer_layer=2))
  cfg = vlp.build_config(_model_cfg(answer_layers=1))
  assert isinstance(cfg, vqa_model.VQAConfig) and cfg.decoder_layers == 1
  assert vlp.build_config(_model_cfg()).decoder_layers == common.tiny_text(VOCAB)["fusion_layers"]


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_remap_pretrained_copies_fusion_embeddings_and_mlm_head(generate):
  _, params, _ = generate
  pretrained = jax.device_get({k: v for k, v in params.items() if k != "answer_decoder"})
  remapped = vqa_model.VQAModel.remap_pretrained(pretrained)
  decoder = remapped["answer_decoder"]
  assert jax.tree.structure(decoder) == jax.tree.structure(jax.device_get(params["answer_decoder"]))
  pairs = [(decoder[f"layer_{i}"], pretrained["fusion"][f"layer_{i}"]) for i in range(2)]
  pairs += [(decoder["embeddings"], pretrained["text"]["embeddings"]),
            (decoder["lm_head"], pretrained["mlm_head"])]
  for got, want in pairs:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  # A VQA checkpoint (it has the decoder) loads as it is.
  finetuned = jax.device_get(params)
  assert vqa_model.VQAModel.remap_pretrained(finetuned) is finetuned


def test_remap_leaves_out_cross_attention_key_value_of_another_width():
  def dense(in_width):
    return {"dense": {"kernel": np.zeros((in_width, 32)), "bias": np.zeros(32)}}

  fusion_layer = {
      "crossattention": {"query": dense(32), "key": dense(48), "value": dense(48), "out": dense(32)},
      "output": {"dense": {"kernel": np.ones((64, 32))}},
  }
  remapped = vqa_model.VQAModel.remap_pretrained({"text": {}, "fusion": {"layer_0": fusion_layer}})
  cross = remapped["answer_decoder"]["layer_0"]["crossattention"]
  assert sorted(cross) == ["out", "query"]
  np.testing.assert_array_equal(remapped["answer_decoder"]["layer_0"]["output"]["dense"]["kernel"], 1.0)


def test_decoder_from_fusion_equals_fusion_on_each_prefix(generate):
  """With remapped params, decoder position t = MLM logits of the (bidirectional) fusion over tokens 0..t."""
  model, params, _ = generate
  decoder_params = dict(params, answer_decoder=vqa_model.VQAModel.remap_pretrained(
      {k: v for k, v in params.items() if k != "answer_decoder"})["answer_decoder"])
  rng = np.random.default_rng(4)
  ids, mask = _token_rows(rng, 3, 5, 3)
  memory = jnp.asarray(rng.standard_normal((3, 4, 32)), jnp.float32)
  memory_mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.int32)
  variables = {"params": decoder_params}
  logits = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), memory, memory_mask,
                       method=model.answer_logits)

  def prefix_logits(module, prefix_ids, prefix_mask):
    states = module.text.embeddings(prefix_ids)
    fused = module.fuse(states, prefix_mask, memory, memory_mask)
    return module.mlm_logits(fused["text_states"])

  for t in range(ids.shape[1]):
    want = model.apply(variables, jnp.asarray(ids[:, :t + 1]), jnp.asarray(mask[:, :t + 1]),
                       method=prefix_logits)
    rows = mask[:, t] == 1  # positions that are real tokens
    np.testing.assert_allclose(np.asarray(logits[:, t])[rows], np.asarray(want[:, t])[rows], rtol=1e-4,
                               atol=1e-4)
  # And the decoder is causal: changing a later token leaves earlier positions unchanged.
  later = ids.copy()
  later[:, -1] = 7
  moved = model.apply(variables, jnp.asarray(later), jnp.asarray(mask), memory, memory_mask,
                      method=model.answer_logits)
  np.testing.assert_allclose(moved[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-5)


def _train_config():
  config = ml_collections.ConfigDict()
  config.model = _model_cfg("generate", dropout=0.1)
  config.objectives = {"vqa": dict(weight=1.0, distill=True)}
  config.optim = common.demo_optim(1e-3)
  config.optim.schedule.warmup_steps = 1
  config.teacher = dict(momentum=0.995, alpha=0.4, alpha_ramp_steps=0)
  return config


def test_one_sharded_train_step_is_finite():
  """Init + the real train step (EMA, dropout, optimizer) on 2 data shards, generate mode."""
  config = _train_config()
  model = vlp.build_model(config.model)
  mesh = sharding.make_mesh(dict(data=2), jax.devices()[:2])
  rules = sharding.logical_rules("dp")
  abstract_params = state_lib.abstract_params(model)
  tx, schedule = optim.make_optimizer(config.optim, params=abstract_params, total_steps=4, steps_per_epoch=2)
  specs = registry.objective_specs(config.objectives)
  teacher = config_lib.teacher_settings(config, 2)
  _, shardings = state_lib.abstract_state(model, tx, specs, True, mesh, rules)
  state = state_lib.create_state(model, tx, specs, True, shardings, jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(model, tx, mesh=mesh, rules=rules, state_shardings=shardings,
                                        objective_specs=specs, teacher=teacher, schedule=schedule)
  new_state, metrics = train_step(state, _vqa_batch(5))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0 and np.isfinite(metrics["grad_norm"])
  assert metrics["grad_norm"] > 0 and "vqa/token_accuracy" in metrics
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_state.params))


# ----------------------------------------------------------------------------- ranking inference


def _fake_decode(table):
  """logits[n, t] = table[question(n), t, ids[n, t]]: causal and question dependent.

  The question index travels in q_states[:, 0, 0]; table is [Q, La, VOCAB, VOCAB].
  """

  def decode(ids, mask, q_states, q_mask):
    question = q_states[:, 0, 0].astype(jnp.int32)
    positions = jnp.arange(ids.shape[1])
    return table[question[:, None], positions[None, :], ids]

  return decode


def _brute_force_rank(table, candidate_ids, candidate_mask, k, rank_fix):
  """float64: first-token top-k (stable order), full-sequence scores, argmax (first on ties)."""
  best = []
  for q in range(table.shape[0]):
    first = np.array([_log_softmax(np.float64(table[q, 0, candidate_ids[c, 0]]))[candidate_ids[c, 1]]
                      for c in range(len(candidate_ids))])
    top = np.argsort(-first, kind="stable")[:k]
    scores = []
    for c in top:
      score = 0.0 if rank_fix else first[c]
      for t in range(1, candidate_ids.shape[1]):
        if candidate_mask[c, t]:
          score += _log_softmax(np.float64(table[q, t - 1, candidate_ids[c, t - 1]]))[candidate_ids[c, t]]
      scores.append(score)
    best.append(top[int(np.argmax(scores))])
  return np.array(best)


@pytest.mark.parametrize("rank_fix", [False, True])
def test_rank_candidates_matches_brute_force(rank_fix):
  rng = np.random.default_rng(6)
  num_questions, num_candidates, answer_len = 5, 9, 5
  candidate_ids, candidate_mask = _token_rows(rng, num_candidates, answer_len, 3)
  table = (2 * rng.standard_normal((num_questions, answer_len, VOCAB, VOCAB))).astype(np.float32)
  q_states = jnp.arange(num_questions, dtype=jnp.float32)[:, None, None] * jnp.ones((1, 2, 3))
  q_mask = jnp.ones((num_questions, 2), jnp.int32)
  decode = _fake_decode(jnp.asarray(table))
  for k in (num_candidates, 3, 1):
    best, top_idx, scores = jax.jit(
        lambda q, m, ids, mask: vqa_eval.rank_candidates(decode, q, m, ids, mask, k=k, rank_fix=rank_fix))(
            q_states, q_mask, jnp.asarray(candidate_ids), jnp.asarray(candidate_mask))
    assert best.shape == (num_questions,) and top_idx.shape == scores.shape == (num_questions, k)
    np.testing.assert_array_equal(best, _brute_force_rank(table, candidate_ids, candidate_mask, k, rank_fix))
  # With all candidates the answer is the argmax of the full score over the whole list.
  full = _brute_force_rank(table, candidate_ids, candidate_mask, num_candidates, rank_fix)
  assert len(set(full.tolist())) > 1  # the test data does not make every question pick the same answer


def test_albef_rank_counts_the_first_token_twice():
  # Candidate 0: first token likely, rest unlikely; candidate 1 the opposite. Sum of log-probs
  # prefers 1, ALBEF's score (first token counted twice) prefers 0.
  vocab = 8
  table = np.full((1, 3, vocab, vocab), -5.0, np.float32)
  # log p: first token f0 = -0.05, f1 = -3.05; then [SEP] r0 = -4.51, r1 = -0.00.
  # Sum f + r: -4.56 vs -3.05 (candidate 1); ALBEF's 2f + r: -4.61 vs -6.10 (candidate 0).
  table[0, 0, CLS_ID, 4] = 4.0
  table[0, 0, CLS_ID, 5] = 1.0
  table[0, 1, 4, SEP_ID] = 1.0
  table[0, 1, 4, 6] = 5.5
  table[0, 1, 5, SEP_ID] = 3.0
  candidate_ids = np.array([[CLS_ID, 4, SEP_ID], [CLS_ID, 5, SEP_ID]], np.int32)
  candidate_mask = np.ones_like(candidate_ids)
  decode = _fake_decode(jnp.asarray(table))
  args = (jnp.zeros((1, 1, 1)), jnp.ones((1, 1), jnp.int32), jnp.asarray(candidate_ids),
          jnp.asarray(candidate_mask))
  fixed = vqa_eval.rank_candidates(decode, *args, k=2, rank_fix=True)[0]
  albef = vqa_eval.rank_candidates(decode, *args, k=2, rank_fix=False)[0]
  np.testing.assert_array_equal(fixed, _brute_force_rank(table, candidate_ids, candidate_mask, 2, True))
  np.testing.assert_array_equal(albef, _brute_force_rank(table, candidate_ids, candidate_mask, 2, False))
  assert int(fixed[0]) == 1 and int(albef[0]) == 0


class _FakeEvalData:
  """The eval data contract of `input_pipeline.tasks.make_eval_data` for VQA, padded batches of 4."""

  def __init__(self, seed, num_questions=5, batch_size=4):
    rng = np.random.default_rng(seed)
    batch = _vqa_batch(seed, batch=num_questions)
    self.num_examples = num_questions
    self.question_ids = [1000 + i for i in range(num_questions)]
    self.answer_list = ["yes", "no", "2", "red", "dog", "cat"]
    self.candidate_ids, self.candidate_mask = _token_rows(rng, len(self.answer_list), 4, 2)
    self.answers = [["yes"] * 10, ["2"] * 3 + ["3"] * 7, [], ["red"] * 10, ["dog"] * 10][:num_questions]
    self._examples = {k: batch[k] for k in ("image", "text_ids", "text_mask")}
    self._batch_size = batch_size

  def batches(self):
    n, size = self.num_examples, self._batch_size
    for start in range(0, n, size):
      rows = np.arange(start, start + size)
      valid = rows < n
      take = np.where(valid, rows, 0)
      yield dict({k: v[take] for k, v in self._examples.items()},
                 index=np.where(valid, rows, -1).astype(np.int32), valid=valid)


def _all_candidate_scores(params, data, model_fns):
  """float64 [Q, C] full-sequence log-likelihood of every candidate, one decoder pass per question."""
  encode, decode = model_fns
  examples = data._examples
  num_candidates = len(data.candidate_ids)
  q_states = encode(params, examples["image"], examples["text_ids"], examples["text_mask"])
  scores = []
  for q in range(data.num_examples):
    logits = decode(params, data.candidate_ids, data.candidate_mask,
                    jnp.repeat(q_states[q:q + 1], num_candidates, axis=0),
                    jnp.repeat(examples["text_mask"][q:q + 1], num_candidates, axis=0))
    scores.append(-_reference_row_nll(np.asarray(logits), data.candidate_ids, data.candidate_mask))
  return np.array(scores)


def test_predict_answers_with_all_candidates_is_the_full_argmax(generate, model_fns):
  model, params, _ = generate
  data = _FakeEvalData(7)
  mesh = sharding.make_mesh(dict(data=2), jax.devices()[:2])
  predicted = vqa_eval.predict_answers(model, params, data.batches(), data.candidate_ids, data.candidate_mask,
                                       data.num_examples, k_test=0, rank_fix=True, mesh=mesh)
  np.testing.assert_array_equal(predicted, np.argmax(_all_candidate_scores(params, data, model_fns), axis=1))
  with pytest.raises(ValueError, match="exactly once"):
    vqa_eval.predict_answers(model, params, list(data.batches())[:1], data.candidate_ids, data.candidate_mask,
                             data.num_examples, k_test=0, rank_fix=True, mesh=mesh)


def _install_fake_tasks(monkeypatch, data):
  import input_pipeline
  fake = types.ModuleType("input_pipeline.tasks")
  calls = []

  def make_eval_data(input_config, *, split, batch_size):
    calls.append((split, batch_size))
    return data

  fake.make_eval_data = make_eval_data
  monkeypatch.setitem(sys.modules, "input_pipeline.tasks", fake)
  monkeypatch.setattr(input_pipeline, "tasks", fake, raising=False)
  return calls


def test_run_writes_predictions_and_scores(generate, monkeypatch, tmp_path):
  model, params, _ = generate
  data = _FakeEvalData(8)
  calls = _install_fake_tasks(monkeypatch, data)
  path = tmp_path / "out" / "vqa_result.json"
  config = ml_collections.ConfigDict(dict(input={}, eval=dict(
      split="val", batch_size=4, k_test=3, predictions=str(path), rank_fix=False, kind="vqa")))
  results = vqa_eval.run(config, model, params)
  assert calls == [("val", 4)]
  written = json.loads(path.read_text())
  assert [r["question_id"] for r in written] == data.question_ids
  assert all(r["answer"] in data.answer_list for r in written)
  expected = vqa_eval.accuracy_metrics([r["answer"] for r in written], data.answers)
  assert results == expected and results["num_scored"] == 4
  assert set(vqa_eval.EVAL_KEYS) >= {"k_test", "predictions", "rank_fix"}


@pytest.fixture(scope="module")
def classify():
  model = vlp.build_model(dict(_model_cfg("classify"), num_answers=6))
  return model, _init(model, 3)


def test_classify_grad_step_reaches_the_student_only(classify):
  model, params = classify
  rng = np.random.default_rng(5)
  batch = {k: jnp.asarray(v) for k, v in _vqa_batch(5).items() if not k.startswith("answer_")}
  batch["answer_scores"] = jnp.asarray(np.minimum(1.0, rng.integers(0, 4, size=(4, 6)) / 3.0), jnp.float32)

  def loss_fn(params, ema_params):
    return vqa_obj.vqa_cls_loss(_context(model, params, ema_params, batch), batch)[0]

  loss, (student_grads, teacher_grads) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(params, params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(teacher_grads))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(student_grads))
  assert float(jnp.abs(student_grads["vqa_head"]["fc2"]["dense"]["kernel"]).sum()) > 0
  assert float(jnp.abs(student_grads["fusion"]["layer_0"]["output"]["dense"]["kernel"]).sum()) > 0


def test_classify_mode_predicts_the_head_argmax(classify, monkeypatch):
  model, params = classify
  data = _FakeEvalData(9)
  _install_fake_tasks(monkeypatch, data)
  config = ml_collections.ConfigDict(dict(input={}, eval=dict(split="val", batch_size=4, predictions="")))
  results = vqa_eval.run(config, model, params)
  examples = data._examples
  logits = jax.jit(lambda p: model.apply({"params": p}, model.apply(
      {"params": p}, examples["image"], examples["text_ids"], examples["text_mask"],
      method=model.vqa_encode)[:, 0], method=model.vqa_logits))(params)
  assert logits.shape == (data.num_examples, 6)
  answers = [data.answer_list[i] for i in np.argmax(logits, axis=1)]
  assert results == vqa_eval.accuracy_metrics(answers, data.answers)
  wrong = vlp.build_model(dict(_model_cfg("classify"), num_answers=5))
  with pytest.raises(ValueError, match="num_answers"):
    vqa_eval.run(config, wrong, params)
