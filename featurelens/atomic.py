"""Write a file or a whole folder so that it appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from featurelens.errors import UsageError

MARKER = ".featurelens-artifact"
"""File inside every folder featurelens writes whole; it names the kind of artifact (``sae``, ...)."""

_LEGACY: dict[str, Callable[[Path], bool]] = {
    # folders written before the marker existed
    "sae": lambda p: (p / "cfg.json").is_file() and '"featurelens"' in (p / "cfg.json").read_text(errors="replace"),
    "model-export": lambda p: (p / "featurelens_edit.json").is_file(),
}


def artifact_kind(path: Path) -> str | None:
    """The kind of featurelens artifact folder ``path`` is, or None when featurelens did not write it."""
    m = path / MARKER
    if m.is_file():
        try:
            return str(json.loads(m.read_text())["kind"])
        except (ValueError, KeyError, TypeError, OSError):
            return None
    for kind, test in _LEGACY.items():
        try:
            if path.is_dir() and test(path):
                return kind
        except OSError:
            continue
    return None


def check_target(target: str | os.PathLike[str], kind: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """One-line error unless ``target`` may be written: it is absent or an empty folder, or, with
    ``overwrite``, a folder featurelens wrote as this same ``kind``. Nothing is deleted here."""
    t = Path(target)
    if not t.exists() and not t.is_symlink():
        return
    if t.is_symlink() or not t.is_dir():
        raise UsageError(f"{t} exists and is not a folder: choose another path for the {kind}")
    if not any(t.iterdir()):
        return
    found = artifact_kind(t)
    if found != kind:
        what = f"a featurelens {found}" if found else "a folder featurelens did not write"
        raise UsageError(f"{t} is {what}, not a featurelens {kind}; featurelens replaces only its own "
                               f"artifacts: choose another path or empty it")
    if not overwrite:
        raise UsageError(f"{t} already holds a featurelens {kind}: pass {flag} to replace it or choose another path")


@contextmanager
def atomic_dir(target: str | os.PathLike[str], kind: str, overwrite: bool = True, owned: bool = False,
               flag: str = "--overwrite") -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; when the block ends without error it becomes
    ``target`` (with a :data:`MARKER` naming ``kind``). An existing ``target`` is replaced only as
    :func:`check_target` allows (checked before and again at the swap), or always when ``owned`` (a path
    inside featurelens' own cache). On error the temporary folder is deleted and ``target`` left as it was."""
    final = Path(target)
    if final.name in ("", ".", ".."):
        raise UsageError(f"{target!r} cannot be written as a folder: name a new folder")
    if not owned:
        check_target(final, kind, overwrite, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        if final.exists() or final.is_symlink():
            if not owned:
                check_target(final, kind, overwrite, flag)
            os.replace(final, old)  # moved aside, removed only once the new folder is in place
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
