"""Output folders: checked before any work, marked as featurelens' own, and locked while written.

Every command that writes a folder (a report, a training run, a store, an export) calls
:func:`check_out` for each output before it loads anything, so a bad ``--out`` costs nothing; it then
writes under :func:`output_lock`, an advisory ``fcntl.flock`` on a lock file next to the folder, so a
second process aimed at the same folder gets a one-line error naming the holder's PID instead of
racing the first one (today's start-up temp cleanup of one could delete the other's half-written
files). The lock is released (and its file removed) when the block ends or the process dies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from featurelens.atomic import MARKER, artifact_kind
from featurelens.errors import FeatureLensError, UsageError

_REPORT_FILES: dict[str, Callable[[Path], bool]] = {
    # folders written before the marker existed, recognised by what featurelens put there
    "activation-store": lambda p: (p / "plan.json").is_file(),
    "eval-report": lambda p: (p / "metrics.json").is_file() and (p / "report.html").is_file(),
    "compare-report": lambda p: (p / "compare.json").is_file(),
    "refusal-report": lambda p: (p / "refusal.json").is_file() or (p / "direction.safetensors").is_file(),
    "train-run": lambda p: (p / "latest.json").is_file() or (p / "logs").is_dir(),
    "demo": lambda p: (p / "summary.json").is_file() or (p / "activations" / "manifest.json").is_file(),
}


def check_path_text(path: str, flag: str) -> None:
    """A path given on the command line must be non-empty and free of NUL and newline characters."""
    if not path.strip():
        raise UsageError(f"{flag} is empty: give a folder path")
    if any(c in path for c in "\0\n\r"):
        raise UsageError(f"{flag} {path!r} contains a NUL or newline character: give a plain path")


def _writable_ancestor(path: Path) -> None:
    probe = path.absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise UsageError(f"{probe} is a broken symbolic link: choose another path")
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{probe} is a file, so {path} cannot be created under it: choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{probe} is not writable, so {path} cannot be written: choose another path")


def check_out(path: str | os.PathLike[str], kind: str, flag: str = "--out") -> Path:
    """Check, writing nothing, that ``path`` can hold a featurelens ``kind`` folder: it is absent, an
    empty folder, or a folder featurelens wrote as ``kind`` (files in it may be rewritten); its nearest
    existing ancestor is a writable folder. Anything else is a one-line :class:`UsageError`."""
    check_path_text(str(path), flag)
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise UsageError(f"{flag} {p} is a broken symbolic link: choose another path")
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{flag} {p} exists and is not a folder: choose another path")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {p} is not writable: choose another path or fix its permissions")
        if any(True for c in p.iterdir() if c.name != MARKER):
            found = artifact_kind(p)
            legacy = _REPORT_FILES.get(kind)
            if found != kind and not (found is None and legacy is not None and legacy(p)):
                what = f"a featurelens {found}" if found else "a folder featurelens did not write"
                raise UsageError(f"{flag} {p} is {what}, not a featurelens {kind} folder; featurelens writes only "
                                 "into its own folders: choose another path or empty it")
    else:
        _writable_ancestor(p)
    return p


def make_out(path: str | os.PathLike[str], kind: str, flag: str = "--out") -> Path:
    """:func:`check_out`, then create the folder and mark it as a featurelens ``kind``."""
    p = check_out(path, kind, flag)
    p.mkdir(parents=True, exist_ok=True)
    if artifact_kind(p) != kind:
        (p / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
    return p


_held: dict[str, int] = {}
_held_guard = threading.Lock()


def _lock_path(target: Path) -> Path:
    t = target.absolute()
    if t.name in ("", ".", ".."):
        t = t.resolve()
    return t.parent / f".{t.name}.featurelens-lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], flag: str = "--out") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``target`` (a folder about to be written) for the block.

    Re-entrant within one process. A second process gets a one-line :class:`FeatureLensError` naming
    the holder's PID. Without ``fcntl`` (Windows) this is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = _lock_path(Path(target))
    key = str(lock)
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    created = []  # folders made only to hold the lock file: removed again if nothing else was put there
    d = lock.parent
    while not d.exists():
        created.append(d)
        d = d.parent
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = lock.read_text(errors="replace").strip() or "unknown"
            raise FeatureLensError(f"{flag} {target} is being written by another featurelens process (PID {holder}): "
                                   "wait for it to finish, or choose another path") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by a holder releasing it between our open and lock: retry
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)  # closing releases the flock
        for folder in created:  # deepest first; stops at the first that holds something
            try:
                folder.rmdir()
            except OSError:
                break
