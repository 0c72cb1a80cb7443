"""Counting compilations: `with compile_log() as names:` collects the name of every computation JAX
compiles inside the block (jitted functions as "jit(<name>)", op-by-op primitives too)."""
import contextlib
import logging

import jax


class _Collect(logging.Handler):

  def __init__(self, names):
    super().__init__(logging.DEBUG)
    self.names = names

  def emit(self, record):
    message = record.getMessage()
    # jax.log_compiles logs "Compiling jit(name) with global shapes and types ..." before any
    # cache lookup, so persistent-cache hits are counted too.
    if message.startswith("Compiling "):
      self.names.append(message.split()[1])


@contextlib.contextmanager
def compile_log():
  names: list[str] = []
  logger = logging.getLogger("jax")
  handler = _Collect(names)
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.WARNING if level in (logging.NOTSET,) or level > logging.WARNING else level)
  try:
    with jax.log_compiles(True):
      yield names
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
