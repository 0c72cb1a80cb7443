r"""Compare methods on the same data and budget: pretraining, zero-shot and finetuned retrieval,
the downstream tasks, and their cost, as a table, a JSON and plots.

  python -m vlpjax.compare --methods=albef,mamo,vicha,vlmixer,mvp --workdir=/tmp/compare \
    [--size=demo] [--steps=N] [--finetune_steps=N] [--batch=B] [--seeds=N] [--budget=steps|flops] \
    [--tasks=zeroshot,retrieval,vqa,snli_ve,nlvr2,grounding] [--only=METHOD[,TASK]] [--report] \
    [--config.x.y=V ...]

Every method pretrains from `configs/<method>.py:<size>` with the same steps, global batch, seed,
image size and tokenizer (`--budget=flops` instead gives each method ALBEF's training FLOPs:
steps = steps_albef * flops_albef / flops_method, FLOPs counted from the step's jaxpr), then each
task starts from that pretraining's export with the same schedule (`configs/finetune_*.py`,
`configs/grounding.py` at the same size), evaluated by the project's evaluators. `--config.x=V`
overrides apply to every pretraining cell (e.g. --config.input.annotations=... for real data).

Each cell is an ordinary run in its own workdir (`WORKDIR/<method>/seed<k>/<task>`): a finished
cell (its `result.json`) is skipped, a half-done one resumes from its checkpoint, so the command
can be interrupted and rerun, or spread over machines with `--only=METHOD[,TASK]` and collected with
`--report`. A cell that cannot run says why in the table (e.g. a task model that needs a fusion
the method does not have); a cell that failed or did not finish is shown as such, never blank.

The report (`WORKDIR/report.md`, `report.json`, `loss_curves.png`, `metrics.png`): rows = methods,
columns = zero-shot TR@1 / IR@1 / r_mean, finetuned r_mean, the task metrics, pretraining
GFLOPs/img, img/s and wall time; with `--seeds=N` each number is the mean ± the spread (half the
max - min) over the seeds. Demo numbers show the pipeline, not a ranking of methods on real data.
"""
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

from absl import flags, logging
import ml_collections

METHODS = ("albef", "mamo", "vicha", "vlmixer", "mvp")
ALL_TASKS = ("zeroshot", "retrieval", "vqa", "snli_ve", "nlvr2", "grounding")


@dataclasses.dataclass(frozen=True)
class Task:
  """A downstream cell: its config, whether it trains, the metric the table shows and its chance level."""
  name: str
  config: str
  train: bool
  metric: str
  title: str


TASKS = {
    "zeroshot": Task("zeroshot", "configs/finetune_retrieval.py", False, "r_mean", "zero-shot r_mean"),
    "retrieval": Task("retrieval", "configs/finetune_retrieval.py", True, "r_mean", "finetuned r_mean"),
    "vqa": Task("vqa", "configs/finetune_vqa.py", True, "accuracy", "VQA"),
    "snli_ve": Task("snli_ve", "configs/finetune_snli_ve.py", True, "accuracy", "SNLI-VE"),
    "nlvr2": Task("nlvr2", "configs/finetune_nlvr2.py", True, "accuracy", "NLVR2"),
    "grounding": Task("grounding", "configs/grounding.py", True, "accuracy", "grounding"),
}
# Chance levels of the demo task sets (input_pipeline/demo_tasks.py; README): uniform guess for
# SNLI-VE and NLVR2, the most frequent answer for VQA, a random proposal for grounding.
DEMO_CHANCE = {"snli_ve": 33.3, "nlvr2": 50.0, "vqa": 15.0, "grounding": 18.2}

RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------- configs of the cells


def _set(config: ml_collections.ConfigDict, path: str, value) -> None:
  node = config
  parts = path.split(".")
  with config.unlocked():
    for part in parts[:-1]:
      if part not in node:
        raise ValueError(f"--config.{path}: no key {part!r} in the config")
      node = node[part]
    if parts[-1] not in node:
      raise ValueError(f"--config.{path}: no key {parts[-1]!r} in the config")
    node[parts[-1]] = type(node[parts[-1]])(value) if isinstance(node[parts[-1]], (int, float, bool)) and \
        not isinstance(value, type(node[parts[-1]])) else value


def pretrain_config(method: str, size: str, *, steps: int, batch: int, seed: int,
                    overrides: dict) -> ml_collections.ConfigDict:
  """`configs/<method>.py:<size>` with the shared budget (steps, batch, seed) and the overrides."""
  from vlpjax import config_lib
  config = config_lib.load_config(f"configs/{method}.py:{size}")
  with config.unlocked():
    if steps:
      _scale_stages(config, steps)
      config.total_steps = steps
    if batch:
      config.batch_size = batch
    config.seed = seed
    # One evaluation at the end (the zero-shot cell is scored separately with the same protocol).
    config.eval.every_steps = 0
    config.checkpoint.every_steps = max(config.checkpoint.every_steps, 0)
  for path, value in overrides.items():
    _set(config, path, value)
  return config


def _scale_stages(config: ml_collections.ConfigDict, steps: int) -> None:
  """A staged pretraining (VLMixer's image warm-up, MVP's curriculum) gets `steps` in all: each
  stage keeps its share of the config's total (at least 1 step), the last takes the rest."""
  stages = config.get("stages") or ()
  if not stages:
    return
  total = sum(int(s["steps"]) for s in stages)
  if steps < len(stages):
    raise ValueError(f"--steps={steps} cannot cover the config's {len(stages)} stages")
  done = 0
  for i, stage in enumerate(stages):
    left = len(stages) - i - 1
    share = steps - done if not left else min(max(1, round(int(stage["steps"]) * steps / total)), steps - done - left)
    stage["steps"] = share
    done += share


def downstream_config(method: str, task: Task, size: str, export: str, *, steps: int, batch: int,
                      seed: int) -> ml_collections.ConfigDict | str:
  """The task's config at `size` starting from the method's export, or the reason it cannot run.

  A method config may define `task_config(task, arg) -> str | None` (the config spec to use instead
  of the task's, e.g. `configs/vicha_finetune.py:snli_ve,demo`) and `downstream(task, config) ->
  str | None` to adapt the task config (model kind, heads) or to say why the task does not apply;
  by default the task config takes the pretraining's architecture from the export
  (`init_from.model_from_checkpoint`).
  """
  from vlpjax import config_lib
  arg = "flickr" if size == "" and task.config.endswith("finetune_retrieval.py") else size
  method_module = _method_module(method)
  # A method may finetune with configs of its own (ViCHA feeds its concepts to every task).
  spec = getattr(method_module, "task_config", lambda name, arg: None)(task.name, arg) or f"{task.config}:{arg}"
  config = config_lib.load_config(spec)
  with config.unlocked():
    config.init_from.path = export
    config.init_from.model_from_checkpoint = True
    config.seed = seed
    if steps and task.train:
      # Stages are ConfigDicts or plain dicts (configs that build them as dicts, e.g. ViCHA's NLVR2).
      config.total_steps = steps + sum(int(s["steps"]) for s in (config.get("stages") or ())[:-1])
      if config.get("stages"):
        config.stages[-1]["steps"] = steps
      config.eval.every_steps = config.total_steps
    if batch and task.train:
      config.batch_size = batch
  adapt = getattr(method_module, "downstream", None)
  if adapt is not None:
    reason = adapt(task.name, config)
    if reason:
      return reason
  return config


def _method_module(method: str):
  import importlib
  return importlib.import_module(f"configs.{method}")


# ----------------------------------------------------------------------------- cells


@dataclasses.dataclass
class Cell:
  method: str
  seed: int
  task: str  # "pretrain" or a TASKS key

  @property
  def name(self) -> str:
    return f"{self.method}/seed{self.seed}/{self.task}"

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.method, f"seed{self.seed}", self.task)


def read_result(root: str, cell: Cell) -> Optional[dict]:
  path = os.path.join(cell.workdir(root), RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_result(root: str, cell: Cell, result: dict) -> None:
  os.makedirs(cell.workdir(root), exist_ok=True)
  path = os.path.join(cell.workdir(root), RESULT_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(path + ".tmp", path)  # a cell counts as finished only once its result is whole


def _jsonable(config) -> dict:
  return json.loads(config.to_json_best_effort())


def pretrain_cost(config) -> dict:
  """Model GFLOPs per image of one training step (counted from the jaxpr, no compile)."""
  import jax
  from vlpjax import flops, sharding, state as state_lib, step as step_lib, synthetic
  synthetic_config = ml_collections.ConfigDict(config.to_dict())
  synthetic_config.input.synthetic = True
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  setup = state_lib.setup_state(synthetic_config, mesh)
  step = step_lib.train_step_for(setup)
  batch = int(config.batch_size)
  shapes = synthetic.batch_shapes(synthetic_config, batch)
  with jax.set_mesh(mesh):
    total = flops.count_flops(step.jitted, setup.abstract, shapes)
  return {"gflops_per_img": total / batch / 1e9}


def export_name(config) -> str:
  """The export a pretraining leaves for its tasks: its last stage's (stages are ConfigDicts or
  plain dicts, e.g. VLMixer's), or 'pretrain'."""
  stages = config.get("stages") or ()
  return str(stages[-1]["name"]) if stages else "pretrain"


def run_pretrain(root: str, cell: Cell, config) -> dict:
  from vlpjax import metrics as metrics_lib, train
  start = time.time()
  out = train.train_and_evaluate(config, cell.workdir(root))
  if out.get("stopped_by"):
    raise KeyboardInterrupt(f"stopped by {out['stopped_by']}")
  scalars = metrics_lib.read_scalars(cell.workdir(root), recursive=False)
  img_s = scalars.get("perf/img_per_sec", {})
  result = dict(status="done", step=out.get("step"), wall_s=time.time() - start,
                img_per_sec=_mean_after_first(img_s),
                export=os.path.join(cell.workdir(root), "export", export_name(config)),
                config=_jsonable(config))
  result.update(pretrain_cost(config))
  return result


def run_task(root: str, cell: Cell, task: Task, config) -> dict:
  from vlpjax import evaluate, train
  start = time.time()
  if task.train:
    out = train.train_and_evaluate(config, cell.workdir(root))
    if out.get("stopped_by"):
      raise KeyboardInterrupt(f"stopped by {out['stopped_by']}")
    metrics = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("eval/")}
    if not metrics and out.get("complete"):
      metrics = (read_result(root, cell) or {}).get("metrics", {})
  else:
    os.makedirs(cell.workdir(root), exist_ok=True)
    metrics = evaluate.evaluate_checkpoint(config, workdir=cell.workdir(root), verbose=False)
  return dict(status="done", metrics=metrics, wall_s=time.time() - start, config=_jsonable(config))


def _mean_after_first(series: dict) -> float:
  """Mean rate over the log windows after the first (which carries the compile)."""
  values = [v for _, v in sorted(series.items())][1:] or list(series.values())
  return float(sum(values) / len(values)) if values else float("nan")


def plan(methods, tasks, seeds: int) -> list[Cell]:
  cells = []
  for method in methods:
    for seed in range(seeds):
      cells.append(Cell(method, seed, "pretrain"))
      cells += [Cell(method, seed, task) for task in tasks]
  return cells


def run_all(root: str, methods, tasks, *, size: str, steps: int, finetune_steps: int, batch: int, seeds: int,
            budget: str, overrides: dict, only: Optional[tuple[str, ...]] = None,
            log: Callable[[str], None] = logging.info) -> None:
  """Runs every cell not finished yet (see the module docstring)."""
  os.makedirs(root, exist_ok=True)
  step_budget = dict.fromkeys(methods, steps)
  if budget == "flops":
    step_budget = flops_budget(methods, size, steps, batch, overrides)
  with open(os.path.join(root, "plan.json"), "w") as f:
    json.dump(dict(methods=list(methods), tasks=list(tasks), size=size, steps=step_budget, finetune_steps=finetune_steps,
                   batch=batch, seeds=seeds, budget=budget, overrides=overrides), f, indent=1)
  for cell in plan(methods, tasks, seeds):
    if only and (cell.method != only[0] or (len(only) > 1 and cell.task not in ("pretrain", only[1]))):
      continue
    if read_result(root, cell) is not None:
      log(f"compare: {cell.name} finished earlier; skipped")
      continue
    log(f"compare: {cell.name} ...")
    try:
      if cell.task == "pretrain":
        config = pretrain_config(cell.method, size, steps=step_budget[cell.method], batch=batch, seed=cell.seed,
                                 overrides=overrides)
        result = run_pretrain(root, cell, config)
      else:
        pretrained = read_result(root, Cell(cell.method, cell.seed, "pretrain"))
        if not pretrained or pretrained.get("status") != "done":
          log(f"compare: {cell.name} waits for its pretraining")
          continue
        task = TASKS[cell.task]
        config = downstream_config(cell.method, task, size, pretrained["export"], steps=finetune_steps,
                                   batch=batch, seed=cell.seed)
        if isinstance(config, str):
          result = dict(status="n/a", reason=config)
        else:
          result = run_task(root, cell, task, config)
    except KeyboardInterrupt:
      raise
    except Exception as e:  # a failed cell is recorded and the others still run
      logging.exception("compare: %s failed", cell.name)
      result = dict(status="failed", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    _write_result(root, cell, result)
    log(f"compare: {cell.name} {result.get('status')}")


def flops_budget(methods, size: str, steps: int, batch: int, overrides: dict) -> dict:
  """Steps per method giving each the training FLOPs of ALBEF's `steps` (ALBEF first if listed)."""
  costs = {}
  for method in dict.fromkeys(("albef",) + tuple(methods)):
    config = pretrain_config(method, size, steps=steps, batch=batch, seed=0, overrides=overrides)
    costs[method] = (pretrain_cost(config)["gflops_per_img"], int(config.total_steps))
  reference_flops, reference_steps = costs["albef"]
  return {m: max(1, int(round(reference_steps * reference_flops / costs[m][0]))) for m in methods}


# ----------------------------------------------------------------------------- report


def _spread(values: list[float]) -> tuple[float, float]:
  return sum(values) / len(values), (max(values) - min(values)) / 2


def _fmt(values: list[float], digits: int = 1, significant: bool = False) -> str:
  if not values:
    return "—"
  mean, spread = _spread(values)
  if significant:
    return f"{mean:.3g}" + (f" ± {spread:.2g}" if len(values) > 1 else "")
  return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if len(values) > 1 else "")


def collect(root: str) -> dict:
  """Every cell's result under `root`, per method and seed, with the plan."""
  with open(os.path.join(root, "plan.json")) as f:
    the_plan = json.load(f)
  cells = {}
  for cell in plan(the_plan["methods"], the_plan["tasks"], the_plan["seeds"]):
    cells[cell.name] = read_result(root, cell) or dict(status="not run")
  return dict(plan=the_plan, cells=cells)


def _values(report: dict, method: str, task: str, key: str) -> tuple[list[float], list[str]]:
  """Numbers of `key` over the seeds, and the statuses of the cells without one."""
  numbers, others = [], []
  for seed in range(report["plan"]["seeds"]):
    result = report["cells"][f"{method}/seed{seed}/{task}"]
    source = result.get("metrics", result) if task != "pretrain" else result
    value = source.get(key) if result.get("status") == "done" else None
    if isinstance(value, (int, float)) and math.isfinite(value):
      numbers.append(float(value))
    else:
      others.append(result.get("status", "not run") if result.get("status") != "done" else "no value")
  return numbers, others


def table(report: dict) -> str:
  """The Markdown table: one row per method."""
  tasks = report["plan"]["tasks"]
  columns = []
  if "zeroshot" in tasks:
    columns += [("zeroshot", "txt_r1", "ZS TR@1"), ("zeroshot", "img_r1", "ZS IR@1"), ("zeroshot", "r_mean", "ZS r_mean")]
  columns += [(t, TASKS[t].metric, TASKS[t].title) for t in tasks if t != "zeroshot"]
  columns += [("pretrain", "gflops_per_img", "GFLOPs/img"), ("pretrain", "img_per_sec", "img/s"),
              ("pretrain", "wall_s", "pretrain min")]
  lines = ["| method | " + " | ".join(c[2] for c in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for method in report["plan"]["methods"]:
    row = []
    for task, key, _ in columns:
      numbers, others = _values(report, method, task, key)
      if key == "wall_s":
        numbers = [v / 60 for v in numbers]
      text = _fmt(numbers, 0 if key in ("img_per_sec",) else 1, significant=key == "gflops_per_img") if numbers else ""
      if others:
        text = (text + " " if text else "") + f"({', '.join(sorted(set(others)))})"
      row.append(text)
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_report(root: str) -> dict:
  """Writes report.md, report.json, loss_curves.png and metrics.png under `root`; returns the report."""
  report = collect(root)
  seeds = report["plan"]["seeds"]
  notes = [f"{seeds} seed{'s' if seeds > 1 else ''} per cell" + (" (mean ± half the range)" if seeds > 1 else ""),
           f"size `{report['plan']['size'] or 'full'}`, budget `{report['plan']['budget']}`: pretraining steps "
           + ", ".join(f"{m} {int(v[0]) if v else '?'}" for m, v in
                       ((m, _values(report, m, "pretrain", "step")[0]) for m in report["plan"]["methods"]))
           + f"; finetuning steps {report['plan']['finetune_steps'] or 'as in the task configs'}",
           "demo numbers show the pipeline working, not a ranking of the methods on real data"]
  n_a = [f"- {name}: {r.get('status')}: {r.get('reason', '')}" for name, r in report["cells"].items()
         if r.get("status") in ("n/a", "failed")]
  text = "\n".join([table(report), "", *[f"- {n}" for n in notes]] + (["", "Cells that did not run:", *n_a] if n_a else []))
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(root, "report.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  _plots(root, report)
  return report


def _plots(root: str, report: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from vlpjax import metrics as metrics_lib
  methods = report["plan"]["methods"]
  curves = {m: metrics_lib.read_scalars(Cell(m, 0, "pretrain").workdir(root), recursive=False) for m in methods}
  terms = sorted({t for c in curves.values() for t in c if t.startswith("train/") and t.endswith("/loss")})
  if terms:
    cols = min(4, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
      for method, series in curves.items():
        if term in series:
          steps = sorted(series[term])
          ax.plot(steps, [series[term][s] for s in steps], label=method)
      ax.set_title(term[len("train/"):])
      ax.set_xlabel("step")
      ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(terms):]:
      ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(root, "loss_curves.png"), dpi=80)
    plt.close(fig)
  tasks = [t for t in report["plan"]["tasks"]]
  if tasks:
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
      key = TASKS[task].metric
      means = [(_spread(v)[0] if v else 0.0) for v in (_values(report, m, task, key)[0] for m in methods)]
      ax.bar(range(len(methods)), means, color="tab:blue")
      ax.set_xticks(range(len(methods)), methods, rotation=45, fontsize=7)
      ax.set_title(TASKS[task].title, fontsize=9)
      chance = chance_level(report, task)
      if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle="--", label="chance")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "metrics.png"), dpi=80)
    plt.close(fig)


def chance_level(report: dict, task: str) -> Optional[float]:
  """The metric a random model scores: demo task chance levels; retrieval r_mean from the split sizes."""
  if task in ("zeroshot", "retrieval"):
    for name, result in report["cells"].items():
      metrics = result.get("metrics") or {}
      if name.endswith(f"/{task}") and metrics.get("num_images"):
        images, texts = metrics["num_images"], metrics["num_texts"]
        per_image = texts / images
        recalls = [100 * (1 - (1 - per_image / texts) ** k) for k in (1, 5, 10)] + [100 * k / images for k in (1, 5, 10)]
        return sum(recalls) / 6
    return None
  return DEMO_CHANCE.get(task) if report["plan"]["size"] == "demo" else None


# ----------------------------------------------------------------------------- command line


def define_flags():
  flags.DEFINE_list("methods", list(METHODS), f"Methods to compare ({', '.join(METHODS)}).")
  flags.DEFINE_list("tasks", list(ALL_TASKS), f"Downstream cells ({', '.join(ALL_TASKS)}).")
  flags.DEFINE_string("workdir", None, "Root of the comparison; one workdir per cell below it.")
  flags.DEFINE_enum("size", "demo", ["demo", "tiny", ""], "Config size of every cell ('' = full recipes, real data).")
  flags.DEFINE_integer("steps", 0, "Pretraining steps of every method (0: the configs' own).")
  flags.DEFINE_integer("finetune_steps", 0, "Finetuning steps of every task (0: the configs' own).")
  flags.DEFINE_integer("batch", 0, "Global batch of every cell (0: the configs' own).")
  flags.DEFINE_integer("seeds", 1, "Repeat each cell with seeds 0..N-1; the table shows mean ± spread.")
  flags.DEFINE_enum("budget", "steps", ["steps", "flops"], "Equal steps, or equal training FLOPs (ALBEF's).")
  flags.DEFINE_list("only", [], "METHOD[,TASK]: run only these cells (and their pretraining).")
  flags.DEFINE_bool("report", False, "Only collect the finished cells into the report.")
  flags.mark_flags_as_required(["workdir"])


def split_config_overrides(argv: list[str]) -> tuple[dict, list[str]]:
  """`--config.a.b=V` arguments (overrides of every pretraining cell) apart from the other flags.

  V is read as a Python literal when it is one (`3`, `0.5`, `True`, `(1, 2)`), else as a string.
  """
  import ast
  overrides, rest = {}, []
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      path, value = arg[len("--config."):].split("=", 1)
      try:
        overrides[path] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        overrides[path] = value
    else:
      rest.append(arg)
  return overrides, rest


OVERRIDES: dict = {}


def main(argv):
  del argv
  f = flags.FLAGS
  unknown = [m for m in f.methods if m not in METHODS]
  if unknown:
    raise ValueError(f"--methods: unknown {unknown}; known: {METHODS}")
  bad_tasks = [t for t in f.tasks if t not in TASKS]
  if bad_tasks:
    raise ValueError(f"--tasks: unknown {bad_tasks}; known: {ALL_TASKS}")
  if not f.report:
    run_all(f.workdir, f.methods, f.tasks, size=f.size, steps=f.steps, finetune_steps=f.finetune_steps,
            batch=f.batch, seeds=f.seeds, budget=f.budget, overrides=OVERRIDES,
            only=tuple(f.only) or None, log=print)
  report = write_report(f.workdir)
  print(table(report))
  print(f"report: {os.path.join(f.workdir, 'report.md')}")


if __name__ == "__main__":
  import sys
  from vlpjax import cli
  OVERRIDES, sys.argv = split_config_overrides(sys.argv)
  define_flags()
  cli.run(main)
