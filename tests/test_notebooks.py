"""The Colab notebooks run top to bottom (nbclient, a real IPython kernel) with tiny parameters.

Each notebook is read, a cell that overrides its parameters is inserted after the cell tagged
`parameters` (papermill's convention), and the copy is executed with the repository root as its
working directory; the executed copy is written to the test's tmp dir for inspection. Notebook 01
pretrains; 02 and 03 start from its export, as a user running them in order would.
"""
import os
import pathlib
import re

import nbformat
from nbclient import NotebookClient
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("01_quickstart.ipynb", "02_zero_shot_retrieval.ipynb", "03_finetune_retrieval.ipynb",
             "04_compare_methods.ipynb")
MAMO_OBJECTIVES = ("itc", "itm", "mlm", "mrm", "mim")
RECALL_COLUMNS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean")
CELL_TIMEOUT_S = 300


def _with_parameters(notebook: nbformat.NotebookNode, overrides: dict) -> nbformat.NotebookNode:
  """`notebook` with a cell assigning `overrides` inserted after its `parameters` cell."""
  tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", ())]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  names = set(re.findall(r"^([A-Z_]+) = ", notebook.cells[tagged[0]].source, flags=re.M))
  unknown = sorted(set(overrides) - names)
  assert not unknown, f"overrides {unknown} are not parameters of the notebook (it has {sorted(names)})"
  source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
  notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
  return notebook


def _kernel_env(tmp: pathlib.Path) -> dict:
  """The kernel's environment: this process's, with the data and compile caches under `tmp`."""
  env = dict(os.environ)
  env.update(
      # One CPU device as on a Colab CPU runtime (conftest's 8 simulated devices are for the
      # sharding tests), and less LLVM optimisation: compiling dominates these tiny runs.
      XLA_FLAGS="--xla_backend_optimization_level=0",
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="2",
      VLPJAX_DATA_DIR=str(tmp / "data"),
      # The eval encoders have the same shapes in all three notebooks: compile them once.
      JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
      MPLBACKEND="module://matplotlib_inline.backend_inline",
  )
  return env


def _run(name: str, overrides: dict, tmp: pathlib.Path) -> nbformat.NotebookNode:
  """Executes colab/`name` with `overrides`; raises nbclient's CellExecutionError on a failing cell."""
  notebook = _with_parameters(nbformat.read(COLAB / name, as_version=4), overrides)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}})
  try:
    client.execute(env=_kernel_env(tmp))
  finally:
    nbformat.write(notebook, tmp / name)
  return notebook


def _text(notebook) -> str:
  """Everything the code cells printed (streams and text/plain results)."""
  parts = []
  for cell in notebook.cells:
    for output in cell.get("outputs", ()):
      if output.output_type == "stream" and output.name == "stdout":
        parts.append(output.text)
      elif "data" in output and "text/plain" in output.data:
        parts.append(output.data["text/plain"] + "\n")
  return "".join(parts)


def _stderr(notebook) -> str:
  return "".join(output.text for cell in notebook.cells for output in cell.get("outputs", ())
                 if output.output_type == "stream" and output.name == "stderr")


def _num_figures(notebook) -> int:
  return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", ()))


def _recall_rows(text: str, label: str) -> list[dict[str, float]]:
  """The lines of `recall_table` output labelled `label`, as {column: value}."""
  number = r"\s+(-?\d+\.\d+)"
  pattern = re.compile(rf"^{re.escape(label)}{number * len(RECALL_COLUMNS)}$", flags=re.M)
  return [dict(zip(RECALL_COLUMNS, map(float, match))) for match in pattern.findall(text)]


def _check_recalls(row: dict[str, float]):
  for column, value in row.items():
    assert 0.0 <= value <= 100.0, (column, value)
  for prefix in ("TR", "IR"):
    assert row[f"{prefix}@1"] <= row[f"{prefix}@5"] <= row[f"{prefix}@10"], row
  assert row["r_mean"] == pytest.approx(sum(row[c] for c in RECALL_COLUMNS[:6]) / 6, abs=0.02), row


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def quickstart(tmp):
  """Notebook 01 run with MAMO at tiny size: (executed notebook, its workdir)."""
  workdir = tmp / "mamo"
  notebook = _run("01_quickstart.ipynb", dict(CONFIG="configs/mamo.py:tiny", STEPS=4, WORKDIR=str(workdir)), tmp)
  return notebook, workdir


def test_notebooks_are_valid_and_saved_without_outputs():
  for name in NOTEBOOKS:
    notebook = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", ()), f"{name}: the first code cell must be the parameters"
    for cell in code:
      assert not cell.outputs and cell.execution_count is None, f"{name}: cell {cell.id} was saved with outputs"


@pytest.mark.slow
def test_quickstart_trains_mamo_and_plots_every_loss_term(quickstart):
  notebook, workdir = quickstart
  text = _text(notebook)
  assert "nothing to install" in text  # the install cell is skipped in a set-up checkout
  assert "finished at step 4" in text
  terms = re.search(r"^loss terms: (.*)$", text, flags=re.M).group(1).split(", ")
  assert sorted(terms) == sorted(MAMO_OBJECTIVES)
  assert (workdir / "export" / "pretrain" / "_METADATA").exists()
  # Loss curves, then the recall curves of the evaluation at the last step.
  assert _num_figures(notebook) == 2
  last = re.search(r"^retrieval at step (\d+):\n(.*)$", text, flags=re.M)
  assert int(last.group(1)) == 4
  recalls = dict(re.findall(r"(\S+) ([\d.]+)", last.group(2)))
  _check_recalls({column: float(recalls[column]) for column in RECALL_COLUMNS})


@pytest.mark.slow
def test_zero_shot_retrieval_shows_matches_and_recalls(quickstart, tmp):
  _, workdir = quickstart
  notebook = _run("02_zero_shot_retrieval.ipynb",
                  dict(CONFIG="configs/mamo.py:tiny", WORKDIR=str(workdir), STEPS=4, NUM_QUERIES=2, TOP_K=3,
                       K_TEST=4), tmp)
  text = _text(notebook)
  assert "does not exist" not in text  # it loaded notebook 01's export instead of training
  # The tiny demo split: 64 images with 5 captions each.
  assert "64 images, 320 captions; similarity matrix (64, 320)" in text
  assert _num_figures(notebook) == 2  # the top-matches grid and the Grad-CAM heat maps
  itc, reranked = _recall_rows(text, "ITC"), _recall_rows(text, "ITC + ITM top-4")
  assert len(itc) == 1 and len(reranked) == 1
  _check_recalls(itc[0])
  _check_recalls(reranked[0])


@pytest.mark.slow
def test_finetune_retrieval_restores_trains_and_compares(quickstart, tmp):
  _, workdir = quickstart
  finetune_dir = tmp / "finetune"
  notebook = _run("03_finetune_retrieval.ipynb",
                  dict(PRETRAIN_CONFIG="configs/mamo.py:tiny", PRETRAIN_WORKDIR=str(workdir), PRETRAIN_STEPS=4,
                       CONFIG="configs/finetune_retrieval.py:tiny", STEPS=3, WORKDIR=str(finetune_dir)), tmp)
  text = _text(notebook)
  assert "does not exist" not in text
  assert "merged fusion" in text
  assert "finished at step 3" in text
  # init_from restored the whole finetuned network from the MAMO export (its merged fusion
  # included: nothing new), and left MAMO's masked-modelling heads unused.
  restored = re.search(r"loaded (\d+), skipped 0, new (\d+), unused (\d+)", _stderr(notebook))
  assert restored, "the init_from restore table was not logged"
  loaded, new, unused = map(int, restored.groups())
  assert loaded > 100 and new == 0 and unused > 0, restored.group(0)
  assert (finetune_dir / "export" / "pretrain" / "_METADATA").exists()
  zero_shot, finetuned = _recall_rows(text, "zero-shot"), _recall_rows(text, "finetuned")
  assert len(zero_shot) == 1 and len(finetuned) == 1
  _check_recalls(zero_shot[0])
  _check_recalls(finetuned[0])
  assert zero_shot[0]["r_mean"] == pytest.approx(float(re.search(r"zero-shot r_mean ([\d.]+)", text).group(1)),
                                                 abs=0.01)
  assert _num_figures(notebook) == 1
