"""Stage and data-stream arithmetic: which stage a global step is in, where each stage starts and
ends, and which stages share one input stream.

`config.stages` = [{name, steps, objectives?, freeze?, input?}], or one stage of every step. A
stage with other `input` overrides than the stage before it starts a new data stream at its
first step; consecutive stages with the same input share one stream (a "segment").
"""
import ml_collections


def stages_of(config: ml_collections.ConfigDict, total_steps: int) -> list[ml_collections.ConfigDict]:
  """`config.stages` (list of dicts: name, steps, objectives?, freeze?, input?) or one stage of everything."""
  if not config.get("stages"):
    return [ml_collections.ConfigDict(dict(name="pretrain", steps=total_steps))]
  return [ml_collections.ConfigDict(dict(s)) for s in config.stages]


def total_steps(stages) -> int:
  return sum(int(s.steps) for s in stages)


def stage_bounds(stages, index: int) -> tuple[int, int]:
  """[start, end) global steps of stage `index`."""
  start = sum(int(s.steps) for s in stages[:index])
  return start, start + int(stages[index].steps)


def stage_at(stages, step: int) -> int:
  """The stage that runs global step `step` (the last stage once all are done)."""
  for index in range(len(stages)):
    if step < stage_bounds(stages, index)[1]:
      return index
  return len(stages) - 1


def stage_objectives(config: ml_collections.ConfigDict, stage) -> ml_collections.ConfigDict:
  """The objectives a stage trains: its own `objectives`, else `config.objectives`."""
  return stage.get("objectives") or config.objectives


def _stage_input(stage) -> dict:
  return dict(stage.get("input") or {})


def data_segment(stages, index: int) -> int:
  """First stage of the run of consecutive stages that read the same input as stage `index`.

  Each such run is one data stream (batch k of it a function of (seed, k)).
  """
  while index > 0 and _stage_input(stages[index - 1]) == _stage_input(stages[index]):
    index -= 1
  return index


def segment_start(stages, segment: int) -> int:
  return stage_bounds(stages, segment)[0]


def segment_config(config: ml_collections.ConfigDict, stages, segment: int) -> ml_collections.ConfigDict:
  """`config` whose `input` has the overrides of stage `segment` applied."""
  overrides = _stage_input(stages[segment])
  if not overrides:
    return config
  merged = ml_collections.ConfigDict(config.to_dict())
  merged.input.update(overrides)
  return merged


def checkpoint_due(config: ml_collections.ConfigDict, step: int, stage_end: int) -> bool:
  every = int(config.checkpoint.every_steps)
  return step == stage_end or (every > 0 and step % every == 0)
