"""Layers under `nn.scan` (`config.model.scan_layers`).

On the same params (converted between the layouts by `vlpjax.models.layout`), the scanned towers
give the unrolled ones' losses, metrics, gradients and per-layer outputs (ALBEF, MAMO, the task
models, remat per scanned layer); a checkpoint of either layout restores into a model of either;
the cached ITM rerank and Grad-CAM (per-layer sown attention and perturbation points) work on a
scanned model and agree with the unrolled one.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from vlpjax import checkpoint, config_lib, sharding, state as state_lib, step as step_lib, synthetic
from vlpjax.evaluators import grounding, retrieval
from vlpjax.models import layout, vlp


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6, what=""):
  got_flat = traverse_util.flatten_dict(got, sep="/") if isinstance(got, dict) else dict(enumerate(got))
  want_flat = traverse_util.flatten_dict(want, sep="/") if isinstance(want, dict) else dict(enumerate(want))
  assert set(got_flat) == set(want_flat), (what, sorted(set(got_flat) ^ set(want_flat))[:5])
  for path in want_flat:
    np.testing.assert_allclose(np.asarray(got_flat[path]), np.asarray(want_flat[path]), rtol=rtol, atol=atol,
                               err_msg=f"{what} {path}")


def _scanned(model):
  return type(model)(dataclasses.replace(model.config, scan_layers=True))


def _init(model, seed=0):
  init = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))
  return jax.device_get(init(jax.random.PRNGKey(seed))["params"])


# ----------------------------------------------------------------------------- the layouts


def test_layout_stacks_unrolls_and_refuses_gaps():
  rng = np.random.default_rng(0)
  leaf = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  unrolled = {"vision": {"block_0": {"w": leaf(3, 2)}, "block_1": {"w": leaf(3, 2)}, "norm": {"scale": leaf(2)}},
              "text": {"layer_0": {"b": leaf(4)}, "embeddings": {"e": leaf(5, 4)}},
              "fusion": {"layer_0": {"b": leaf(4)}, "layer_1": {"b": leaf(4)}, "layer_2": {"b": leaf(4)}},
              "answer_decoder": {"layer_0": {"b": leaf(4)}}}   # never scanned
  stacked = layout.stack(unrolled)
  assert stacked["vision"]["blocks"]["w"].shape == (2, 3, 2) and set(stacked["vision"]) == {"blocks", "norm"}
  assert stacked["fusion"]["layers"]["b"].shape == (3, 4) and stacked["text"]["layers"]["b"].shape == (1, 4)
  assert stacked["answer_decoder"] is unrolled["answer_decoder"]
  np.testing.assert_array_equal(stacked["fusion"]["layers"]["b"][2], unrolled["fusion"]["layer_2"]["b"])
  assert layout.is_scanned(stacked) and not layout.is_scanned(unrolled)
  _assert_trees_close(layout.unroll(stacked), unrolled, rtol=0, atol=0)
  _assert_trees_close(layout.unroll(unrolled), unrolled, rtol=0, atol=0)   # already unrolled: as is
  _assert_trees_close(layout.stack(stacked), stacked, rtol=0, atol=0)
  # `like`: per tower, the target's layout.
  target = {"vision": stacked["vision"], "text": unrolled["text"], "fusion": stacked["fusion"]}
  mixed = layout.like(unrolled, target)
  assert "blocks" in mixed["vision"] and "layer_0" in mixed["text"] and "layers" in mixed["fusion"]
  _assert_trees_close(layout.like(stacked, unrolled), unrolled, rtol=0, atol=0)
  with pytest.raises(ValueError, match=r"not numbered 0..1"):
    layout.stack({"fusion": {"layer_0": {"b": leaf(4)}, "layer_2": {"b": leaf(4)}}})
  with pytest.raises(ValueError, match="mixed layouts"):
    layout.stack({"fusion": {"layer_0": {"b": leaf(4)}, "layers": {"b": leaf(1, 4)}}})


def test_stacked_params_carry_the_layers_axis_and_shard_embed():
  config = config_lib.load_config("configs/albef.py:tiny")
  model = _scanned(vlp.build_model(config.model))
  boxed = jax.eval_shape(lambda r: state_lib._init_boxed_params(model, r), jax.random.PRNGKey(0))
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
  assert specs["fusion/layers/intermediate/dense/kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  assert specs["vision/blocks/attn/query/dense/kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")
  mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
  shardings = traverse_util.flatten_dict(
      sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules("fsdp")), sep="/")
  assert shardings["fusion/layers/intermediate/dense/kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)


# ----------------------------------------------------------------------------- pretraining steps


def _step_outputs(config_path: str, remat: str):
  """Loss, metrics, grads and per-layer outputs of one tiny step, unrolled and scanned under `remat`."""
  config = config_lib.load_config(config_path)
  config.input.synthetic = True
  config.model.vision.depth = config.model.text.text_layers = config.model.text.fusion_layers = 2
  # Dropout masks are drawn per layer path, which differs between the layouts: compare without.
  config.model.text.dropout = config.model.text.attention_dropout = 0.0
  if "mrm" in config.objectives:
    config.objectives.mrm.top_k = 2
  base = vlp.build_model(config.model)
  specs = state_lib.all_objective_specs(config)
  state = state_lib.make_init_fn(base, optax.identity(), specs)(jax.random.PRNGKey(0))
  ema = jax.tree.map(lambda x: x + 0.01, state.params)
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  batch = synthetic.make_batch_fn(config, mesh, 4)(jax.random.PRNGKey(1), 0)
  variants = {"unrolled": base, "scanned": type(base)(dataclasses.replace(base.config, scan_layers=True, remat=remat))}

  @jax.jit
  def run(params, ema):
    out = {}
    for name, model in variants.items():
      p, e = (params, ema) if name == "unrolled" else (layout.stack(params), layout.stack(ema))
      fn = step_lib.make_loss_fn(model, specs, num_groups=1)
      (loss, (metrics, _)), grads = jax.value_and_grad(fn, has_aux=True)(
          p, e, state.objective_state, batch, jax.random.PRNGKey(2), jnp.int32(10), jnp.float32(0.4))
      image = model.apply({"params": p}, batch["image"], method=model.encode_image)
      text = model.apply({"params": p}, batch["text_ids"], batch["text_mask"], method=model.encode_text)
      fused = model.apply({"params": p}, text["states"], batch["text_mask"], image["states"], image["mask"],
                          method=model.fuse)
      layers_out = dict(image_cls=image["layer_cls"], image_states=jnp.stack(list(image["layer_states"])),
                        text_cls=text["layer_cls"], text_states=jnp.stack(list(text["layer_states"])),
                        fused_text=jnp.stack(list(fused["layer_text_states"])))
      if fused["layer_image_states"] is not None:
        layers_out["fused_image"] = jnp.stack(list(fused["layer_image_states"]))
      out[name] = (loss, metrics, layout.unroll(grads), layers_out)
    return out

  return jax.device_get(run(state.params, ema))


# ALBEF (cross fusion) scanned alone; MAMO (merged fusion, masked passes, top-K fusion layers)
# scanned with a remat policy applied per scanned layer.
@pytest.mark.parametrize("config_path,remat", [("configs/albef.py:tiny", "none"), ("configs/mamo.py:tiny", "dots")])
def test_scanned_step_matches_unrolled(config_path, remat):
  results = _step_outputs(config_path, remat)
  want_loss, want_metrics, want_grads, want_layers = results["unrolled"]
  assert float(optax.global_norm(want_grads)) > 0 and want_layers["image_states"].shape[0] == 2
  loss, metrics, grads, layers_out = results["scanned"]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  _assert_trees_close(metrics, want_metrics, what="metrics")
  _assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6, what="grads")
  _assert_trees_close(layers_out, want_layers, rtol=1e-5, atol=1e-5, what="per-layer outputs")


# ----------------------------------------------------------------------------- task models


# VQA (an answer decoder beside the scanned towers) and NLVR2 (its own pair fusion, not scanned).
@pytest.mark.parametrize("config_path", ["configs/finetune_vqa.py:tiny", "configs/finetune_nlvr2.py:tiny"])
def test_scanned_task_model_matches_unrolled(config_path):
  config = config_lib.load_config(config_path)
  model = vlp.build_model(config.model)
  scanned = _scanned(model)
  params = _init(model)
  inputs = vlp.init_inputs(model.config)
  rng = np.random.default_rng(0)
  inputs = (rng.normal(size=inputs[0].shape).astype(np.float32),
            rng.integers(1, model.config.text.vocab_size, inputs[1].shape).astype(np.int32), inputs[2])

  def total(m, p):
    out = m.apply({"params": p}, *inputs)
    return sum(jnp.sum(jnp.asarray(x, jnp.float32) ** 2) for x in jax.tree.leaves(out)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)), out

  @jax.jit
  def both(p):
    (want, want_out), want_grads = jax.value_and_grad(lambda q: total(model, q), has_aux=True)(p)
    (got, got_out), got_grads = jax.value_and_grad(lambda q: total(scanned, q), has_aux=True)(layout.stack(p))
    return want, want_out, want_grads, got, got_out, layout.unroll(got_grads)

  want, want_out, want_grads, got, got_out, got_grads = jax.device_get(both(params))
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_trees_close(jax.tree.leaves(got_out), jax.tree.leaves(want_out), rtol=1e-4, atol=1e-5, what="outputs")
  _assert_trees_close(got_grads, want_grads, rtol=1e-3, atol=1e-5, what="grads")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_either_layout_restores_into_either(tmp_path):
  config = config_lib.load_config("configs/albef.py:tiny")
  model = vlp.build_model(config.model)
  unrolled = _init(model, seed=1)
  stacked = layout.stack(unrolled)
  checkpoint.export_params(stacked, tmp_path / "scanned")
  checkpoint.export_params(unrolled, tmp_path / "unrolled")
  for source in ("scanned", "unrolled"):
    loaded = checkpoint.load_params(tmp_path / source)
    assert not layout.is_scanned(loaded)   # the interchange layout, whatever was saved
    for target in (_init(model, seed=2), _init(_scanned(model), seed=2)):
      params, report = checkpoint.partial_restore(target, loaded)
      assert not report.new and not report.unused and not report.skipped, (source, report)
      _assert_trees_close(params, layout.like(unrolled, target), rtol=0, atol=0, what=source)
  # A task remap reads the interchange layout: VQA's answer decoder from the scanned export's fusion.
  vqa_config = config_lib.load_config("configs/finetune_vqa.py:tiny")
  vqa = _scanned(vlp.build_model(vqa_config.model))
  target = _init(vqa)
  params, report = checkpoint.partial_restore(target, vqa.remap_pretrained(checkpoint.load_params(tmp_path / "scanned")))
  assert "fusion/layers/crossattention/key/dense/kernel" in report.loaded
  if "answer_decoder" in target:
    np.testing.assert_array_equal(params["answer_decoder"]["layer_0"]["output"]["dense"]["kernel"],
                                  unrolled["fusion"]["layer_0"]["output"]["dense"]["kernel"])


# ----------------------------------------------------------------------------- evaluators


@pytest.fixture(scope="module")
def tiny_pair():
  config = config_lib.load_config("configs/albef.py:tiny")
  model = vlp.build_model(config.model)
  params = _init(model, seed=3)
  params["itm_head"]["dense"]["kernel"] = params["itm_head"]["dense"]["kernel"] * 50.0
  return model, params, _scanned(model), layout.stack(params)


def _eval_inputs(model, images=5, texts=9, text_len=6):
  rng = np.random.default_rng(1)
  size = model.config.vision.image_size
  lengths = rng.integers(2, text_len + 1, texts)
  text_mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
  text_ids = rng.integers(1, model.config.text.vocab_size, (texts, text_len)).astype(np.int32) * text_mask
  return rng.normal(size=(images, size, size, 3)).astype(np.float32), text_ids, text_mask


def test_cached_rerank_on_a_scanned_model(tiny_pair):
  model, params, scanned, scanned_params = tiny_pair
  images, text_ids, text_mask = _eval_inputs(model)

  def batches(arrays, size):
    total = len(next(iter(arrays.values())))
    for start in range(0, total, size):
      part = {k: v[start:start + size] for k, v in arrays.items()}
      pad = size - len(next(iter(part.values())))
      part = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
      part["valid"] = np.arange(size) < size - pad
      yield part

  def scores(m, p, image_cache):
    scorer = retrieval.Scorer(m, k_test=3, itm_batch_size=6, image_cache=image_cache, cache_block=2)
    assert scorer.image_cache == image_cache
    return [np.asarray(s) for s in scorer.scores(p, batches(dict(image=images), 4),
                                                 batches(dict(text_ids=text_ids, text_mask=text_mask), 4))]

  want = scores(model, params, False)
  for got in (scores(scanned, scanned_params, True), scores(scanned, scanned_params, False)):
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,layer", [("itm", 1), ("itc", 0)])
def test_gradcam_on_a_scanned_model(tiny_pair, mode, layer):
  model, params, scanned, scanned_params = tiny_pair
  images, text_ids, text_mask = _eval_inputs(model, images=3, texts=3)
  heat = lambda m, p: np.asarray(jax.jit(lambda q: grounding.gradcam_heatmaps(  # noqa: E731
      m, q, images, text_ids, text_mask, layer=layer, mode=mode))(p))
  want = heat(model, params)
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(heat(scanned, scanned_params), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
