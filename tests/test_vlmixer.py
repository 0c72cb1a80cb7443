"""VLMixer's model kind and objectives: box pooling, gallery draws and bank writes, each objective
against a NumPy reference, the retrieval methods, and `configs/vlmixer.py:tiny` on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_runs
from vlpjax import config_lib, sharding, state as state_lib, synthetic, train
from vlpjax.evaluators import retrieval
from vlpjax.models import mixer, vit, vlp
from vlpjax.objectives import cmc, context, gallery, registry

RTOL = 2e-5


def _config(p_cmc=0.5, **objectives):
  config = config_lib.load_config(f"configs/vlmixer.py:tiny,p_cmc={p_cmc}")
  config.input.synthetic = True
  # No dropout: the references recompute the model's outputs.
  config.model.text.dropout = config.model.text.attention_dropout = 0.0
  for name, settings in objectives.items():
    config.objectives[name].update(settings)
  return config


def _setup(config, ema_noise=0.0, seed=0):
  """(model, params, ema params | None, objective state, batch, specs) of a tiny run."""
  model = vlp.build_model(config.model)
  specs = registry.objective_specs(config.objectives)
  with_teacher = config_lib.teacher_settings(config, 1) is not None
  state = jax.jit(state_lib.make_init_fn(model, optax.identity(), specs, with_teacher))(jax.random.PRNGKey(seed))
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  batch = synthetic.make_batch_fn(config, mesh, 8)(jax.random.PRNGKey(seed + 1), 0)
  ema = None
  if with_teacher:
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    ema = jax.tree.unflatten(tree, [x + ema_noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, state.params, ema, dict(state.objective_state), batch, specs


def _run(model, specs, name, extract, params, ema, objective_state, batch):
  """(loss, metrics, extract(ctx)) of objective `name`, under jit (eager Flax is slow)."""
  spec = next(s for s in specs if s.name == name)

  def fn(params, ema, objective_state, batch):
    ctx = context.Context(model=model, params=params, ema_params=ema, objective_state=objective_state, batch=batch,
                          rng=jax.random.PRNGKey(2), step=jnp.int32(0), alpha=0.0, num_groups=1)
    view = ctx.with_cfg(spec.cfg, name)
    loss, metrics = spec.definition.loss(view, batch)
    return loss, metrics, extract(view)

  return jax.tree.map(np.asarray, jax.jit(fn)(params, ema, objective_state, batch))


def _np(x):
  return np.asarray(x, np.float64)


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


# ----------------------------------------------------------------------------- pooling, draws, bank


def test_pool_boxes_matches_a_numpy_loop():
  rng = np.random.default_rng(0)
  grid, cells, dim = 4, (2, 3), 5
  states = rng.normal(size=(2, grid * grid, dim)).astype(np.float32)
  corner = rng.uniform(0, 0.8, (2, 3, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.5, (2, 3, 2))], -1).clip(0, 1).astype(np.float32)
  boxes[0, 0] = [0.30, 0.30, 0.32, 0.33]  # smaller than a patch: no centre inside any cell
  got, cell_boxes = mixer.pool_boxes(jnp.asarray(states), jnp.asarray(boxes), grid, cells)
  for b in range(2):
    for m in range(3):
      ymin, xmin, ymax, xmax = boxes[b, m].astype(np.float64)
      for i in range(cells[0]):
        for j in range(cells[1]):
          y0, y1 = ymin + (ymax - ymin) * i / cells[0], ymin + (ymax - ymin) * (i + 1) / cells[0]
          x0, x1 = xmin + (xmax - xmin) * j / cells[1], xmin + (xmax - xmin) * (j + 1) / cells[1]
          members = [r * grid + c for r in range(grid) for c in range(grid)
                     if y0 <= (r + 0.5) / grid < y1 and x0 <= (c + 0.5) / grid < x1]
          if not members:
            r = min(int((y0 + y1) / 2 * grid), grid - 1)
            c = min(int((x0 + x1) / 2 * grid), grid - 1)
            members = [r * grid + c]
          p = i * cells[1] + j
          np.testing.assert_allclose(got[b, m, p], states[b, members].mean(0), rtol=1e-5, atol=1e-6)
          np.testing.assert_allclose(cell_boxes[b, m, p], [y0, x0, y1, x1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixer.patch_boxes(2), [[0, 0, .5, .5], [0, .5, .5, 1], [.5, 0, 1, .5], [.5, .5, 1, 1]])


@pytest.mark.parametrize("source", cmc.SOURCES)
def test_draw_entries_matches_a_numpy_loop(source):
  rng = np.random.default_rng(1)
  num_concepts, e = 6, 20
  concept = rng.integers(-1, num_concepts, (5, 4)).astype(np.int32)
  replaced = rng.random((5, 4)) < 0.7
  draw = rng.random((5, 4)).astype(np.float32)
  entry_concepts = rng.integers(-1, 4, e).astype(np.int32)  # concepts 4, 5 never in the batch
  bank_count = np.array([0, 3, 1, 0, 2, 0], np.int32)
  got = jax.tree.map(np.asarray, cmc.draw_entries(jnp.asarray(concept), jnp.asarray(replaced), jnp.asarray(draw),
                                                  jnp.asarray(entry_concepts), jnp.asarray(bank_count),
                                                  num_concepts=num_concepts, source=source))
  for i in range(5):
    for k in range(4):
      c, u, on = concept[i, k], draw[i, k], replaced[i, k] and concept[i, k] >= 0
      candidates = [x for x in range(e) if entry_concepts[x] == c]
      batch_ok = on and source != "bank" and candidates
      fallback = not (source == "batch_then_bank" and candidates)
      bank_ok = on and source != "batch" and bank_count[max(c, 0)] > 0 and fallback
      assert got["use_batch"][i, k] == bool(batch_ok)
      assert got["use_bank"][i, k] == bool(bank_ok)
      assert got["empty"][i, k] == bool(on and not batch_ok and not bank_ok)
      if batch_ok:
        assert got["batch_index"][i, k] == candidates[min(int(np.floor(u * len(candidates))), len(candidates) - 1)]
      if bank_ok:
        assert got["bank_slot"][i, k] == int(np.floor(u * bank_count[c]))
  assert got["use_batch"].any() or source == "bank"
  assert got["empty"].any()


def test_write_bank_matches_a_numpy_ring_buffer():
  rng = np.random.default_rng(2)
  num_concepts, slots, p, dim, e = 5, 3, 2, 4, 14
  model_config = mixer.VLMixerConfig(num_concepts=num_concepts, vision=vit.VisionConfig(width=dim), entry_grid=(1, 2))
  bank = {k: np.asarray(v) for k, v in gallery.init_bank(dict(slots=slots), model_config, None).items()}
  want = {k: v.copy() for k, v in bank.items()}
  for step in range(3):
    features = rng.normal(size=(e, p, dim)).astype(np.float32)
    boxes = rng.random((e, p, 4)).astype(np.float32)
    concepts = rng.integers(-1, num_concepts - 1, e).astype(np.int32)  # concept 4 never written
    ids = np.arange(e, dtype=np.int32) + 100 * step
    bank = jax.tree.map(np.asarray, gallery.write_bank(jax.tree.map(jnp.asarray, bank), jnp.asarray(features),
                                                       jnp.asarray(boxes), jnp.asarray(concepts), jnp.asarray(ids)))
    ranks = np.zeros(num_concepts, int)
    for x in range(e):
      c = concepts[x]
      if c < 0:
        continue
      if ranks[c] < slots:
        s = (want["ptr"][c] + ranks[c]) % slots
        want["features"][c, s], want["boxes"][c, s], want["image_id"][c, s] = features[x], boxes[x], ids[x]
      ranks[c] += 1
    want["ptr"] = (want["ptr"] + np.minimum(ranks, slots)) % slots
    want["count"] = np.minimum(want["count"] + ranks, slots)
    for key in want:
      np.testing.assert_allclose(bank[key], want[key], err_msg=f"{key} after write {step}")
  assert bank["count"][4] == 0 and (bank["image_id"][4] == -1).all()


def test_scatter_visual_and_mask_of_empty_draws():
  visual = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1) + 1
  slot = jnp.asarray([[-1, 0, 1, -1, 2, 3], [-1, 2, 3, -1, -1, -1]])
  placed = np.asarray(cmc.scatter_visual(visual, slot))[..., 0]
  np.testing.assert_array_equal(placed, [[0, 1, 2, 0, 3, 4], [0, 7, 8, 0, 0, 0]])
  mask = cmc.mixed_mask(jnp.ones((2, 6), jnp.int32), slot, jnp.asarray([[False, True], [False, False]]), 2)
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1] * 6])


# ----------------------------------------------------------------------------- objectives vs NumPy


def _nce(q, k, qv, kv, temp):
  total, count = 0.0, 0
  for b in range(q.shape[0]):
    if not qv[b]:
      continue
    logits = np.array([q[b] @ k[j] / temp if kv[j] else -1e9 for j in range(k.shape[0])])
    total -= _log_softmax(logits)[b]
    count += 1
  return total / max(count, 1)


def _cmcl_features(ctx):
  out = dict(z_o=ctx.student.project_text(ctx.orig_text["states"][:, 0]),
             z_m=ctx.student.project_text(ctx.mixed_clean["states"][:, 0]), temp=ctx.student.temperature())
  if ctx.has_teacher:
    out.update(k_o=ctx.teacher.project_text(ctx.ema_orig_text["states"][:, 0]),
               k_m=ctx.teacher.project_text(ctx.ema_mixed_clean["states"][:, 0]))
  return out


def _without_replacement(batch, row=0):
  """`batch` whose sentence `row` has no replaced occurrence (left out of the contrast)."""
  text = dict(batch["text"], cmc_valid=batch["text"]["cmc_valid"].at[row].set(False),
              cmc_replaced=batch["text"]["cmc_replaced"].at[row].set(False))
  return dict(batch, text=text)


def test_cmcl_matches_numpy_with_and_without_a_queue():
  model, params, ema, state, batch, specs = _setup(_config())
  batch = _without_replacement(batch)
  loss, metrics, f = _run(model, specs, "cmcl", _cmcl_features, params, ema, state, batch)
  valid = np.asarray(batch["text"]["cmc_valid"])
  want = 0.5 * (_nce(_np(f["z_o"]), _np(f["z_m"]), valid, valid, float(f["temp"]))
                + _nce(_np(f["z_m"]), _np(f["z_o"]), valid, valid, float(f["temp"])))
  assert 0 < valid.sum() < len(valid)
  np.testing.assert_allclose(float(loss), want, rtol=RTOL)
  np.testing.assert_allclose(float(metrics["valid"]), valid.mean())
  # MoCo: teacher keys and a queue whose valid rows are keys too.
  config = _config(cmcl=dict(queue_size=16))
  config.teacher.momentum = 0.9
  model, params, ema, state, batch, specs = _setup(config, ema_noise=0.01)
  batch = _without_replacement(batch)
  state["cmcl"] = dict(state["cmcl"], valid=jnp.arange(16) % 3 == 0)
  loss, _, f = _run(model, specs, "cmcl", _cmcl_features, params, ema, state, batch)
  valid = np.asarray(batch["text"]["cmc_valid"])
  queue = jax.tree.map(_np, state["cmcl"])
  key_valid = np.concatenate([valid, queue["valid"] > 0])
  temp = float(f["temp"])
  want = 0.5 * (_nce(_np(f["z_o"]), np.concatenate([_np(f["k_m"]), queue["mixed"]]), valid, key_valid, temp)
                + _nce(_np(f["z_m"]), np.concatenate([_np(f["k_o"]), queue["orig"]]), valid, key_valid, temp))
  np.testing.assert_allclose(float(loss), want, rtol=RTOL)
  assert not np.allclose(f["k_m"], f["z_m"])  # the keys are the teacher's


def _ce(logits, labels):
  total, count, hits = 0.0, 0, 0
  for index in np.ndindex(labels.shape):
    if labels[index] >= 0:
      log_probs = _log_softmax(logits[index])
      total -= log_probs[labels[index]]
      hits += int(np.argmax(log_probs) == labels[index])
      count += 1
  return total / max(count, 1), hits / max(count, 1)


def test_mixed_mlm_with_concept_recovery_matches_numpy():
  config = _config(mixed_mlm=dict(concept_weight=0.5))
  config.model.heads = tuple(config.model.heads) + ("concept",)
  model, params, ema, state, batch, specs = _setup(config)

  def features(ctx):
    fused = ctx.mixed_masked_fusion
    return dict(logits=ctx.student.mlm_logits(fused["text_states"]), states=fused["text_states"],
                mask=fused["mask"], empty=ctx.cmc_draws["empty"])

  loss, metrics, f = _run(model, specs, "mixed_mlm", features, params, ema, state, batch)
  text = jax.tree.map(np.asarray, batch["text"])
  mlm, accuracy = _ce(_np(f["logits"]), text["mix_mlm_labels"])
  states = _np(f["states"])
  kernel, bias = _np(params["concept_head"]["dense"]["kernel"]), _np(params["concept_head"]["dense"]["bias"])
  p = 4
  logits, labels = [], []
  for b in range(states.shape[0]):
    for k in range(text["cmc_concept"].shape[1]):
      rows = [i for i in range(states.shape[1])
              if text["mix_slot"][b, i] >= 0 and text["mix_slot"][b, i] // p == k and f["mask"][b, i]]
      mean = states[b, rows].mean(0) if rows else np.zeros(states.shape[-1])
      logits.append(mean @ kernel + bias)
      labels.append(text["cmc_concept"][b, k] if text["cmc_replaced"][b, k] and not f["empty"][b, k] else -1)
  concept, _ = _ce(np.array(logits), np.array(labels))
  assert (np.array(labels) >= 0).sum() > 0 and (text["mix_mlm_labels"] >= 0).sum() > 0
  np.testing.assert_allclose(float(metrics["mlm"]), mlm, rtol=RTOL)
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy)
  np.testing.assert_allclose(float(metrics["concept"]), concept, rtol=RTOL)
  np.testing.assert_allclose(float(loss), mlm + 0.5 * concept, rtol=RTOL)


def test_tag_mlm_and_tag_match_match_numpy():
  model, params, ema, state, batch, specs = _setup(_config())
  # Two images share their tags: that negative pair is left out.
  image = dict(batch["image"])
  image["tag_ids"] = image["tag_ids"].at[3].set(image["tag_ids"][4])
  image["tag_mask"] = image["tag_mask"].at[3].set(image["tag_mask"][4])
  batch = dict(batch, image=image)
  loss, metrics, logits = _run(model, specs, "tag_mlm",
                               lambda ctx: ctx.student.mlm_logits(ctx.tag_masked_fusion["text_states"]),
                               params, ema, state, batch)
  want, accuracy = _ce(_np(logits), np.asarray(image["tag_mlm_labels"]))
  np.testing.assert_allclose(float(loss), want, rtol=RTOL)
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy)

  loss, metrics, _ = _run(model, specs, "tag_match", lambda ctx: {}, params, ema, state, batch)
  variables = {"params": params}

  @jax.jit
  def pair_logits(tag_ids, tag_mask, images):
    sentence = model.apply(variables, images, method=model.encode_image)
    tags = model.apply(variables, tag_ids, tag_mask, method=model.encode_text)
    fused = model.apply(variables, tags["states"], tag_mask, sentence["states"], sentence["mask"], method=model.fuse)
    return model.apply(variables, fused["text_states"][:, 0], method=model.itm_logits)

  n = image["tag_ids"].shape[0]
  other = (np.arange(n) + 1) % n
  positive = _np(pair_logits(image["tag_ids"], image["tag_mask"], image["image"]))
  negative = _np(pair_logits(image["tag_ids"][other], image["tag_mask"][other], image["image"]))
  same = [np.array_equal(np.asarray(image["tag_ids"][o]), np.asarray(image["tag_ids"][b])) for b, o in enumerate(other)]
  logits = list(positive) + [negative[b] for b in range(n) if not same[b]]
  labels = [1] * n + [0] * (n - sum(same))
  want, accuracy = _ce(np.array(logits), np.array(labels))
  assert sum(same) == 1
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy)
  np.testing.assert_allclose(float(metrics["negatives"]), (n - 1) / n)


def test_tag_contrast_matches_numpy():
  model, params, ema, state, batch, specs = _setup(_config())
  image = dict(batch["image"])
  image["tag_ids"] = image["tag_ids"].at[3].set(image["tag_ids"][4])  # 3 and 4: no negatives of each other
  image["tag_mask"] = image["tag_mask"].at[3].set(image["tag_mask"][4])
  batch = dict(batch, image=image)

  def features(ctx):
    return dict(z_i=ctx.student.project_image(ctx.image_sentence["states"][:, 0]),
                z_t=ctx.student.project_text(ctx.tag_text["states"][:, 0]), temp=ctx.student.temperature())

  loss, metrics, f = _run(model, specs, "tag_contrast", features, params, ema, state, batch)
  n = f["z_i"].shape[0]
  ids = np.where(np.asarray(image["tag_mask"]) > 0, np.asarray(image["tag_ids"]), -1)
  total = 0.0
  for queries, keys in ((_np(f["z_i"]), _np(f["z_t"])), (_np(f["z_t"]), _np(f["z_i"]))):
    for b in range(n):
      allowed = [c for c in range(n) if c == b or not np.array_equal(ids[c], ids[b])]
      logits = np.array([queries[b] @ keys[c] / float(f["temp"]) for c in allowed])
      total -= _log_softmax(logits)[allowed.index(b)] / n
  np.testing.assert_allclose(float(loss), total / 2, rtol=RTOL)
  assert float(f["temp"]) >= 0.05  # the config's floor


def test_gallery_bank_draws_carry_no_gradient_into_the_vit():
  config = _config()
  model, params, ema, state, batch, specs = _setup(config)
  loss, metrics, entries = _run(model, specs, "gallery", lambda ctx: ctx.mixer_image, params, ema, state, batch)
  assert float(loss) == 0.0 and float(metrics["filled"]) == 0.0  # the bank starts empty
  flat = lambda x: jnp.asarray(x).reshape((-1,) + x.shape[2:])
  bank = gallery.write_bank(state["gallery"],
                            *(flat(entries[k]) for k in ("features", "boxes", "concepts", "image_id")))
  assert bool(jnp.any(batch["text"]["cmc_replaced"]))
  cmcl = next(s for s in specs if s.name == "cmcl")
  for source, reaches_vit in (("batch", True), ("bank", False)):
    kind = vlp.build_model(dict(config.model.to_dict(), gallery_source=source))

    def loss_of(p):
      ctx = context.Context(model=kind, params=p, ema_params=None, objective_state=dict(gallery=bank), batch=batch,
                            rng=jax.random.PRNGKey(3), step=jnp.int32(0), alpha=0.0, num_groups=1)
      return cmcl.definition.loss(ctx.with_cfg(cmcl.cfg, "cmcl"), batch)[0]

    grads = jax.jit(jax.grad(loss_of))(params)
    norm = float(optax.global_norm(grads["vision"]))
    assert (norm > 0) == reaches_vit, (source, norm)
    assert float(optax.global_norm(grads["visual_in"])) > 0


# ----------------------------------------------------------------------------- retrieval, training


def test_retrieval_methods_score_image_sentences():
  config = _config()
  model = vlp.build_model(config.model)
  params = state_lib.abstract_params(model)
  params = state_lib.make_init_fn(model, optax.identity(), [], False)(jax.random.PRNGKey(0)).params
  rng = np.random.default_rng(0)
  size = config.model.vision.image_size
  images = [{"image": rng.normal(size=(4, size, size, 3)).astype(np.float32), "valid": np.ones(4, bool)}]
  ids = rng.integers(5, 50, (8, 6)).astype(np.int32)
  ids[:, 0] = config.model.cls_id
  texts = [{"text_ids": ids, "text_mask": np.ones((8, 6), np.int32), "valid": np.ones(8, bool)}]
  img2txt = [[0, 1], [2, 3], [4, 5], [6, 7]]
  txt2img = np.repeat(np.arange(4), 2)
  itc = retrieval.evaluate(model, params, images, texts, txt2img, img2txt, k_test=0)
  rerank = retrieval.evaluate(model, params, images, texts, txt2img, img2txt, k_test=2, itm_batch_size=4)
  assert itc["num_images"] == 4 and rerank["num_texts"] == 8
  encoded = model.apply({"params": params}, images[0]["image"], method=model.encode_image)
  assert encoded["states"].shape == (4, size // 8 * (size // 8) + 2, config.model.text.width)
  sims = retrieval.retrieval_scores(model, params, images, texts)[0]
  feat = model.apply({"params": params}, encoded["states"][:, 0], method=model.project_image)
  text = model.apply({"params": params}, ids, texts[0]["text_mask"], method=model.encode_text)
  np.testing.assert_allclose(sims, feat @ model.apply({"params": params}, text["states"][:, 0],
                                                      method=model.project_text).T, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pixels only"):
    model.apply({"params": params}, images[0]["image"], patch_mask=jnp.zeros((4, 16), bool), method=model.encode_image)


def test_tiny_config_trains_on_8_devices_and_logs_each_term(tmp_path, tmp_path_factory, monkeypatch):
  # The tiny demo data of tests/test_vlmixer_data.py when it ran first in this session.
  monkeypatch.setenv("VLPJAX_DATA_DIR", str(tmp_path_factory.getbasetemp() / "demo_data"))
  config = tiny_runs.config("configs/vlmixer.py:tiny,steps=2", mesh=dict(data=8), checkpoint_every=0)
  out = train.train_and_evaluate(config, str(tmp_path))
  tags = tiny_runs.tags(tmp_path)
  for term in ("cmcl", "mixed_mlm", "tag_mlm", "tag_match", "tag_contrast", "gallery"):
    assert f"train/{term}/loss" in tags, (term, sorted(tags))
  for stream in ("text", "image"):
    assert f"train/{stream}/data_skipped" in tags
  assert out["step"] == 2 and np.isfinite(out["train/loss"])


def test_ablation_without_cmc_validates_and_a_bank_without_gallery_fails_before_compute():
  from vlpjax import config_lib
  config = config_lib.load_config("configs/vlmixer.py:tiny,p_cmc=0")
  config_lib.validate(config)  # no CMC: entries are never drawn, so no bank is needed
  assert "gallery" not in config.objectives and config.model.gallery_source == "batch"
  config.model.gallery_source = "batch_then_bank"
  with pytest.raises(ValueError, match=r"gallery_source='batch_then_bank' reads the gallery bank"):
    config_lib.validate(config)
