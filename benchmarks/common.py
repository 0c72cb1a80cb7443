"""Config preparation shared by the benchmark scripts (train_step.py, compile_memory.py)."""


def prepare_config(spec: str, *, batch: int, text_len: int, dtype: str = "", rules: str = "dp",
                   attention_impl: str = "", scan_layers=None):
  """The benchmark config of `spec` ('configs/x.py[:ARG]'): synthetic input at `batch` and
  `text_len`, the ITC queue a multiple of the batch, a 1000-step schedule, and the overrides
  (`dtype`, `attention_impl`: '' keeps the config's; `scan_layers`: None keeps it)."""
  from vlpjax import config_lib
  config = config_lib.load_config(spec)
  config.batch_size = batch
  config.input.max_len = text_len
  config.input.synthetic = True
  if "itc" in config.objectives and config.objectives.itc.get("queue_size", 0):
    config.objectives.itc.queue_size -= config.objectives.itc.queue_size % batch
  config.steps_per_epoch = 100
  config.total_steps = 1000
  if dtype:
    config.model.dtype = dtype
  if attention_impl:
    config.model.vision.attention_impl = attention_impl
  if scan_layers is not None:
    config.model.scan_layers = bool(scan_layers)
  config.sharding.rules = rules
  return config


def parse_bool(value: str) -> bool:
  """'true' / 'false' (any case, or 1 / 0) -> bool; anything else fails naming the value."""
  lowered = value.strip().lower()
  if lowered in ("true", "1"):
    return True
  if lowered in ("false", "0"):
    return False
  raise ValueError(f"expected true or false, got {value!r}")
