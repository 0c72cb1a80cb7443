"""Fine-tuning from an MVP checkpoint: the VQA classifier and SNLI-VE kinds restore MVP's towers,
and the retrieval config (VSC + hardest-negative ITM, VSC ranking then ITM rerank) trains from a
tiny MVP export and evaluates."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune_mvp, mvp
from vlpjax import checkpoint, evaluate, train
from vlpjax.models import vlp


@pytest.fixture(scope="module")
def mvp_export(tmp_path_factory):
  """A tiny MVP params export (what `configs/mvp.py:tiny` writes to export/pretrain)."""
  config = mvp.get_config("tiny")
  model = vlp.build_model(config.model)
  params = jax.jit(lambda r: nn.unbox(model.init({"params": r, "dropout": r}, *vlp.init_inputs(model.config))))(
      jax.random.PRNGKey(3))["params"]
  path = str(tmp_path_factory.mktemp("mvp") / "export")
  checkpoint.export_params(jax.device_get(params), path)
  return path, jax.device_get(params)


@pytest.mark.parametrize("task", ["vqa", "snli_ve"])
def test_task_heads_restore_the_mvp_towers(mvp_export, task):
  path, pretrained = mvp_export
  config = finetune_mvp.get_config(f"{task},tiny")
  model, params, report = evaluate.restore_params(config, path)
  loaded = {p.split("/")[0] for p in report.loaded}
  assert {"vision", "text", "fusion"} <= loaded
  head = "vqa_head" if task == "vqa" else "cls_head"
  assert any(p.startswith(head) for p in report.new) and not any(p.startswith(head) for p in report.loaded)
  np.testing.assert_array_equal(params["text"]["embeddings"]["word"]["embedding"],
                                pretrained["text"]["embeddings"]["word"]["embedding"])  # phrase rows included
  size = config.model.vision.image_size
  images = jnp.zeros((2, size, size, 3))
  ids = jnp.array([[2, 7, 9, 0], [2, 5, 0, 0]])
  mask = (ids > 0).astype(jnp.int32)
  if task == "vqa":
    states = model.apply({"params": params}, images, ids, mask, method=model.vqa_encode)
    # The demo answers at the demo sizes (the eval refuses a head of another size), VQA v2's 3,129 in full.
    from input_pipeline import demo_tasks
    answers = len(demo_tasks.vqa_answers())
    assert model.apply({"params": params}, states[:, 0], method=model.vqa_logits).shape == (2, answers)
    assert finetune_mvp.get_config("vqa").model.num_answers == 3129
  else:
    assert model.apply({"params": params}, images, ids, mask, method=model.cls_logits).shape == (2, 3)
  # MVP's cross-modal encoder sees the patches only (the ViT CLS is dropped).
  image = model.apply({"params": params}, images, method=model.encode_image)
  text = model.apply({"params": params}, ids, mask, method=model.encode_text)
  fused = model.apply({"params": params}, text["states"], mask, image["states"], method=model.fuse)
  assert fused["image_states"].shape[1] == config.model.vision.image_size ** 2 // config.model.vision.patch_size ** 2


def test_retrieval_finetunes_from_an_mvp_export_and_reranks(mvp_export, tmp_path):
  path, _ = mvp_export
  config = finetune_mvp.get_config("retrieval,tiny,steps=2")
  config.init_from.path = path
  config.sharding.mesh = dict(data=8)
  config.eval.every_steps = 2
  assert config.eval.k_test > 0 and config.model.heads == ("vsc", "itm")
  out = train.train_and_evaluate(config, str(tmp_path / "ft"))
  assert np.isfinite(out["train/vsc/loss"]) and np.isfinite(out["train/itm/loss"])
  assert 0 <= out["eval/r_mean"] <= 100 and out["eval/num_texts"] > out["eval/num_images"]
