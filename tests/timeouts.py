"""A guard for tests of code that must never block (FIFOs, locks): the body is interrupted with
TimeoutError after `seconds`, so a regression fails the test instead of hanging the suite."""

import contextlib
import signal


@contextlib.contextmanager
def no_hang(seconds: float = 20):
    """Raise TimeoutError inside the body if it runs longer than `seconds` (main thread only:
    SIGALRM interrupts a blocking open() or read() there)."""
    def expired(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
