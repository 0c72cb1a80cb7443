"""ViT importers (HF ViTModel, timm / DeiT) and PyTorch-compatible position-embedding resampling.

Parity: converted weights run through `VLPModel.encode_image` give transformers' `ViTModel`
`last_hidden_state` (final LayerNorm applied) to a relative error <= 1e-5 in float32.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlpjax import checkpoint
from vlpjax.convert import convert_checkpoint, convert_state_dict, importer, resample, torch_io
from vlpjax.convert import vit as vit_keys
from vlpjax.models import bert, vit, vlp
from parity import max_relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP = 32, 8, 32, 2, 4, 64



def hf_vit_model():
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                  intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH,
                                  layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
  model = transformers.ViTModel(config, add_pooling_layer=False).eval()
  with torch.no_grad():  # HF initialises LayerNorms to (1, 0) and biases to 0: make them count.
    for name, param in model.named_parameters():
      if "layernorm" in name or name.endswith("bias"):
        param.add_(0.1 * torch.randn_like(param))
  return model


def model_config(image_size=IMAGE) -> vlp.ModelConfig:
  return vlp.ModelConfig(
      vision=vit.VisionConfig(image_size=image_size, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                              num_heads=HEADS, mlp_ratio=MLP / WIDTH, layer_norm_eps=1e-6),
      text=bert.TextConfig(vocab_size=16, width=16, num_heads=2, mlp_dim=32, text_layers=1,
                           fusion_layers=1, max_positions=8),
      embed_dim=8)


def full_params(cfg: vlp.ModelConfig, converted: dict) -> dict:
  """Converted params merged into a zero-filled tree of the whole model (loads every leaf given)."""
  zeros = {path: np.zeros(shape, np.float32) for path, shape in importer.model_param_shapes(cfg).items()}
  merged, report = checkpoint.partial_restore(traverse_util.unflatten_dict(zeros, sep="/"), converted)
  assert not report.unused
  return merged


def encode_image(cfg, params, images):
  model = vlp.VLPModel(cfg)
  run = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vlp.VLPModel.encode_image)["states"])
  return np.asarray(run(params, images))


def timm_state_dict_from_hf(model) -> dict:
  """The same weights under timm names, with q, k, v fused into one qkv projection."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  sd = {vit_keys.canonical_hf_key(k): v for k, v in sd.items()}
  out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
         "head.weight": np.zeros((10, WIDTH), np.float32), "head.bias": np.zeros((10,), np.float32)}
  for i in range(DEPTH):
    hf, timm = f"encoder.layer.{i}.", f"blocks.{i}."
    for part in ("weight", "bias"):
      out[f"{timm}norm1.{part}"] = sd[f"{hf}layernorm_before.{part}"]
      out[f"{timm}attn.qkv.{part}"] = np.concatenate(
          [sd[f"{hf}attention.attention.{n}.{part}"] for n in ("query", "key", "value")], axis=0)
      out[f"{timm}attn.proj.{part}"] = sd[f"{hf}attention.output.dense.{part}"]
      out[f"{timm}norm2.{part}"] = sd[f"{hf}layernorm_after.{part}"]
      out[f"{timm}mlp.fc1.{part}"] = sd[f"{hf}intermediate.dense.{part}"]
      out[f"{timm}mlp.fc2.{part}"] = sd[f"{hf}output.dense.{part}"]
  return out


@pytest.fixture(scope="module")
def hf_vit():
  return hf_vit_model()


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)


def test_hf_vit_parity_from_saved_files(hf_vit, images, tmp_path):
  hf_vit.save_pretrained(tmp_path / "hf")
  report = convert_checkpoint("hf_vit", str(tmp_path / "hf"), str(tmp_path / "out"))
  assert not report.unmapped and not report.missing and not report.not_in_model
  assert report.not_converted == ["vision/mask_token"]
  assert report.model_config["vision"]["num_heads"] == HEADS  # read from config.json
  assert report.model_config["vision"]["layer_norm_eps"] == 1e-6
  assert not os.path.exists(tmp_path / "out" / "ema_params")
  assert json.loads((tmp_path / "out" / "conversion.json").read_text())["source"] == "hf_vit"
  params = checkpoint.load_params(tmp_path / "out")  # DIR/params

  cfg = model_config()
  ours = encode_image(cfg, full_params(cfg, params), images)
  with torch.no_grad():
    reference = hf_vit(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  assert ours.shape == reference.shape == (2, 1 + (IMAGE // PATCH) ** 2, WIDTH)
  assert max_relative_error(ours, reference) <= 1e-5


def test_hf_vit_in_memory_names_convert_the_same(hf_vit, tmp_path):
  # transformers >= 5 renames modules in memory (layers.N.attention.q_proj, mlp.fc1, ...).
  in_memory = {k: v.numpy() for k, v in hf_vit.state_dict().items()}
  assert any(".q_proj." in k for k in in_memory)
  hf_vit.save_pretrained(tmp_path)
  from_file, _, _ = convert_state_dict("hf_vit", torch_io.read_state_dict(str(tmp_path)))
  from_memory, _, report = convert_state_dict("hf_vit", in_memory)
  assert not report.unmapped and not report.missing
  flat_file = traverse_util.flatten_dict(from_file, sep="/")
  flat_memory = traverse_util.flatten_dict(from_memory, sep="/")
  assert flat_file.keys() == flat_memory.keys()
  for path in flat_file:
    np.testing.assert_array_equal(flat_file[path], flat_memory[path], err_msg=path)


def test_timm_layout_converts_to_the_same_params(hf_vit, images):
  hf_params, _, _ = convert_state_dict("hf_vit", {k: v.numpy() for k, v in hf_vit.state_dict().items()})
  timm_params, ema, report = convert_state_dict("timm_vit", timm_state_dict_from_hf(hf_vit))
  assert ema is None
  assert not report.unmapped and not report.missing
  assert set(report.ignored) == {"head.weight", "head.bias"}
  flat_hf = traverse_util.flatten_dict(hf_params, sep="/")
  flat_timm = traverse_util.flatten_dict(timm_params, sep="/")
  assert flat_hf.keys() == flat_timm.keys()
  for path in flat_hf:
    np.testing.assert_array_equal(flat_hf[path], flat_timm[path], err_msg=path)
  # qkv rows split into thirds in q, k, v order, each transposed to a [in, out] kernel.
  qkv = timm_state_dict_from_hf(hf_vit)["blocks.1.attn.qkv.weight"]
  np.testing.assert_array_equal(flat_timm["vision/block_1/attn/key/dense/kernel"], qkv[WIDTH:2 * WIDTH].T)


def test_timm_unknown_key_is_reported(hf_vit):
  state_dict = timm_state_dict_from_hf(hf_vit)
  state_dict["dist_token"] = np.zeros((1, 1, WIDTH), np.float32)  # a distilled DeiT
  _, _, report = convert_state_dict("timm_vit", state_dict, model_overrides={"vision": {"num_heads": HEADS}})
  assert list(report.unmapped) == ["dist_token"]
  assert report.failures() and not report.failures(allow_unmapped=True)


@pytest.mark.parametrize("in_size,out_size", [(16, 24), (24, 16), (16, 23), (4, 6), (5, 2)])
def test_bicubic_matches_torch_interpolate(in_size, out_size):
  rng = np.random.default_rng(in_size * 100 + out_size)
  grid = rng.standard_normal((in_size, in_size, 7)).astype(np.float32)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(out_size, out_size), mode="bicubic",
      align_corners=False)[0].permute(1, 2, 0).numpy()
  assert max_relative_error(resample.resize_bicubic(grid, out_size, out_size), reference) <= 1e-5


def test_bicubic_matrix_matches_the_kernel_by_hand():
  # Upsampling 4 -> 8: output 3 sits at source 1.25 (taps 0..3, t = 0.25, a = -0.75).
  a, t = -0.75, 0.25
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  np.testing.assert_allclose(resample.bicubic_matrix(4, 8)[3], [far(1 + t), near(t), near(1 - t), far(2 - t)])
  # Output 0 sits at source -0.25: taps -2..1 clamp onto rows 0 and 1; rows still sum to one.
  matrix = resample.bicubic_matrix(4, 8)
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
  np.testing.assert_allclose(matrix[0], [far(1.75) + near(0.75) + near(0.25), far(1.25), 0, 0])


def test_image_res_resamples_position_embedding(hf_vit, images):
  state_dict = {k: v.numpy() for k, v in hf_vit.state_dict().items()}
  params, _, report = convert_state_dict("hf_vit", state_dict, image_res=48)
  pos = state_dict["embeddings.position_embeddings"]
  grid = torch.from_numpy(pos[0, 1:]).reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
  reference = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
  reference = reference.permute(0, 2, 3, 1).reshape(1, 36, WIDTH).numpy()
  reference = np.concatenate([pos[:, :1], reference], axis=1)
  assert params["vision"]["pos_embedding"].shape == (1, 37, WIDTH)
  assert max_relative_error(params["vision"]["pos_embedding"], reference) <= 1e-5
  assert report.model_config["vision"]["image_size"] == 48
  assert any("4x4 -> 6x6" in note for note in report.notes)
  # The resampled model runs at the new resolution.
  cfg = model_config(48)
  big_images = np.random.default_rng(1).standard_normal((1, 48, 48, 3)).astype(np.float32)
  assert encode_image(cfg, full_params(cfg, params), big_images).shape == (1, 37, WIDTH)


def test_image_res_must_agree_with_the_model_config(hf_vit):
  state_dict = {k: v.numpy() for k, v in hf_vit.state_dict().items()}
  with pytest.raises(ValueError, match="image_res=48 disagrees"):
    convert_state_dict("hf_vit", state_dict, model_config(IMAGE), image_res=48)
  params, _, _ = convert_state_dict("hf_vit", state_dict, model_config(40))  # the config's res wins
  assert params["vision"]["pos_embedding"].shape == (1, 26, WIDTH)


def test_non_square_position_table_is_rejected():
  with pytest.raises(ValueError, match="do not form a square grid"):
    resample.resample_pos_embedding(np.zeros((1, 1 + 12, 4), np.float32), 4, name="pos_embed")
