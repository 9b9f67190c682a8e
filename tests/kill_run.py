"""`python tests/kill_run.py <point> <valign_jax.main flags...>`: the training command, SIGKILLed
at an exact point, as `kill -9` or a preempted VM ends a run: no cleanup, no finally blocks.

  step:<N>   right after training step N's update (before that step's checkpoint or evaluation),
             once every checkpoint started so far is on disk
  save:<N>   while checkpoint N is being written: from orbax's background thread, after the
             arrays are written and before the directory is committed

The points are installed here, around the code the run executes; the package itself has no
test hooks.
"""

import os
import signal
import sys

import orbax.checkpoint as ocp
from absl import app

from valign_jax import checkpointing, main, workdir


def sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(n: int):
    checkpoints = []
    real_init, real_progress = checkpointing.Checkpoints.__init__, workdir.MetricsLog.progress

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        checkpoints.append(self)

    def progress(self, step):
        real_progress(self, step)
        if step == n:
            for c in checkpoints:
                c.wait()  # so the test knows exactly which checkpoints exist
            sigkill_self()
    checkpointing.Checkpoints.__init__ = init
    workdir.MetricsLog.progress = progress


class _SigkillWhenAwaited:
    """An orbax commit future: waits for the array writes, then kills the process."""

    def __init__(self, futures):
        self.futures = futures

    def result(self, timeout=None):
        for f in self.futures:
            f.result(timeout=timeout)
        sigkill_self()

    def cancel(self):
        for f in self.futures:
            f.cancel()


def kill_during_save(n: int):
    armed = []
    real_save = checkpointing.Checkpoints.save
    real_async_save = ocp.StandardCheckpointHandler.async_save

    def save(self, step, *args, **kwargs):
        armed[:] = [step == n]
        return real_save(self, step, *args, **kwargs)

    async def async_save(self, *args, **kwargs):
        futures = await real_async_save(self, *args, **kwargs)
        return [_SigkillWhenAwaited(futures or [])] if armed and armed[0] else futures
    checkpointing.Checkpoints.save = save
    ocp.StandardCheckpointHandler.async_save = async_save


if __name__ == "__main__":
    where, _, step = sys.argv.pop(1).partition(":")
    {"step": kill_after_step, "save": kill_during_save}[where](int(step))
    app.run(main.main, flags_parser=main.parse_flags)
