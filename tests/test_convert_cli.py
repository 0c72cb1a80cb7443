"""`python -m vlpjax.convert`: `--config` / `--config.model.*` like the other entry points, head
counts never guessed (read from a config in or beside the checkpoint, or given), `--help`."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import app
from safetensors.numpy import save_file

from vlpjax import checkpoint, config_lib
from vlpjax.convert import ConversionError, convert_checkpoint
from test_convert_albef import Builder, Dims, albef_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 wide with 4 heads: width / 64 would say 1 head.
BERT64 = Dims(text_width=64, text_heads=4, text_mlp=96, vocab=40, positions=12)


def _bert64(tmp_path):
  """An HF BertModel state dict, 64 wide, 2 layers, as model.safetensors with no config.json."""
  builder = Builder(seed=0, scale=0.05)
  builder.bert("", BERT64, layers=2, fusion_start=2)
  path = tmp_path / "bert64" / "model.safetensors"
  path.parent.mkdir()
  save_file(builder.sd, str(path))
  return path


def _convert(cwd, *args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "vlpjax.convert", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_head_count_is_refused_without_a_config_and_recorded_when_given(tmp_path):
  path = _bert64(tmp_path)
  refused = _convert(tmp_path, "--source=hf_bert", f"--input={path}", f"--output={tmp_path / 'out'}")
  assert refused.returncode != 0
  assert "model.text.num_heads" in refused.stderr and "--config.model.text.num_heads=N" in refused.stderr
  assert "Traceback" not in refused.stderr
  assert not (tmp_path / "out").exists()

  given = _convert(tmp_path, "--source=hf_bert", f"--input={path}", f"--output={tmp_path / 'out'}",
                   "--config.model.text.num_heads=4")
  assert given.returncode == 0, given.stderr
  written = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert written["model_config"]["text"]["num_heads"] == 4
  assert written["model_config"]["text"]["width"] == 64 and written["undetermined"] == []
  params = checkpoint.load_params(tmp_path / "out")
  assert params["text"]["layer_1"]["attention"]["query"]["dense"]["kernel"].shape == (64, 64)


def test_misspelt_override_is_named(tmp_path):
  path = _bert64(tmp_path)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_head'\] in config.model.text; known: .*'num_heads'"):
    convert_checkpoint("hf_bert", str(path), str(tmp_path / "typo"), model_overrides={"text": {"num_head": 4}})
  assert not (tmp_path / "typo").exists()


def test_help_lists_the_config_flags(tmp_path):
  result = _convert(tmp_path, "--help")
  # absl exits with 1 after printing the usage.
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr
  for flag in ("--source", "--config:", "--model_config", "--config.model.text.num_heads"):
    assert flag in result.stdout, flag


def test_heads_from_hf_config_json_beside_the_file(tmp_path):
  path = _bert64(tmp_path)
  (path.parent / "config.json").write_text(json.dumps({"num_attention_heads": 4, "layer_norm_eps": 1e-12}))
  report = convert_checkpoint("hf_bert", str(path), str(tmp_path / "out"))
  assert report.model_config["text"]["num_heads"] == 4 and not report.undetermined


def test_albef_text_heads_from_the_stored_config_and_vision_heads_refused(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  d = Dims()
  tensors = {k: torch.from_numpy(v) for k, v in albef_state_dict(d).items()}
  # ALBEF's files: the YAML config names a BERT config JSON (heads there); the ViT's heads are
  # fixed in ALBEF's code and stored nowhere.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "config_bert.json").write_text(json.dumps(
      {"num_attention_heads": d.text_heads, "layer_norm_eps": 1e-12, "fusion_layer": d.fusion_start}))
  path = tmp_path / "ALBEF.pth"
  torch.save({"model": tensors, "optimizer": {}, "config": {"bert_config": "configs/config_bert.json",
                                                            "image_res": d.patch * d.grid}, "epoch": 29}, path)
  monkeypatch.chdir(tmp_path / "configs")  # the stored path resolves against the checkpoint's folder
  with pytest.raises(ConversionError) as refused:
    convert_checkpoint("albef", str(path), str(tmp_path / "out"))
  assert "model.vision.num_heads" in str(refused.value) and "model.text.num_heads:" not in str(refused.value)
  assert "--config.model.vision.num_heads=N" in str(refused.value)
  assert not (tmp_path / "out").exists()

  report = convert_checkpoint("albef", str(path), str(tmp_path / "out"),
                              model_overrides={"vision": {"num_heads": d.vision_heads}})
  written = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert (written["model_config"]["vision"]["num_heads"], written["model_config"]["text"]["num_heads"]) == (
      d.vision_heads, d.text_heads)
  assert any("config_bert.json" in note for note in report.notes)

  # An inline BERT config works too; a stored path that is not there leaves the text heads open.
  torch.save({"model": tensors, "config": {"bert_config": {"num_attention_heads": 8}}}, path)
  inline = convert_checkpoint("albef", str(path), str(tmp_path / "inline"),
                              model_overrides={"vision": {"num_heads": 3}})
  assert inline.model_config["text"]["num_heads"] == 8 and inline.model_config["vision"]["num_heads"] == 3
  torch.save({"model": tensors, "config": {"bert_config": "elsewhere/config_bert.json"}}, path)
  with pytest.raises(ConversionError, match=r"model\.vision\.num_heads, model\.text\.num_heads"):
    convert_checkpoint("albef", str(path), str(tmp_path / "gone"))


# ----------------------------------------------------------------------------- config file + overrides


# The tiny config's model, made to fit BERT64 (its fusion then has no layers to fill).
_FIT = ("--config.model.text.vocab_size=40", "--config.model.text.width=64", "--config.model.text.num_heads=4",
        "--config.model.text.mlp_dim=96", "--config.model.text.text_layers=2",
        "--config.model.text.fusion_layers=0", "--config.model.text.max_positions=12")


def test_config_file_with_overrides_and_the_model_config_alias(tmp_path):
  path = _bert64(tmp_path)
  written = {}
  for name, spec in (("config", "--config=configs/albef.py:tiny"), ("alias", "--model_config=configs/albef.py:tiny")):
    # cwd = tmp_path: configs/ comes from the package, not the working directory.
    result = _convert(tmp_path, "--source=hf_bert", f"--input={path}", f"--output={tmp_path / name}", spec, *_FIT)
    assert result.returncode == 0, result.stderr
    written[name] = json.loads((tmp_path / name / "conversion.json").read_text())["model_config"]
  assert written["config"] == written["alias"]
  assert written["config"]["text"]["num_heads"] == 4 and written["config"]["vision"]["width"] > 0


def _blank(**model):
  config = ml_collections.ConfigDict(dict(model=dict(vision={}, text={})))
  for tower, fields in model.items():
    config.model[tower].update(fields)
  return config


def test_resolve_target(tmp_path, monkeypatch):
  from vlpjax.convert import __main__ as cli
  monkeypatch.chdir(tmp_path)
  tiny = config_lib.load_config("configs/albef.py:tiny")
  assert cli.resolve_target(tiny, True) == (tiny.model, None)
  assert cli.resolve_target(_blank(), False) == (None, None)
  assert cli.resolve_target(_blank(vision=dict(num_heads=3), text=dict(num_heads=4)), False) == (
      None, {"vision": {"num_heads": 3}, "text": {"num_heads": 4}})
  model, overrides = cli.resolve_target(_blank(text=dict(num_heads=1)), False, "configs/albef.py:tiny")
  assert overrides is None and model.text.num_heads == 1 and tiny.model.text.num_heads != 1
  assert model.vision.to_dict() == tiny.model.vision.to_dict()
  with pytest.raises(app.UsageError, match="once"):
    cli.resolve_target(tiny, True, "configs/albef.py:tiny")
  with pytest.raises(app.UsageError, match=r"--config\.model\.text\.num_head: .* no field"):
    cli.resolve_target(_blank(text=dict(num_head=2)), False, "configs/albef.py:tiny")
  with pytest.raises(app.UsageError, match=r"--config\.seed"):
    blank = _blank()
    blank.seed = 3
    cli.resolve_target(blank, False)
