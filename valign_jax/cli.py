"""What the command lines share: where a config file is found, flag parsing whose errors are
one line, and the user's mistakes reported as one FATAL line instead of a traceback.

A config file resolves against the working directory first, then against the repository
(`configs/clip.py` works from anywhere in a checkout). A mistake in the user's input (a file,
a key, a value) prints `FATAL: <what is wrong and what to do>` and exits 1; `--verbosity=1`
adds the traceback, for reporting a bug.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from absl import flags, logging

# The exceptions that mean "your input is wrong": their messages name the file, key or value.
USER_ERRORS = (OSError, ValueError, FloatingPointError, ImportError, KeyError)
REPOSITORY = Path(__file__).resolve().parent.parent


def resolve_config_path(path: str) -> str:
    """`path` as given when it exists, else relative to the repository; FileNotFoundError
    naming both places otherwise."""
    given = Path(path).expanduser()
    if given.is_file():
        return str(given)
    in_repo = REPOSITORY / path
    if not given.is_absolute() and in_repo.is_file():
        return str(in_repo)
    where = f"{Path.cwd()}" + ("" if given.is_absolute() else f" or {REPOSITORY}")
    raise FileNotFoundError(f"config file {path!r} not found (looked in {where}); pass a "
                            f"recipe file such as configs/clip.py:demo, relative to the "
                            f"repository or the working directory, or an absolute path")


def _config_flag_index(argv) -> int | None:
    return next((i for i, a in enumerate(argv) if a.startswith("--config=")), None)


def parse_flags(argv):
    """absl's flag parsing with the config file resolved first and loaded once on its own, so a
    missing file, an unknown config argument or an unknown `--config.<key>` is one FATAL line."""
    argv = list(argv)
    index = _config_flag_index(argv)
    try:
        if index is not None:
            spec = argv[index].split("=", 1)[1]
            path, sep, arg = spec.partition(":")
            spec = resolve_config_path(path) + sep + arg
            argv[index] = f"--config={spec}"
            from valign_jax.recipes import load_config
            config = load_config(spec)  # its own errors, before absl wraps them in three
            unknown = unknown_key_message(argv, config)
            if unknown:
                raise ValueError(unknown)
        return flags.FLAGS(argv)
    except (*USER_ERRORS, flags.Error) as err:
        fatal(err)


def unknown_key_message(argv, config) -> str | None:
    """For the first --config.a.b=value naming a key the config lacks, which keys it has."""
    paths = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    for path in paths:
        node, walked = config, "config"
        for key in path.split("."):
            if not hasattr(node, "keys") or key not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"unknown config key '{walked}.{key}' (from --config.{path}); "
                        f"valid keys of {walked}: {valid}")
            node, walked = node[key], f"{walked}.{key}"
    return None


def fatal(err: BaseException, code: int = 1):
    """Print the error as the user's mistake and exit: one line (more only for a list of
    problems), the traceback only at --verbosity=1 or above."""
    if logging.get_verbosity() >= 1:
        traceback.print_exception(err, file=sys.stderr)
    message = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and message.startswith("'") and message.endswith("'"):
        message = message[1:-1]  # a KeyError prints its message quoted
    print(f"FATAL: {message}", file=sys.stderr)
    sys.exit(code)


def run_guarded(fn, *args):
    """fn(*args), with the user's mistakes as FATAL lines and a stopped run's exit status."""
    from valign_jax.preemption import Preempted
    try:
        return fn(*args)
    except Preempted as stopped:
        logging.warning("%s", stopped)
        sys.exit(stopped.exit_code)
    except USER_ERRORS as err:
        fatal(err)
