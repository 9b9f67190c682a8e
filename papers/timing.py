"""Wall-clock and CPU time of a stage, and the machine's load while it ran: the papers' run is
sized for a 2-core machine that other work shares, so its figures say how busy that was."""

from __future__ import annotations

import os
import resource
import threading
import time


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread: JAX's and grain's) and of its
    finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    """with Timer() as t: ...; t.figures() -> {"wall_s", "cpu_s"}."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        self.wall_s = self.cpu_s = None
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.wall
        self.cpu_s = cpu_seconds() - self.cpu

    def figures(self) -> dict:
        return {"wall_s": round(self.wall_s, 1), "cpu_s": round(self.cpu_s, 1)}


class LoadSampler:
    """The 1-minute load average, sampled every `every` seconds in a daemon thread while the
    `with` block runs: {"mean", "min", "max", "samples"} from summary()."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()

    def _sample(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "min": round(min(s), 2),
                "max": round(max(s), 2), "samples": len(s), "cores": os.cpu_count()}
