"""input_pipeline/ has no import cycle, and each of its modules imports alone.

Two checks: the graph of imports between input_pipeline modules, read from the source with
`ast` (module-level and function-level imports, and importlib.import_module strings), has no
cycle; and, in one fresh interpreter, each module imports with no other input_pipeline module
loaded before it (TensorFlow and JAX stay loaded between modules, which keeps this cheap; so
does `demo_data`, whose TFDS dataset class can be registered once per interpreter).
"""
import ast
import os
import subprocess
import sys
import textwrap

PACKAGE = "input_pipeline"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(directory: str) -> list[str]:
  return sorted(name[:-3] for name in os.listdir(directory)
                if name.endswith(".py") and name != "__init__.py")


def _imported(tree: ast.AST, package: str, modules: set[str]) -> set[str]:
  """Modules of `package` (among `modules`) that `tree` imports anywhere in its body."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: `from . import x` / `from .x import y`
        base = f"{package}.{base}" if base else package
      names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      names = [node.args[0].value]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if len(parts) >= 2 and parts[0] == package and parts[1] in modules:
        found.add(parts[1])
  return found


def import_graph(directory: str, package: str) -> dict[str, set[str]]:
  """module -> the modules of the package it imports (itself excluded)."""
  modules = set(_modules(directory))
  graph = {}
  for module in sorted(modules):
    with open(os.path.join(directory, f"{module}.py")) as f:
      tree = ast.parse(f.read())
    graph[module] = _imported(tree, package, modules) - {module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "a.py").write_text("from pkg import b\n")
  (package / "b.py").write_text("def f():\n  from pkg import c  # late\n")
  (package / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
  (package / "d.py").write_text("from . import a\nfrom .b import f\n")
  graph = import_graph(str(package), "pkg")
  assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "b"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  graph["c"] = set()
  assert find_cycle(graph) is None


def test_input_pipeline_has_no_import_cycle():
  graph = import_graph(os.path.join(ROOT, PACKAGE), PACKAGE)
  # The edges the design rests on (so that a broken parser cannot pass for an acyclic graph).
  assert {"caption", "tasks", "formats", "pipeline"} <= graph["builder"]
  assert "builder" not in graph["tasks"] and "builder" not in graph["caption"]
  assert not graph["formats"] and not graph["registry"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle in input_pipeline: " + " -> ".join(cycle)


def test_each_module_imports_alone():
  modules = _modules(os.path.join(ROOT, PACKAGE))
  script = textwrap.dedent(f"""
      import importlib, sys, traceback
      failed = []
      def unload():
        for name in [n for n in sys.modules if n == "{PACKAGE}" or n.startswith("{PACKAGE}.")]:
          if name != "{PACKAGE}.demo_data":
            del sys.modules[name]

      for module in {modules!r}:
        unload()
        try:
          importlib.import_module("{PACKAGE}." + module)
        except Exception:
          failed.append(module + ": " + traceback.format_exc(limit=-3))
      # The builder alone brings every format into the registry.
      unload()
      importlib.import_module("{PACKAGE}.builder")
      print("FORMATS", sorted(sys.modules["{PACKAGE}.formats"].names()))
      print("FAILED", failed)
      """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines()
               if line.startswith(("FORMATS ", "FAILED ")))
  assert lines["FAILED"] == "[]", lines["FAILED"]
  assert lines["FORMATS"] == str(["caption", "image_only", "nlvr2", "refcoco", "snli_ve", "text_only", "vqa"])
