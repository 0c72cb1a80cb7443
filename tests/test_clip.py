"""The Flax CLIP port against transformers' CLIPModel (random tiny weights, no download), through
both checkpoint layouts: a Hugging Face directory and an OpenAI / open_clip state dict."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlpjax.convert import clip as clip_convert  # noqa: E402
from vlpjax.convert.importer import ConversionError  # noqa: E402
from vlpjax.models import clip as clip_model  # noqa: E402

VOCAB = 64
# An end token that is NOT the largest id, so the 'eos' and 'argmax' pooling rules disagree.
EOS = 40
LENGTHS = (12, 5, 7, 1)


def tiny_hf_clip(eos_token_id: int, seed: int = 0):
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                       bos_token_id=VOCAB - 2, pad_token_id=0),
      vision_config=dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                         image_size=32, patch_size=8),
      projection_dim=24, logit_scale_init_value=2.0)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0): randomise them so a missed one shows.
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  return model


def padded_text(end_token: int, max_body_id: int, seed: int = 0):
  """ids [4, 12] right-padded with 0 to LENGTHS, each row ending in `end_token`; mask {0,1}."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, max_body_id, (len(LENGTHS), max(LENGTHS)))
  mask = np.ones_like(ids)
  for row, length in enumerate(LENGTHS):
    ids[row, length - 1] = end_token
    ids[row, length:] = 0
    mask[row, length:] = 0
  return ids.astype(np.int32), mask.astype(np.int32)


def images(seed: int = 0):
  return np.random.default_rng(seed).normal(size=(3, 32, 32, 3)).astype(np.float32)


def reference(model, ids, mask, pixels):
  with torch.no_grad():
    text = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask)).pooler_output.numpy()
    image = model.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
  return text, image


def port(config, params, ids, mask, pixels):
  model = clip_model.CLIP(config)
  text = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=model.encode_text)
  image = model.apply({"params": params}, jnp.asarray(pixels), method=model.encode_image)
  return np.asarray(text), np.asarray(image)


def assert_close(actual, expected, tol=1e-5):
  rel = np.linalg.norm(actual - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
  assert rel.max() <= tol, rel


@pytest.fixture(scope="module")
def hf_eos(tmp_path_factory):
  model = tiny_hf_clip(EOS)
  directory = str(tmp_path_factory.mktemp("hf_eos"))
  model.save_pretrained(directory)
  return model, directory


@pytest.fixture(scope="module")
def hf_legacy(tmp_path_factory):
  model = tiny_hf_clip(clip_model.LEGACY_EOS_TOKEN_ID, seed=1)
  directory = str(tmp_path_factory.mktemp("hf_legacy"))
  model.save_pretrained(directory)
  return model, directory


def test_hf_directory_eos_pooling_matches_transformers(hf_eos):
  model, directory = hf_eos
  config, params = clip_convert.load_clip(directory)
  assert config.text.text_pool == "eos" and config.text.eos_token_id == EOS
  assert config.vision.num_heads == 3 and config.embed_dim == 24
  # Body tokens above the end token: argmax pooling would read another position.
  ids, mask = padded_text(EOS, VOCAB - 2)
  assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).any()
  pixels = images()
  text, image = port(config, params, ids, mask, pixels)
  ref_text, ref_image = reference(model, ids, mask, pixels)
  assert_close(text, ref_text)
  assert_close(image, ref_image)
  np.testing.assert_allclose(params["logit_scale"], 2.0)
  # Padding changes nothing before the end token: the unmasked call gives the same embedding.
  unmasked, _ = port(config, params, ids, np.ones_like(mask), pixels)
  assert_close(unmasked, ref_text)


def test_hf_directory_legacy_argmax_pooling(hf_legacy):
  model, directory = hf_legacy
  config, params = clip_convert.load_clip(directory)
  assert config.text.text_pool == "argmax"
  ids, mask = padded_text(VOCAB - 1, VOCAB - 3, seed=2)
  pixels = images(1)
  text, image = port(config, params, ids, mask, pixels)
  ref_text, ref_image = reference(model, ids, mask, pixels)
  assert_close(text, ref_text)
  assert_close(image, ref_image)


def test_pooling_rules_differ_where_they_should():
  ids = jnp.asarray([[5, 9, 7, 0], [3, 7, 9, 9]])
  np.testing.assert_array_equal(clip_model.pool_positions(ids, "argmax", 7), [1, 2])
  np.testing.assert_array_equal(clip_model.pool_positions(ids, "eos", 7), [2, 1])
  np.testing.assert_array_equal(clip_model.pool_positions(jnp.asarray([[5, 6]]), "eos", 7), [0])


def openai_state_dict(model) -> dict:
  """The OpenAI / open_clip layout of an HF CLIPModel: renames, fused qkv, untransposed projections."""
  hf = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  out = {
      "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
      "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
      "visual.proj": hf["visual_projection.weight"].T,
      "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
      "text_projection": hf["text_projection.weight"].T,
      "logit_scale": hf["logit_scale"],
  }
  for hf_name, name in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                        ("vision_model.post_layernorm", "visual.ln_post"), ("text_model.final_layer_norm", "ln_final")):
    out[f"{name}.weight"], out[f"{name}.bias"] = hf[f"{hf_name}.weight"], hf[f"{hf_name}.bias"]
  for hf_tower, tower in (("vision_model", "visual."), ("text_model", "")):
    for i in range(2):
      src, dst = f"{hf_tower}.encoder.layers.{i}", f"{tower}transformer.resblocks.{i}"
      for part in ("weight", "bias"):
        out[f"{dst}.ln_1.{part}"] = hf[f"{src}.layer_norm1.{part}"]
        out[f"{dst}.ln_2.{part}"] = hf[f"{src}.layer_norm2.{part}"]
        out[f"{dst}.attn.in_proj_{part}"] = np.concatenate(
            [hf[f"{src}.self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")])
        out[f"{dst}.attn.out_proj.{part}"] = hf[f"{src}.self_attn.out_proj.{part}"]
        out[f"{dst}.mlp.c_fc.{part}"] = hf[f"{src}.mlp.fc1.{part}"]
        out[f"{dst}.mlp.c_proj.{part}"] = hf[f"{src}.mlp.fc2.{part}"]
  return out


def test_openai_layout_matches_transformers(hf_legacy, tmp_path):
  model, _ = hf_legacy
  state_dict = openai_state_dict(model)
  state_dict["attn_mask"] = np.zeros((16, 16), np.float32)  # open_clip's buffer: dropped on purpose
  path = str(tmp_path / "openai.pth")
  torch.save({"state_dict": {f"module.{k}": torch.tensor(v) for k, v in state_dict.items()}, "epoch": 3}, path)
  config, params = clip_convert.load_clip(path, vision_heads=3, text_heads=4)
  vision = config.vision
  assert (vision.image_size, vision.patch_size, vision.width, vision.depth) == (32, 8, 48, 2)
  assert (config.text.vocab_size, config.text.context_length, config.text.mlp_dim) == (VOCAB, 16, 37)
  assert config.text.text_pool == "argmax" and config.vision.act == "quick_gelu" and config.embed_dim == 24
  ids, mask = padded_text(VOCAB - 1, VOCAB - 3, seed=3)
  pixels = images(2)
  text, image = port(config, params, ids, mask, pixels)
  ref_text, ref_image = reference(model, ids, mask, pixels)
  assert_close(text, ref_text)
  assert_close(image, ref_image)


def test_openai_torchscript_archive_needs_trust(hf_legacy, tmp_path):
  model, _ = hf_legacy
  state_dict = openai_state_dict(model)

  class Holder(torch.nn.Module):
    def forward(self, x):
      return x

  root = Holder()
  for key, value in state_dict.items():  # nested modules so that the archive keeps the dotted names
    *path, leaf = key.split(".")
    module = root
    for part in path:
      if not hasattr(module, part):
        module.add_module(part, Holder())
      module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value)))
  path = str(tmp_path / "ViT-tiny.pt")
  torch.jit.trace(root, torch.zeros(1)).save(path)
  with pytest.raises(ValueError, match="TorchScript.*trust_pickle"):
    clip_convert.load_clip(path, vision_heads=3, text_heads=4)
  config, params = clip_convert.load_clip(path, trust_pickle=True, vision_heads=3, text_heads=4)
  ids, mask = padded_text(VOCAB - 1, VOCAB - 3, seed=4)
  text, _ = port(config, params, ids, mask, images())
  assert_close(text, reference(model, ids, mask, images())[0])


def test_openai_heads_and_activation_inference():
  state = {"visual.conv1.weight": np.zeros((128, 3, 16, 16)), "visual.positional_embedding": np.zeros((197, 128)),
           "token_embedding.weight": np.zeros((100, 192)), "positional_embedding": np.zeros((77, 192)),
           "ln_final.weight": np.zeros((192,)), "text_projection": np.zeros((192, 64)),
           "visual.transformer.resblocks.0.mlp.c_fc.weight": np.zeros((512, 128)),
           "visual.transformer.resblocks.1.ln_1.weight": np.zeros((128,)),
           "transformer.resblocks.0.mlp.c_fc.weight": np.zeros((768, 192))}
  config, notes = clip_convert.config_from_openai(state)
  assert (config.vision.num_heads, config.text.num_heads) == (2, 3)  # width / 64
  assert (config.vision.image_size, config.vision.depth, config.text.depth, config.embed_dim) == (224, 2, 1, 64)
  assert config.vision.act == "quick_gelu" and any("width / 64" in n for n in notes)
  open_clip = {"model_cfg": {"vision_cfg": {"head_width": 32}, "text_cfg": {"heads": 6}}}
  config, _ = clip_convert.config_from_openai(state, open_clip_config=open_clip)
  assert (config.vision.num_heads, config.text.num_heads, config.vision.act) == (4, 6, "gelu")
  odd = dict(state, **{"ln_final.weight": np.zeros((96,))})
  with pytest.raises(ValueError, match="text attention heads.*96.*text_heads"):
    clip_convert.config_from_openai(odd)
  assert clip_convert.config_from_openai(odd, text_heads=4)[0].text.num_heads == 4


def test_strict_key_report(hf_eos):
  model, directory = hf_eos
  config = clip_model.config_from_hf(json.load(open(os.path.join(directory, "config.json"))))
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  _, _, report = clip_convert.convert_state_dict(state, config)
  assert not report.failures() and len(report.converted) == len(state)
  extra = dict(state, **{"text_model.pooler.weight": np.zeros((2,))})
  del extra["vision_model.post_layernorm.bias"]
  _, _, report = clip_convert.convert_state_dict(extra, config)
  assert "text_model.pooler.weight" in report.unmapped
  assert report.missing == ["vision_model.post_layernorm.bias"]
  assert report.not_converted == ["vision/ln_post/norm/bias"]
  with pytest.raises(ValueError, match="text_projection.weight.*expects"):
    clip_convert.convert_state_dict(dict(state, **{"text_projection.weight": np.zeros((24, 31))}), config)
  with pytest.raises(ValueError, match="ResNet"):
    clip_convert.detect_layout({"visual.attnpool.c_proj.weight": 0, "token_embedding.weight": 0})


def test_load_clip_refuses_incomplete_directory(hf_eos, tmp_path):
  model, _ = hf_eos
  from safetensors.numpy import save_file
  state = {k: v.detach().numpy() for k, v in model.state_dict().items() if "visual_projection" not in k}
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="config.json"):
    clip_convert.load_clip(str(tmp_path))
  model.config.to_json_file(str(tmp_path / "config.json"))
  with pytest.raises(ConversionError, match="missing +visual_projection.weight"):
    clip_convert.load_clip(str(tmp_path))


def test_config_from_hf_defaults_and_errors():
  config = clip_model.config_from_hf({"text_config": {}, "vision_config": {"patch_size": 16}})
  assert config == clip_model.ClipConfig(vision=clip_model.ClipVisionConfig(patch_size=16))
  with pytest.raises(ValueError, match="x.json: not a CLIPModel config"):
    clip_model.config_from_hf({"model_type": "bert"}, where="x.json")
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    clip_model.config_from_hf({"text_config": {"hidden_act": "relu"}, "vision_config": {}})
