"""What a run prints: its own progress and metrics in short lines, library chatter kept out.

    quiet_startup()        # before TensorFlow or a jax backend loads: no TPU probe message on
                           # machines without one, no TensorFlow oneDNN banner
    quiet_library_logs()   # orbax's and grain's per-file INFO lines dropped
    CompactLoggingWriter   # metrics to the log a few to a line; texts and hyperparameters only
                           # to TensorBoard (the parameter table is logged once, by the loop)
"""

from __future__ import annotations

import logging as std_logging
import os
import textwrap

from absl import logging

from valign_jax import storage

MAX_LINE = 200  # characters of metrics per log line


def quiet_startup() -> None:
    """Environment defaults read when TensorFlow and jax's backends start (a user's own
    setting wins): TensorFlow's C++ INFO lines and oneDNN banner, and jax's message about the
    TPU it looked for and did not find, are not printed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF runs no model here: data only
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


class _QuietLibraries(std_logging.Filter):
    """Orbax and grain log every save and read at INFO: keep their warnings and errors only.
    Their errors keep their one-line message but not their traceback (a full disk fails every
    write of a checkpoint, each with pages of it); the run's own FATAL line says what happened,
    and --verbosity=1 shows the tracebacks."""

    def __init__(self, *packages):
        super().__init__()
        self.packages = tuple(f"/{p}/" for p in packages)

    def filter(self, record):
        if not any(p in record.pathname for p in self.packages):
            return True
        if record.levelno < std_logging.WARNING:
            return False
        if record.exc_info and logging.get_verbosity() < 1:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_library_logs():
    logging.get_absl_handler().addFilter(_QuietLibraries("orbax", "grain", "tensorstore"))


def compact_writer_class():
    """clu's LoggingWriter with short lines (defined on first use: clu loads TensorFlow)."""
    from clu import metric_writers

    class CompactLoggingWriter(metric_writers.LoggingWriter):
        def write_scalars(self, step, scalars):
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
            for line in textwrap.wrap(values, MAX_LINE, break_long_words=False):
                logging.info("[%d] %s", step, line)

        def write_texts(self, step, texts):  # TensorBoard only
            pass

        def write_hparams(self, hparams):  # TensorBoard only; config.json has them all
            pass
    return CompactLoggingWriter


def metric_writer(logdir: str, primary: bool):
    """The run's writer: short log lines everywhere, TensorBoard events from the primary
    process."""
    from clu import metric_writers
    writers = [compact_writer_class()()]
    if primary:
        writers.append(metric_writers.SummaryWriter(logdir))
    return GuardedWriter(metric_writers.AsyncMultiWriter(writers), logdir)


class GuardedWriter:
    """A metric writer whose failed writes (a full disk under the TensorBoard events, which
    clu reports later as an AsyncError from its background thread) raise OSError naming the
    directory, which the command line prints as one FATAL line."""

    def __init__(self, writer, logdir: str):
        self._writer, self._logdir = writer, logdir

    def __getattr__(self, name):
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as err:  # noqa: BLE001  (clu wraps the write's own error)
                cause = storage.root_os_error(err)
                if cause is None and type(err).__name__ != "AsyncError":
                    raise
                raise OSError(f"could not write the TensorBoard events in {self._logdir}: "
                              f"{cause or err}") from err
        return call
