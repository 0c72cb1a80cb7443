"""A preempted or interrupted run, a NaN, bad data and a mismatched checkpoint, as a user meets them:
real subprocesses for the signals and the command-line errors."""
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_runs
from configs import albef, mamo
from vlpjax import checkpoint, train
from vlpjax.objectives import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.update(extra)
  return env


def _main_cmd(workdir, *flags, config=f"configs/albef.py:tiny,steps={STEPS}"):
  return [sys.executable, "-m", "vlpjax.main", f"--config={config}", f"--workdir={workdir}", *flags]


SYNTHETIC = ("--config.input.synthetic=True", "--config.eval.every_steps=0", "--config.checkpoint.every_steps=0",
             "--config.log_every_steps=1")


def _interrupt(workdir, signum) -> tuple[int, str, float]:
  """Starts a long tiny run, signals it after its third logged step; (exit status, output, seconds)."""
  proc = subprocess.Popen(_main_cmd(workdir, *SYNTHETIC), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f"step 3/{STEPS}" in line:
      sent = time.time()
      proc.send_signal(signum)
      break
  else:
    proc.wait()
    pytest.fail("the run ended before its third step:\n" + "".join(lines[-40:]))
  rest, _ = proc.communicate(timeout=120)
  return proc.returncode, "".join(lines) + rest, time.time() - sent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = subprocess.run(_main_cmd(workdir, *SYNTHETIC), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return tiny_runs.scalars(workdir, "train/loss")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_resume_matches(tmp_path, uninterrupted, signum):
  workdir = tmp_path / "run"
  status, output, seconds = _interrupt(workdir, signum)
  assert status == 128 + signum, output[-3000:]
  assert seconds < 60, output[-3000:]
  assert "Traceback" not in output
  stopped_at = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(workdir))).latest_step()
  assert stopped_at is not None and 3 <= stopped_at < STEPS
  assert f"stopped by {signal.Signals(signum).name} at step {stopped_at}" in output
  # The rerun resumes exactly there: every step's loss equals the uninterrupted run's.
  result = subprocess.run(_main_cmd(workdir, *SYNTHETIC), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from" in result.stderr and f"at step {stopped_at}" in result.stderr
  resumed = tiny_runs.scalars(workdir, "train/loss")
  assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(resumed[step], uninterrupted[step], rtol=1e-5, err_msg=f"step {step}")


# ----------------------------------------------------------------------------- NaN guard


@registry.register("test_nan_after_two_steps")
def _nan_after_two_steps(ctx, batch):
  del batch
  loss = jnp.where(ctx.step >= 2, jnp.nan, 0.0)
  return loss, {"loss": loss}


def test_nan_stops_without_saving_and_names_step_and_objective(tmp_path):
  config = albef.get_config("tiny,steps=6")
  config.input.synthetic = True
  config.eval.every_steps = 0
  config.checkpoint.every_steps = 2
  config.log_every_steps = 5
  config.objectives.test_nan_after_two_steps = dict(weight=1.0)
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert "step 3" in message and "objective 'test_nan_after_two_steps'" in message
  assert "resume point is step 2" in message
  assert checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir)).all_steps() == [2]


# ----------------------------------------------------------------------------- errors before compute


def _run_cli(tmp_path, *flags, config="configs/albef.py:demo", module="vlpjax.main"):
  args = [sys.executable, "-m", module, f"--config={config}", *flags]
  if module == "vlpjax.main":
    args.append(f"--workdir={tmp_path / 'work'}")
  return subprocess.run(args, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags,expected", [
    (("--config.input.source=json", "--config.input.annotations=/nonexistent/train.json"),
     "--config.input.annotations: annotation file '/nonexistent/train.json' does not exist"),
    (("--config.input.source=json", "--config.input.annotations={bad_json}"), "is not valid JSON"),
    (("--config.input.tokenizer.path=/nonexistent/vocab.txt",),
     "--config.input.tokenizer.path: tokenizer file '/nonexistent/vocab.txt' does not exist"),
    (("--config.objectives.mlm.distil=False",), "--config.objectives.mlm.distil"),
])
def test_data_and_config_errors_fail_in_one_line_before_any_compile(tmp_path, flags, expected):
  bad_json = tmp_path / "bad.json"
  bad_json.write_text('[{"image": "a.jpg", "caption": ')
  flags = [f.format(bad_json=bad_json) for f in flags]
  result = _run_cli(tmp_path, *flags)
  assert result.returncode == 2, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and expected.format(bad_json=bad_json) in error_lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "compiled" not in result.stderr  # failed before the train step was built
  assert not (tmp_path / "work").exists()  # nothing written before validation


def test_full_recipe_without_data_names_the_flag(tmp_path):
  result = _run_cli(tmp_path, config="configs/mamo.py")
  assert result.returncode == 2
  assert "error: config.input.source = 'json' needs config.input.annotations" in result.stderr
  assert not (tmp_path / "work").exists()


def test_debug_brings_the_traceback_back(tmp_path):
  result = _run_cli(tmp_path, "--config.input.tokenizer.path=/nonexistent/vocab.txt", "--debug")
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_lists_configs_and_override_syntax(tmp_path):
  result = subprocess.run([sys.executable, "-m", "vlpjax.main", "--help"], cwd=str(tmp_path), env=_env(),
                          capture_output=True, text=True, timeout=120)
  for text in ("configs/albef.py", "configs/mamo.py", "`demo`", "--config.<path>=<value>"):
    assert text in result.stdout + result.stderr, text


# ----------------------------------------------------------------------------- init_from checks


def test_init_from_a_merged_fusion_export_into_a_cross_fusion_config_is_refused(tmp_path):
  export = tmp_path / "export" / "pretrain"
  checkpoint.export_params({"w": np.zeros(3, np.float32)}, export, model_config=mamo.get_config("tiny").model)
  retrieval = albef.get_config("tiny")
  with pytest.raises(ValueError, match=r"config.model.fusion: checkpoint 'merged', config 'cross'.*"
                                       r"--config.model.fusion=merged.*allow_mismatch=True"):
    checkpoint.check_model_compatible(export, retrieval.model)
  checkpoint.check_model_compatible(export, retrieval.model, allow=True)  # warns only
  checkpoint.check_model_compatible(export, mamo.get_config("tiny").model)


def test_rerun_of_a_finished_run_says_it_is_complete(tmp_path):
  config = albef.get_config("tiny,steps=2")
  config.input.synthetic = True
  config.eval.every_steps = 0
  workdir = str(tmp_path / "done")
  train.train_and_evaluate(config, workdir)
  out = train.train_and_evaluate(config, workdir)
  assert out == {"step": 2, "complete": True}
  exported = checkpoint.stored_model_config(checkpoint.export_dir(workdir, "pretrain"))
  assert exported["fusion"] == "cross"


def test_no_file_in_the_repository_points_outside_it():
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
  if not tracked:
    pytest.skip("not a git checkout")
  offenders = []
  for name in tracked:
    if not name.endswith((".md", ".py", ".ipynb", ".toml", ".sh", ".txt")):
      continue
    with open(os.path.join(ROOT, name), errors="replace") as f:
      text = f.read()
    for needle in ("../shared/", "/work/main", "/work/shared"):
      if needle in text and name != "tests/test_reliability.py":
        offenders.append(f"{name}: {needle}")
  assert not offenders, offenders
