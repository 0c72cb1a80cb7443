"""Command-line plumbing shared by every entry point: one-line errors, exit codes, `--help` text.

A config, flag or data error (a misspelt `--config.a.b` key, a missing annotation file, a
checkpoint that does not fit) ends the command with one line, `error: <what, naming the key or
file>`, and exit status 2, not a traceback. `--debug` (or `VLPJAX_DEBUG=1`) brings the traceback
back. Errors of the program itself still raise as usual.
"""
import os
import re
import sys

from absl import app, flags

# Exceptions that report a problem with what the user gave (config, flags, files, data).
USER_ERRORS = (ValueError, KeyError, AttributeError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError, ImportError)
EXIT_USER_ERROR = 2
DEBUG_ENV = "VLPJAX_DEBUG"


def debug_enabled(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def message(error: BaseException) -> str:
  """The one-line text of an error (KeyError's quotes and ml_collections' repr dropped; a
  misspelt `--config.` key is named by its flag)."""
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if isinstance(error, AttributeError) and suggestion:
    wanted, given = suggestion.groups()
    flag = next((a.split("=")[0] for a in sys.argv if a.startswith("--") and f".{given}" in a.split("=")[0]),
                given)
    return f"{flag}: no such config key; did you mean {wanted!r}?"
  return " ".join(str(text).split())


def fail(error: BaseException) -> None:
  print(f"error: {message(error)}", file=sys.stderr)
  print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv):
  """absl's flag parsing with config-override errors (raised while `--config.x=y` is applied)
  reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except USER_ERRORS as e:
    if debug_enabled(argv):
      raise
    fail(e)


def run(main, doc: str | None = None) -> None:
  """`app.run(main)` with one-line user errors and `--debug`; `doc` becomes the `--help` text."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, f"Show tracebacks of config / data errors (also {DEBUG_ENV}=1).")
  if doc is not None:
    sys.modules["__main__"].__doc__ = doc

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if debug_enabled():
        raise
      fail(e)

  app.run(wrapped, flags_parser=parse_flags)


def config_listing() -> str:
  """The config files shipped in `configs/` with their first docstring line (for `--help`)."""
  import importlib.util
  spec = importlib.util.find_spec("configs")
  if spec is None or not spec.submodule_search_locations:
    return ""
  folder = list(spec.submodule_search_locations)[0]
  lines = []
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py") or name.startswith("_") or name == "common.py":
      continue
    with open(os.path.join(folder, name)) as f:
      text = f.read()
    first = text.split('"""', 2)[1].strip().splitlines()[0] if text.startswith('"""') else ""
    lines.append(f"  configs/{name:24s} {first}")
  return "\n".join(lines)
