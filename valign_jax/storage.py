"""Where a run's files live: a local directory, or a URL such as gs://bucket/run (Cloud TPU pods,
where every host must see one workdir).

    workdir = storage.path("gs://my-bucket/lilt/run1")   # or a local path, made absolute
    (workdir / "config.json").write_text(...)

pathlib would turn gs://bucket/run into the local ./gs:/bucket/run on each host and write there
without a word. etils.epath (what orbax writes checkpoints with) sends a URL to its storage's
client (gs://: TensorFlow's GCS file system, installed with the package) and a local path to
the OS, with pathlib's methods. Every file the training loop, `load_trained` and `evaluate`
write or read in a workdir goes through here.
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def path(p) -> epath.Path:
    """An epath.Path: URLs as given, local paths absolute (the cwd can change later)."""
    p = os.fspath(p)
    return epath.Path(p if is_url(p) else os.path.abspath(p))


def check_client(workdir) -> None:
    """Refuse a gs:// workdir, before any compute, when orbax could not checkpoint to it."""
    if os.fspath(workdir).startswith("gs://") and not _importable("google.cloud.storage"):
        raise ImportError(f"--workdir={workdir}: checkpoints on GCS need Google's storage "
                          f"client: pip install -e '.[gcs]' (google-cloud-storage)")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def append_line(file: epath.Path, line: str) -> None:
    """Append one line to a text file. A local file is appended to in place, so a kill cuts at
    most this line. Cloud objects cannot be appended to: the file is written again whole
    (metrics.jsonl holds one line per evaluation) under a temporary name, then moved over."""
    if not is_url(file):
        with open(os.fspath(file), "a") as f:
            f.write(line + "\n")
        return
    old = file.read_text() if file.exists() else ""
    tmp = file.parent / (file.name + ".tmp")
    tmp.write_text(old + line + "\n")
    tmp.replace(file)


def root_os_error(err: BaseException) -> OSError | None:
    """The OSError (ENOSPC, EACCES, EROFS, ...) behind an exception a library wrapped around
    it (orbax's, clu's background writers), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
