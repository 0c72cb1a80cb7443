"""The training loop: validate config -> mesh -> data -> abstract state -> restore or init ->
for each stage: optimizer + jitted step, run, log, evaluate, checkpoint, export params.

Read it top to bottom; each phase is a marked section.
"""
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config_lib
from vlpjax import data as data_lib
from vlpjax import evaluators
from vlpjax import metrics as metrics_lib
from vlpjax import preemption
from vlpjax import sharding as sharding_lib
from vlpjax import stages as stages_lib
from vlpjax import state as state_lib
from vlpjax import step as step_lib
from vlpjax.models import vlp


def build_model(config: ml_collections.ConfigDict) -> vlp.VLPModel:
  """`VLPModel`, or the task model `config.model.kind` names (VQA, NLVR2, ...)."""
  return vlp.build_model(config.model)


def _jsonable(config) -> dict:
  return json.loads(config.to_json_best_effort())


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check that needs no compute: config keys and values, then the data a run reads
  (paths exist, JSON parses, tokenizer files are there). Errors name the flag to set."""
  checkpoint_lib.take_model_from_checkpoint(config)
  config_lib.validate(config)
  if not config.input.get("synthetic", False):
    from input_pipeline import builder  # imports TensorFlow (seconds), still no JAX compute
    builder.check_data(config.input)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: Optional[int] = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the last metrics.

  `stop_after` ends the run after that global step with a checkpoint, as a preemption would
  (the schedule still spans the whole run); the next call resumes from there. SIGTERM / SIGINT
  do the same at the end of the current step (`preemption.StopRequest`); the returned metrics
  then hold `stopped_by` (the signal name). Nothing is written to `workdir` before the config
  and the data have been validated.
  """
  validate(config)
  process_index, process_count = jax.process_index(), jax.process_count()

  # ----------------------------------------------------------------------------- Mesh
  mesh = sharding_lib.make_mesh(config.sharding.mesh.to_dict())
  global_batch = int(config.batch_size)
  if global_batch % sharding_lib.num_batch_shards(mesh):
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the {sharding_lib.num_batch_shards(mesh)} "
                     "batch shards of the mesh")
  if global_batch % process_count:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by {process_count} processes")
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, process_count)

  # ----------------------------------------------------------------------------- Model, stages, state layout
  # One setup path: model, the stage's optimizer, abstract state and shardings (state.setup_state).
  setup = state_lib.setup_state(config, mesh)
  model, stages, total_steps = setup.model, setup.stages, setup.total_steps
  how = checkpoint_lib.resolve_start(workdir, config.get("resume_from") or None,
                                     (config.get("init_from") or {}).get("path") or None)
  if how == "init_from":
    checkpoint_lib.check_model_compatible(config.init_from.path, config.model,
                                          allow=bool(config.init_from.get("allow_mismatch", False)))

  # ----------------------------------------------------------------------------- Writers
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                     max_to_keep=config.checkpoint.max_to_keep,
                                     save_interval_steps=1,
                                     async_save=config.checkpoint.get("async_save", True))
  if how == "workdir" and (ckpt.latest_step() or 0) >= total_steps:
    logging.info("run already complete at step %d (%s); nothing to do. Exports: %s", ckpt.latest_step(),
                 ckpt.directory, checkpoint_lib.export_dir(workdir, stages[-1].name))
    ckpt.close()
    return {"step": ckpt.latest_step(), "complete": True}
  writer = metrics_lib.create_writer(workdir, process_index=process_index)

  # ----------------------------------------------------------------------------- State
  start_step, meta = 0, {}
  if how in ("workdir", "resume"):
    if how == "workdir":
      source, resume_step = ckpt, ckpt.latest_step()
    else:
      root, resume_step = checkpoint_lib.locate_checkpoint(config.resume_from)
      source = checkpoint_lib.Checkpointer(root, async_save=False)
    setup = setup.for_stage(stages_lib.stage_at(stages, resume_step))
    state, meta = source.restore(setup.abstract, resume_step)
    start_step = int(jax.device_get(state.step))
    if source is not ckpt:
      source.close()
    logging.info("resumed from %s at step %d", source.directory, start_step)
  else:
    state = setup.create(int(config.seed))
    if how == "init_from":
      state = init_from(model, state, config.init_from, setup.shardings)
  stage_index = setup.stage_index
  if process_index == 0:
    _write_overviews(workdir, state.params, setup.abstract.params)

  # ----------------------------------------------------------------------------- Input
  # Positions are per process and the meta JSON is written by process 0 only: with several
  # processes the iterator replays up to the step instead (exact, slower).
  # A stage with its own `input` overrides (e.g. NLVR2's text-assignment pre-step on caption
  # data) reads its own data stream from its first step; consecutive stages with the same input
  # share one stream.
  saved_data = meta.get("data") or {}
  segment = stages_lib.data_segment(stages, stage_index)
  start_position = saved_data.get("data_position") if process_count == 1 else None
  if saved_data.get("segment", 0) != segment:
    start_position = None

  def open_stream(segment_index, first_step, position):
    return data_lib.make_train_stream(stages_lib.segment_config(config, stages, segment_index), mesh, global_batch,
                                      start_step=first_step, start_position=position,
                                      process_index=process_index, process_count=process_count)

  train_iter = open_stream(segment, start_step - stages_lib.segment_start(stages, segment), start_position)

  # ----------------------------------------------------------------------------- Evaluators (built once)
  scheduled_evals = evaluators.build_all(config, model, mesh)

  # ----------------------------------------------------------------------------- Loop
  last_metrics: dict[str, Any] = {}
  progress = metrics_lib.Progress(total_steps, every_steps=config.log_every_steps,
                                  global_batch=global_batch, start_step=start_step, writer=writer)
  stop = preemption.StopRequest(process_count)
  step = start_step
  try:
    with stop.installed():
      for index in range(stage_index, len(stages)):
        stage = stages[index]
        stage_start, stage_end = stages_lib.stage_bounds(stages, index)
        if step >= stage_end:
          continue
        if index != setup.stage_index or step == stage_start and index > 0:
          # A new stage may freeze other parameters: fresh optimizer state, same params / EMA / objective state.
          setup = setup.for_stage(index)
          opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings.opt_state)(state.params)
          state = state.replace(opt_state=opt_state)
        if stages_lib.data_segment(stages, index) != segment:
          train_iter.close()
          segment = stages_lib.data_segment(stages, index)
          train_iter = open_stream(segment, 0, None)
        train_step = step_lib.train_step_for(setup)
        first = next(train_iter)
        t0 = time.time()
        compiled = train_step.lower(state, first).compile()
        _log_memory(compiled, time.time() - t0)
        # Processes reach here after input setup and compilation of very different lengths (one
        # may hit a compile cache); the first step's collectives must start together (Gloo on CPU
        # gives up after 30 s), so wait here on the coordinator's barrier, which waits for minutes.
        _wait_for_all_processes(f"stage_{index}_compiled", process_count)
        pending = first
        unchecked = []  # (step, metrics) on device since the last NaN check: no host sync per step
        logging.info("stage %r: steps %d..%d", stage.name, step, stage_end)
        while step < stage_end and (stop_after is None or step < stop_after):
          batch = pending if pending is not None else next(train_iter)
          pending = None
          state, step_metrics = train_step(state, batch)
          step += 1
          unchecked.append((step, step_metrics))
          stopping = stop.should_stop(step)
          log_due = step % config.log_every_steps == 0 or step == stage_end
          save_due = stages_lib.checkpoint_due(config, step, stage_end) or step == stop_after or stopping
          if log_due or save_due:
            # The NaN guard: a non-finite step is never saved; the last good checkpoint stays the resume point.
            try:
              metrics_lib.check_finite_window(unchecked)
            except FloatingPointError as e:
              ckpt.wait()
              good = ckpt.latest_step()
              raise FloatingPointError(f"{e}; stopped without saving: the resume point is "
                                       + (f"step {good} in {ckpt.directory}" if good is not None
                                          else "a fresh start (no checkpoint yet)")) from None
            unchecked = []
          if log_due:
            scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            scalars.update(train_iter.stats() if hasattr(train_iter, "stats") else {})
            writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
            last_metrics.update({f"train/{k}": v for k, v in scalars.items()})
            progress(step, {k: v for k, v in scalars.items() if k == "loss" or k.endswith("/loss")})
          if save_due:
            data_state = dict(train_iter.state() if hasattr(train_iter, "state") else {}, segment=segment)
            if ckpt.save(step, state, dict(stage=stage.name, step=step, data=data_state, config=_jsonable(config)),
                         force=step in (stage_end, stop_after) or stopping):
              logging.info("checkpoint of step %d: %s", step, ckpt.directory / str(step))
          for scheduled in scheduled_evals:
            if scheduled.every_steps and (step % scheduled.every_steps == 0 or step == total_steps):
              results = scheduled.evaluator(state.params)
              writer.write_scalars(step, {f"{scheduled.prefix}/{k}": v for k, v in results.items()})
              last_metrics.update({f"{scheduled.prefix}/{k}": v for k, v in results.items()})
              logging.info("step %d %s: %s", step, scheduled.prefix, _fmt(results))
          if stopping:
            break
        ckpt.wait()
        if stop.requested:
          logging.warning("stopped by %s after step %d: checkpoint %s written; run the same command to resume",
                          stop.signal_name, step, ckpt.directory / str(step))
          last_metrics["stopped_by"] = stop.signal_name
          break
        if step < stage_end:
          break
        export = checkpoint_lib.export_dir(workdir, stage.name)
        checkpoint_lib.export_params(state.params, export, model_config=config.model)
        logging.info("stage %r done at step %d; params exported to %s", stage.name, step, export)
  finally:
    # Background checkpoint writes and input threads end here, also on an error or a second Ctrl-C.
    ckpt.wait()
    ckpt.close()
    writer.flush()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  last_metrics["step"] = step
  return last_metrics


def _write_overviews(workdir: str, params, abstract_params) -> None:
  """The full parameter and sharding tables go to the workdir; the log gets their summary lines."""
  tables = {"parameters.txt": metrics_lib.parameter_overview(params),
            "shardings.txt": metrics_lib.sharding_overview(abstract_params)}
  for name, text in tables.items():
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text + "\n")
  logging.info("%s params (%s); %s (%s)", f"{vlp.count_params(params):,}", os.path.join(workdir, "parameters.txt"),
               tables["shardings.txt"].splitlines()[-1], os.path.join(workdir, "shardings.txt"))


def _wait_for_all_processes(name: str, process_count: int, timeout_s: int = 1800) -> None:
  """A barrier on the jax.distributed coordinator (no device collective); no-op for one process."""
  if process_count <= 1:
    return
  from jax._src import distributed  # the coordinator client has no public barrier yet
  client = distributed.global_state.client
  if client is None:
    return
  client.wait_at_barrier(f"vlpjax_{name}", timeout_s * 1000)


def _fmt(results: dict) -> str:
  return ", ".join(f"{k}={v:.2f}" for k, v in sorted(results.items()))


def _log_memory(compiled, seconds: float):
  try:
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    logging.info("train step compiled in %.1fs; per-device memory %.2f GiB (args %.2f, temp %.2f)",
                 seconds, total / 2**30, mem.argument_size_in_bytes / 2**30, mem.temp_size_in_bytes / 2**30)
  except (AttributeError, NotImplementedError, TypeError):
    logging.info("train step compiled in %.1fs", seconds)


def init_from(model, state, init_from: ml_collections.ConfigDict, shardings):
  """Finetuning start: params from `init_from.path` where they match, fresh init for the rest.

  Also taken from the source when it has them (a `python -m vlpjax.convert` directory with
  `ema_params` / `queues.npz`, or a train checkpoint) and this run keeps them: the EMA params
  (leaves the source lacks follow the online params; without EMA params the EMA is a copy of the
  params) and the ITC feature queue when its shape matches this run's. Queue ids restart empty
  (-1) and the write pointer at 0: ids name images of the source's data (ALBEF starts a new
  idx_queue), and the pointer must be a multiple of this run's batch.
  """
  path = init_from.path
  dont_load = tuple(init_from.get("dont_load", ()))
  params, report = checkpoint_lib.partial_restore(jax.device_get(state.params),
                                                  model.remap_pretrained(checkpoint_lib.load_params(path)),
                                                  dont_load=dont_load)
  logging.info("init_from %s:\n%s", path, checkpoint_lib.format_report(report))

  ema_dir = os.path.join(path, "ema_params")
  queues_file = os.path.join(path, "queues.npz")
  source_ema, source_queue = None, None
  if os.path.isdir(ema_dir):
    source_ema = model.remap_pretrained(checkpoint_lib.load_params(ema_dir))
  elif not os.path.isdir(os.path.join(path, "params")) and not os.path.exists(os.path.join(path, "_METADATA")):
    # A train checkpoint: its state holds the EMA params and the objectives' state next to the params.
    restored = checkpoint_lib.load_state_items(path, ("ema_params", "objective_state"))
    source_ema = restored.get("ema_params")
    source_queue = (restored.get("objective_state") or {}).get("itc")
    if source_ema is not None:
      source_ema = model.remap_pretrained(source_ema)
  if os.path.isfile(queues_file):
    with np.load(queues_file) as f:
      source_queue = {k: f[k] for k in f.files}

  replaced = dict(params=jax.device_put(params, shardings.params))
  if state.ema_params is not None:
    ema = jax.tree.map(np.copy, params)
    if source_ema is not None:
      ema, ema_report = checkpoint_lib.partial_restore(params, source_ema, dont_load=dont_load)
      logging.info("init_from %s EMA params: %s", path, checkpoint_lib.format_report(ema_report).splitlines()[0])
    replaced["ema_params"] = jax.device_put(ema, shardings.ema_params)
  queue = state.objective_state.get("itc")
  if source_queue is not None and queue is not None:
    shapes_match = all(k in source_queue and np.shape(source_queue[k]) == tuple(queue[k].shape)
                       for k in ("image", "text"))
    if shapes_match:
      loaded = dict(queue, image=source_queue["image"], text=source_queue["text"],
                    idx=np.full(queue["idx"].shape, -1, np.int32), ptr=np.zeros((), np.int32))
      loaded = jax.device_put(jax.tree.map(lambda q, like: np.asarray(q, like.dtype), loaded, queue),
                              shardings.objective_state["itc"])
      replaced["objective_state"] = dict(state.objective_state, itc=loaded)
    logging.info("init_from %s ITC queue: %s (source %s, this run %s)", path, "loaded" if shapes_match else "kept fresh",
                 {k: tuple(np.shape(v)) for k, v in source_queue.items()}, {k: tuple(v.shape) for k, v in queue.items()})
  return state.replace(**replaced)
