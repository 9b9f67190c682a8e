"""Whether a checkpoint on disk still holds what was written: a manifest of every file's size
and SHA-256, written beside the checkpoint once orbax has committed it, and checked on restore.

    <workdir>/checkpoints/<step>/valign_manifest.json
        {"format": 1, "step": N, "files": {"state/_METADATA": [size, sha256], ...}}

Orbax makes a save atomic (a half-written checkpoint is never listed), but nothing checks the
bytes afterwards: a flipped bit, a file cut short by a full disk or a copy, or a folder removed
by hand was restored without a word (or failed with a raw traceback). `check_step` compares the
checkpoint with its manifest: a file missing, of another size or with another hash is a reason
not to trust it, and the run falls back to the newest checkpoint that passes.

A checkpoint without a manifest (the run died between orbax's commit and the manifest, a window
of one hashing pass, or an older valign_jax wrote it) cannot have its bytes checked: it is
accepted when its structure is complete (each item's folder, `state/_METADATA`), with a warning
saying that only the structure was checked. It is never given a manifest afterwards: that would
vouch for bytes nobody saw written.

A damaged checkpoint the training run falls back from is moved aside to `<step>.damaged[-N]`
(kept for inspection; delete it when done; deleted where the store cannot rename folders), so
the run can write that step again.
"""

from __future__ import annotations

import hashlib
import json
import logging

from etils import epath

log = logging.getLogger(__name__)

MANIFEST = "valign_manifest.json"
FORMAT = 1
_CHUNK = 8 << 20   # hashlib releases the GIL on large buffers: hashing runs beside training


def file_digest(path: epath.Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks (local or gs://)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _files(step_dir: epath.Path) -> list[str]:
    """Every file under step_dir (but the manifest), as sorted paths relative to it."""
    found = []
    for folder, _, names in step_dir.walk():
        relative = str(folder)[len(str(step_dir)):].strip("/")
        found += [f"{relative}/{n}" if relative else n for n in names]
    return sorted(f for f in found if f not in (MANIFEST, MANIFEST + ".tmp"))


def write_manifest(step_dir: epath.Path, step: int) -> None:
    """Hash every file of a committed checkpoint and write the manifest (atomically: a
    temporary file renamed, so a reader never sees half of one)."""
    files = {}
    for name in _files(step_dir):
        files[name] = list(file_digest(step_dir / name))
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    tmp.replace(step_dir / MANIFEST)


def check_step(step_dir: epath.Path, items=("state",)) -> tuple[str | None, bool]:
    """(why the checkpoint cannot be trusted or None, whether its bytes were verified).

    With a manifest: every file listed must be there with its size and hash. Without one: the
    structure only (`items`' folders, state/_METADATA)."""
    if not step_dir.is_dir():
        return "its directory is gone", False
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        unchecked = f"(and it has no {MANIFEST} to check the rest)"
        for item in items:
            folder = step_dir / item
            if not folder.is_dir() or next(iter(folder.iterdir()), None) is None:
                return f"{item}/ is missing or empty {unchecked}", False
        if "state" in items and not (step_dir / "state" / "_METADATA").exists():
            return f"state/_METADATA is missing {unchecked}", False
        return None, False
    try:
        recorded = json.loads(manifest.read_text())
        files = recorded["files"]
        if recorded.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {recorded.get('format')!r}")
    except (ValueError, KeyError, TypeError, OSError) as err:
        return f"its {MANIFEST} is unreadable ({err})", False
    for item in items:
        if not any(name.startswith(f"{item}/") for name in files):
            return f"its manifest lists no {item}/ files", False
    for name, (size, sha256) in sorted(files.items()):
        path = step_dir / name
        if not path.exists():
            folder = name.split("/", 1)[0]
            what = (f"{folder}/ is missing" if "/" in name and not (step_dir / folder).exists()
                    else f"{name} is missing")
            return what, True
        actual_size = path.stat().length
        if actual_size != size:
            return (f"{name} is {actual_size} bytes, {size} when written "
                    f"({'truncated' if actual_size < size else 'grown'})"), True
        if file_digest(path)[1] != sha256:
            return f"{name} has changed since it was written (SHA-256 differs)", True
    return None, True


def quarantine(step_dir: epath.Path) -> str:
    """Move a damaged checkpoint aside as <step>.damaged (or .damaged-2, ...); where a store
    cannot rename folders, delete it (it is damaged). Returns what was done, for the log."""
    target = step_dir.parent / f"{step_dir.name}.damaged"
    n = 1
    while target.exists():
        n += 1
        target = step_dir.parent / f"{step_dir.name}.damaged-{n}"
    try:
        step_dir.rename(target)
        return f"moved to {target.name}"
    except (OSError, NotImplementedError) as err:
        step_dir.rmtree()
        return f"deleted (it could not be moved aside: {err})"


def newest_intact(directory: epath.Path, steps, items=("state",), move_damaged: bool = False
                  ) -> tuple[int | None, list[str]]:
    """The newest of `steps` whose checkpoint passes check_step, and one line per newer
    checkpoint that failed (also logged as errors). `move_damaged`: quarantine those, when an
    intact one was found (the writer's choice: the run then writes those steps again; with
    none intact, nothing is moved and the caller decides)."""
    chosen, verified, damaged = None, False, []
    for step in sorted(steps, reverse=True):
        problem, verified = check_step(directory / str(step), items)
        if problem is None:
            chosen = step
            break
        damaged.append((step, problem))
    reports = []
    for step, problem in damaged:
        line = f"checkpoint {step} in {directory} is damaged: {problem}"
        if move_damaged and chosen is not None:
            line += f"; {quarantine(directory / str(step))}"
        log.error("%s", line)
        reports.append(line)
    if chosen is not None and not verified:
        log.warning("checkpoint %d in %s has no %s (the run ended before writing it, or an "
                    "older valign_jax saved it): only its structure was checked", chosen,
                    directory, MANIFEST)
    if chosen is not None and reports:
        log.warning("using checkpoint %d, the newest intact one in %s", chosen, directory)
    return chosen, reports
