"""Stopping a run cleanly: SIGTERM (preemption, SLURM time limit, TPU maintenance) and SIGINT
(Ctrl-C) ask the trainer to finish the current step, write a checkpoint and return.

The first signal only sets a flag; the trainer checks it after every step (`should_stop`). A
second Ctrl-C gives up at once (KeyboardInterrupt). With several processes every process must
stop at the same step, or the others wait for it in a collective: `should_stop` then asks
`jax.experimental.multihost_utils.reached_preemption_sync_point`, which the JAX coordination
service answers with one agreed step for all processes (it learns of a SIGTERM sent to any of
them); a local Ctrl-C is forwarded to it as a SIGTERM of this process.
"""
import contextlib
import os
import signal
import threading

from absl import logging


class StopRequest:
  """Records the first SIGTERM / SIGINT; see the module docstring."""

  def __init__(self, process_count: int = 1):
    self.process_count = process_count
    self.signal_name: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    if not self.requested:
      self.signal_name = name
      logging.warning("%s received: finishing the current step, then writing a checkpoint and stopping "
                      "(Ctrl-C again to abort at once)", name)
    if self.process_count > 1 and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier listens to SIGTERM

  @contextlib.contextmanager
  def installed(self):
    """Installs the handlers for the duration of the block (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    signals = [signal.SIGINT] if self.process_count > 1 else [signal.SIGINT, signal.SIGTERM]
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    try:
      yield self
    finally:
      for signum, handler in self._previous.items():
        signal.signal(signum, handler)
      self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process of a multi-process run."""
    if self.process_count <= 1:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption sync manager (the coordination service was set up without one)
      return False
    if reached and not self.requested:
      self.signal_name = "SIGTERM"
    return reached
