"""MVPTR importer: a state dict in MVPTR's layout, built here from its key names out of random
transformers BERT modules, converts with a strict report (the region-feature embedding and the
visual encoder skipped with their reasons), and the converted MVP model reproduces the
PyTorch computations of the parts that map: text encoder, cross-modal encoder, VSC projections,
pooler + ITM head (classes swapped), MLM and MCR heads."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import checkpoint
from vlpjax.convert import ConversionError, convert_checkpoint, convert_state_dict, importer
from vlpjax.models import mvp, vlp
from parity import max_relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS, PHRASES, WIDTH, HEADS, MLP, LAYERS, POSITIONS = 40, 9, 32, 4, 64, 2, 32


def _bert_config():
  return transformers.BertConfig(vocab_size=WORDS + PHRASES, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, intermediate_size=MLP, max_position_embeddings=POSITIONS,
                                 hidden_act="gelu", attn_implementation="eager")


def _perturbed(module):
  with torch.no_grad():  # HF initialises LayerNorms to (1, 0) and biases to 0: make them count.
    for name, param in module.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        param.add_(0.1 * torch.randn_like(param))
  return module.eval()


@pytest.fixture(scope="module")
def mvptr():
  """(state dict in MVPTR's key layout, the torch modules it came from)."""
  torch.manual_seed(0)
  config = _bert_config()
  text = _perturbed(transformers.BertForPreTraining(config))  # embeddings, txt layers, pooler, cls
  vis = _perturbed(transformers.BertModel(config))
  mul = _perturbed(transformers.BertModel(config))
  half = _perturbed(transformers.BertForPreTraining(config))
  sd = {}
  for key, value in text.state_dict().items():
    if key.startswith("bert.encoder."):
      sd[key.replace("bert.encoder.", "bert.txt_encoder.")] = value
    elif key.startswith("cls.predictions."):
      sd[key] = value[:WORDS] if key.endswith(("bias", "decoder.weight")) else value  # only_vocab heads
    else:
      sd[key] = value
  sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"][:WORDS]
  for key, value in vis.state_dict().items():
    if key.startswith("encoder."):
      sd["bert.vis_" + key] = value
  for key, value in mul.state_dict().items():
    if key.startswith("encoder."):
      sd["bert.mul_" + key] = value
  for key, value in half.state_dict().items():
    if key.startswith("cls.predictions."):
      new = "half_mlm." + key[len("cls.predictions."):]
      sd[new] = value[:WORDS] if key.endswith(("bias", "decoder.weight")) else value
  sd["half_mlm.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"][:WORDS]
  sd["bert.txt_proj"] = torch.randn(WIDTH, 16) * WIDTH ** -0.5
  sd["bert.vis_proj"] = torch.randn(WIDTH, 16) * WIDTH ** -0.5
  sd["logit_scale"] = torch.tensor(np.log(1 / 0.07), dtype=torch.float32)
  sd["bert.img_embedding.weight"] = torch.randn(WIDTH, 2054)
  sd["bert.img_embedding.bias"] = torch.randn(WIDTH)
  sd["qa_head.weight"] = torch.randn(5, WIDTH)
  sd["qa_head.bias"] = torch.randn(5)
  return {k: v.detach().numpy().copy() for k, v in sd.items()}, dict(text=text, mul=mul, half=half)


def test_report_is_strict_and_names_what_is_skipped(mvptr):
  sd, _ = mvptr
  params, ema, report = convert_state_dict("mvp", sd, hints={"num_attention_heads": HEADS})
  assert ema is None
  assert not report.unmapped and not report.missing and not report.not_in_model and not report.undetermined
  assert "region-feature embedding (2054 -> 768)" in report.ignored["bert.img_embedding.weight"]
  assert "ViT" in report.ignored["bert.vis_encoder.layer.0.attention.self.query.weight"]
  assert "tied" in report.ignored["cls.predictions.decoder.weight"]
  assert report.tied == {"cls.predictions.decoder.bias": "cls.predictions.bias",
                         "half_mlm.decoder.bias": "half_mlm.bias"}
  config = report.model_config
  assert config["kind"] == "mvp" and config["text"]["vocab_size"] == WORDS and config["phrase_vocab_size"] == PHRASES
  assert config["text"]["text_layers"] == LAYERS and config["text"]["fusion_layers"] == LAYERS
  assert set(config["heads"]) == {"vsc", "itm", "mlm", "mcr"}
  assert params["text"]["embeddings"]["word"]["embedding"].shape == (WORDS + PHRASES, WIDTH)
  np.testing.assert_array_equal(params["fusion"]["modality_embedding"], 0.0)
  # Newly initialised: only MCR's phrase part (a vlpjax addition), inside the converted subtrees.
  assert all(path.startswith("mcr_head/phrase_") for path in report.not_converted), report.not_converted


def test_head_counts_are_required(mvptr):
  sd, _ = mvptr
  _, _, report = convert_state_dict("mvp", sd)
  assert report.undetermined == ["model.text.num_heads"]


def _model(report):
  cfg = importer.complete_model_config(report.model_config)
  return vlp.model_for_config(cfg), cfg


def _torch_layers(layers, x, mask):
  additive = (1.0 - mask[:, None, None, :].float()) * -1e9
  for layer in layers:
    out = layer(x, attention_mask=additive)
    x = out[0] if isinstance(out, tuple) else out
  return x


def test_converted_model_matches_the_pytorch_parts(mvptr):
  sd, modules = mvptr
  params, _, report = convert_state_dict("mvp", sd, hints={"num_attention_heads": HEADS})
  model, cfg = _model(report)
  fresh = jax.jit(lambda r: __import__("flax").linen.unbox(
      model.init({"params": r, "dropout": r}, *vlp.init_inputs(cfg))))(jax.random.PRNGKey(0))["params"]
  params, restore = checkpoint.partial_restore(jax.device_get(fresh), params)
  assert not restore.unused

  rng = np.random.default_rng(1)
  ids = rng.integers(1, WORDS + PHRASES, (3, 7))
  mask = (np.arange(7)[None] < np.array([[7], [5], [3]])).astype(np.int64)
  ids *= mask
  text, mul, half = modules["text"], modules["mul"], modules["half"]
  with torch.no_grad():
    want_text = text.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  got_text = model.apply({"params": params}, ids, mask, method=model.encode_text)["states"]
  valid = mask > 0  # padded positions differ by design (no output is read there)
  assert max_relative_error(np.asarray(got_text)[valid], want_text[valid]) < 1e-5

  # Cross-modal encoder over [text ; patches]: the image states' first token (the ViT CLS) is dropped.
  patches = rng.standard_normal((3, 4, WIDTH)).astype(np.float32)
  image_states = np.concatenate([np.full((3, 1, WIDTH), 9.0, np.float32), patches], axis=1)
  fused = model.apply({"params": params}, jnp.asarray(want_text), mask, jnp.asarray(image_states)[:, :1 + 4],
                      method=model.fuse)
  joint_mask = np.concatenate([mask, np.ones((3, 4), np.int64)], axis=1)
  with torch.no_grad():
    want_fused = _torch_layers(mul.encoder.layer, torch.tensor(np.concatenate([want_text, patches], axis=1)),
                               torch.tensor(joint_mask)).numpy()
  got_fused = np.concatenate([np.asarray(fused["text_states"]), np.asarray(fused["image_states"])], axis=1)
  assert max_relative_error(got_fused[joint_mask > 0], want_fused[joint_mask > 0]) < 1e-5

  cls = want_fused[:, 0]
  with torch.no_grad():
    pooled = text.bert.pooler.dense(torch.tensor(cls)).tanh()
    want_itm = text.cls.seq_relationship(pooled).numpy()[:, ::-1]
    want_mlm = text.cls.predictions(torch.tensor(want_fused)).numpy()[..., :WORDS]
    want_mcr = half.cls.predictions.transform(torch.tensor(want_fused))
    want_mcr = (want_mcr @ text.bert.embeddings.word_embeddings.weight[:WORDS].T).numpy() + sd["half_mlm.bias"]
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(cls), method=model.itm_logits), want_itm,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(want_fused), method=model.mlm_logits),
                             want_mlm, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(want_fused), method=mvp.mcr_logits),
                             want_mcr, rtol=1e-4, atol=1e-4)
  want_proj = cls @ sd["bert.txt_proj"]
  want_proj /= np.linalg.norm(want_proj, axis=-1, keepdims=True)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(cls), method=model.project_text),
                             want_proj, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.apply({"params": params}, method=mvp.vsc_logit_scale), np.log(1 / 0.07), rtol=1e-6)


def test_command_reads_a_huggingface_directory(mvptr, tmp_path):
  sd, _ = mvptr
  folder = tmp_path / "pretrained_base"
  folder.mkdir()
  torch.save({k: torch.tensor(v) for k, v in sd.items()}, folder / "pytorch_model.bin")
  (folder / "config.json").write_text(json.dumps({"num_attention_heads": HEADS, "hidden_size": WIDTH}))
  report = convert_checkpoint("mvp", str(folder), str(tmp_path / "out"))
  assert report.source == "mvp"
  loaded = checkpoint.load_params(str(tmp_path / "out" / "params"))
  assert loaded["vsc_head"]["txt_proj"].shape == (WIDTH, 16)
  written = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert "bert.img_embedding.weight" in written["ignored"]
  # A key nothing maps fails the strict conversion, writing nothing.
  sd_bad = dict(sd, **{"bert.extra.weight": np.zeros(3, np.float32)})
  torch.save({k: torch.tensor(v) for k, v in sd_bad.items()}, folder / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="bert.extra.weight"):
    convert_checkpoint("mvp", str(folder), str(tmp_path / "out2"))
  assert not (tmp_path / "out2").exists()
