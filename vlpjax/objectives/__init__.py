"""Pre-training objectives, one pure loss function per module, registered by name.

Importing this package registers every objective; look them up with `registry.get(name)`.
"""
from vlpjax.objectives import itc, itm, mim, mlm, mrm  # noqa: F401  (registration)
from vlpjax.objectives.registry import get, names, register

__all__ = ["get", "names", "register"]
