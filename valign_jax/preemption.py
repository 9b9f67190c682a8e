"""Stopping a run cleanly when the machine is about to be taken: SIGTERM (Cloud TPU spot and
queued VMs, SLURM preemption and time limits, `kill`) and SIGINT (Ctrl-C).

The first signal asks the loop to stop at the next step boundary: it saves a checkpoint of that
step, logs one line and exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT),
the exit status schedulers expect from a terminated job; rerunning the same command resumes
there. A second signal ends the process at once.

With several processes every host must stop at the same step, or the others would wait forever
in the next step's collectives. JAX's preemption service (on with jax.distributed) catches
SIGTERM on any host and agrees on a step for all of them; this module asks it at every step.
Ctrl-C on one host is passed to that service as a SIGTERM, so it is agreed on the same way.

    with Preemption() as preemption:
        for step in ...:
            ...
            if preemption.reached(step):
                save and stop
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at a signal after saving its checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step} "
                         f"with its checkpoint saved; rerun the same command to resume")


class Preemption:
    """Catches SIGTERM and SIGINT while a run trains (in the main thread; elsewhere, e.g. a
    notebook's worker thread, it watches nothing and never stops the run)."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        # With several processes JAX's preemption service owns SIGTERM; Ctrl-C is forwarded to it.
        for signum in ((signal.SIGINT,) if self._multi else SIGNALS):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: no more waiting
            logging.warning("second %s: exiting now, without a checkpoint of this step",
                            signal.Signals(signum).name)
            os._exit(128 + signum)
        self.signum = signum
        logging.warning("%s received: the run saves a checkpoint at the end of this step and "
                        "stops (send it again to exit at once)", signal.Signals(signum).name)
        if self._multi:  # let JAX's preemption service agree on the step with the other hosts
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether the run should save and stop after `step` (called at every step, on every
        process, in step order)."""
        if not self._multi:
            return self.signum is not None
        from jax.experimental import multihost_utils
        if multihost_utils.reached_preemption_sync_point(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False
