"""What a run prints: library chatter kept out of the log."""

from __future__ import annotations

import logging as std_logging

from absl import logging


class _DropInfoFrom(std_logging.Filter):
    """Orbax and grain log every save and read at INFO; keep their warnings only."""

    def __init__(self, *packages):
        super().__init__()
        self.packages = tuple(f"/{p}/" for p in packages)

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or not any(
            p in record.pathname for p in self.packages)


def quiet_library_logs():
    logging.get_absl_handler().addFilter(_DropInfoFrom("orbax", "grain"))
