"""What the end-to-end tests share: one way to build a small config for a run, and to read back
what the run logged. Tests that build equal configs compile the same train step, which the
persistent compile cache (conftest.py) then serves to every later one."""
from vlpjax import config_lib, metrics


def config(spec: str, *, synthetic: bool = False, mesh: dict | None = None, eval_every: int | None = None,
           checkpoint_every: int | None = None):
  """`spec` ("configs/albef.py:tiny,steps=4") loaded as `--config=` would load it, then: the
  synthetic in-memory data when `synthetic`; the device mesh `mesh`, an evaluation every
  `eval_every` steps and a checkpoint every `checkpoint_every` (0 = none) where given, the
  config's own otherwise."""
  c = config_lib.load_config(spec)
  if synthetic:
    c.input.synthetic = True
  if mesh is not None:
    c.sharding.mesh = mesh
  if eval_every is not None:
    c.eval.every_steps = eval_every
  if checkpoint_every is not None:
    c.checkpoint.every_steps = checkpoint_every
  return c


def scalars(workdir, tag: str) -> dict[int, float]:
  """{step: value} of one logged scalar of the run in `workdir` (empty when never logged)."""
  return metrics.read_scalars(workdir).get(tag, {})


def tags(workdir) -> set[str]:
  """Every scalar tag the run in `workdir` logged."""
  return set(metrics.read_scalars(workdir))
