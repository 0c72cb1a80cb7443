"""`vlpjax.compare`: an interrupted comparison resumes without redoing finished cells, and the
report (table, JSON, plots) agrees with the cells' own result files."""
import json
import os

import pytest

from vlpjax import compare

METHODS = ("albef", "mamo")
TASKS = ("zeroshot", "snli_ve")


class _Interrupt(Exception):
  pass


def _run(root, log):
  compare.run_all(root, METHODS, TASKS, size="tiny", steps=2, finetune_steps=2, batch=0, seeds=1,
                  budget="steps", overrides={}, log=log)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  """A tiny comparison interrupted after two finished cells, then rerun: (root, first log, second log)."""
  root = str(tmp_path_factory.mktemp("compare") / "run")
  first = []

  def stop_after_second_cell(line):
    first.append(line)
    if line == "compare: albef/seed0/zeroshot done":
      raise _Interrupt  # the run dies here, as if killed after two finished cells

  with pytest.raises(_Interrupt):
    _run(root, stop_after_second_cell)
  finished = {name: os.path.getmtime(os.path.join(root, name, "result.json"))
              for name in ("albef/seed0/pretrain", "albef/seed0/zeroshot")}
  assert not os.path.exists(os.path.join(root, "albef/seed0/snli_ve/result.json"))

  second = []
  _run(root, second.append)
  return root, finished, second


@pytest.mark.slow
def test_interrupted_comparison_resumes_and_reports(compared):
  root, finished, second = compared
  for name, mtime in finished.items():
    assert f"compare: {name} finished earlier; skipped" in second
    assert os.path.getmtime(os.path.join(root, name, "result.json")) == mtime  # not recomputed
  assert "compare: mamo/seed0/pretrain done" in second and "compare: albef/seed0/snli_ve done" in second

  report = compare.write_report(root)
  for name in ("report.md", "report.json", "loss_curves.png", "metrics.png"):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  with open(os.path.join(root, "report.json")) as f:
    saved = json.load(f)
  table = open(os.path.join(root, "report.md")).read()
  for method in METHODS:
    for task in TASKS:
      with open(os.path.join(root, method, "seed0", task, "result.json")) as f:
        cell = json.load(f)
      assert cell["status"] == "done", cell
      assert saved["cells"][f"{method}/seed0/{task}"]["metrics"] == cell["metrics"]
      metric = compare.TASKS[task].metric
      assert f"{cell['metrics'][metric]:.1f}" in table.split(f"| {method} |")[1].splitlines()[0]
    with open(os.path.join(root, method, "seed0", "pretrain", "result.json")) as f:
      pretrain = json.load(f)
    assert pretrain["step"] == 2 and pretrain["gflops_per_img"] > 0
  assert report["plan"]["methods"] == list(METHODS)
  assert "1 seed per cell" in table and "not a ranking" in table


@pytest.mark.slow
def test_compare_notebook_shows_the_table_and_plots(compared, tmp_path):
  import test_notebooks  # the notebook runner of tests/test_notebooks.py
  root, _, _ = compared
  notebook = test_notebooks._run(
      "04_compare_methods.ipynb",
      dict(METHODS=list(METHODS), TASKS=list(TASKS), SIZE="tiny", STEPS=2, FINETUNE_STEPS=2, WORKDIR=root), tmp_path)
  text = test_notebooks._text(notebook) + "".join(
      output.data["text/markdown"] for cell in notebook.cells for output in cell.get("outputs", ())
      if "text/markdown" in output.get("data", {}))
  # Every cell had finished: the notebook reports without training anything again.
  assert text.count("finished earlier; skipped") == len(METHODS) * (1 + len(TASKS))
  assert "| albef |" in text and "| mamo |" in text
  assert test_notebooks._num_figures(notebook) == 2


@pytest.mark.parametrize("task", compare.ALL_TASKS)
def test_every_method_has_a_config_or_a_reason_for_every_task(task):
  # No training: the cell configs of the three newer methods are built from their hooks.
  made = {method: compare.downstream_config(method, compare.TASKS[task], "tiny", "/ckpt/export", steps=3, batch=0,
                                            seed=0)
          for method in compare.METHODS}
  for method, config in made.items():
    assert isinstance(config, str) or config.init_from.path == "/ckpt/export", (method, task)
  vicha, vlmixer, mvp = made["vicha"], made["vlmixer"], made["mvp"]
  assert not isinstance(vicha, str)   # ViCHA runs every task, its concepts in the task's ops
  assert "concepts" in (vicha.input.get("eval_pp", "") + vicha.input.get("eval_extra_pp", "")), task
  if task == "zeroshot":
    assert vlmixer.eval.k_test == 0 and mvp.model.kind == "mvp"
  else:
    assert isinstance(vlmixer, str) and "VLMixer" in vlmixer
  assert isinstance(mvp, str) == (task in ("nlvr2", "grounding"))
  if task == "grounding":   # each Grad-CAM setting fits its model (MAMO's ITC mode: a ViT block it has)
    from vlpjax.evaluators import grounding
    from vlpjax.models import vlp
    for method, config in made.items():
      if not isinstance(config, str):
        grounding.check_gradcam_setting(vlp.build_config(config.model), *grounding.gradcam_setting(config.eval))
  if task == "nlvr2":
    assert isinstance(made["mamo"], str) and "merged" in mvp


def test_pretraining_budget_covers_every_stage_and_the_last_stage_is_exported():
  """`--steps` is the whole pretraining of every method: VLMixer's image warm-up and main stage
  shrink together (they ran 100 + 300 = 400 steps under a budget of 200 before)."""
  config = compare.pretrain_config("vlmixer", "demo", steps=200, batch=0, seed=0, overrides={})
  assert config.total_steps == 200
  assert [(s["name"], s["steps"]) for s in config.stages] == [("image_warmup", 50), ("vlmixer", 150)]
  config = compare.pretrain_config("vlmixer", "demo", steps=3, batch=0, seed=0, overrides={})
  assert [s["steps"] for s in config.stages] == [1, 2]
  with pytest.raises(ValueError, match="--steps=1 cannot cover the config's 2 stages"):
    compare.pretrain_config("vlmixer", "demo", steps=1, batch=0, seed=0, overrides={})
  assert compare.export_name(config) == "vlmixer"   # plain-dict stages (failed on `.name` before)
  assert compare.export_name(compare.pretrain_config("albef", "tiny", steps=2, batch=0, seed=0, overrides={})) == "pretrain"
