"""Atomic file writes and JSONL helpers: nothing the project writes is ever left half-written."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sys
import time
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read at each call (not import) so a later ``os.umask`` is honoured.

    Linux reports it in /proc without changing it; elsewhere it can only be read by setting it, so
    it is set to the common 0o022 (not 0, which would briefly make other threads' files
    world-writable) and restored at once.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: What every temporary file or folder the project writes (and then renames into place) is called: a
#: process killed mid-write leaves it behind, and :func:`remove_partial` recognises it by this name
#: alone, never touching anything else in a folder.
PARTIAL_PREFIX = ".latentreason-partial-"


def make_temp_dir(parent: str | Path, label: str = "dir") -> Path:
    """A new empty directory in ``parent`` with the permissions ``mkdir`` would give (0o777 less
    the umask), for writing a folder and then renaming it into place.

    Why not plain ``tempfile.mkdtemp``: its 0o700 survives the rename, so other users of a shared
    machine could not read the models or results written through it.
    """
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{PARTIAL_PREFIX}{label}-"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def set_default_file_mode(*paths: str | Path) -> None:
    """Give files the mode ``open`` would have (0o666 less the umask).

    For files written by code that ignores the umask: safetensors 0.8's ``save_file`` (and so
    ``save_pretrained``) always writes 0o600 (safetensors issue #782), so other users of a shared
    machine could not read saved weights.
    """
    mode = 0o666 & ~_umask()
    for path in paths:
        os.chmod(path, mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (atomic on POSIX).

    The file gets the permissions ``open`` would give (0o666 less the umask), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{PARTIAL_PREFIX}{path.name}-")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written ``tmp_dir`` into place as ``final_dir``, replacing an older one.

    Two renames (final -> final.old, tmp -> final): a kill between them leaves only
    ``final.old``, which :func:`recover_dir` puts back before anything reads ``final_dir``.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    _sync_tree(tmp_dir)  # on disk before the rename: a power cut leaves the old folder, not empty files
    recover_dir(final_dir)
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files first, then the folders holding them
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems: its files are synced all the same
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial(folder: str | Path) -> list[str]:
    """Delete what killed writes left in ``folder`` (named :data:`PARTIAL_PREFIX`, at its top level
    only); returns their names. Only safe while this process is the folder's one writer
    (:func:`one_writer`): another writer's temporary folder would go from under it."""
    folder, gone = Path(folder), []
    if not folder.is_dir():
        return gone
    for path in folder.glob(f"{PARTIAL_PREFIX}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        gone.append(path.name)
    return sorted(gone)


class FolderBusyError(RuntimeError):
    """Another process is writing the output folder: two runs would mix their rows or checkpoints."""


LOCK_FILE = ".latentreason.lock"
_HELD: set[str] = set()  # the folders this process holds, resolved


@contextlib.contextmanager
def one_writer(folder: str | Path, field: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder`` for this process alone while the block runs; another process is refused. On
    taking it, delete what killed writes left there (:func:`remove_partial`).

    Two runs writing one folder (the same command started twice, a benchmark and a hand-run
    evaluation sharing a default folder) would interleave rows and overwrite each other's
    checkpoints. An advisory ``flock`` on ``<folder>/.latentreason.lock``: the system releases
    it when the process ends however it ends (a ``kill -9`` leaves no stale lock). The file stays
    (deleting it would race a process opening it); it names the holder, for the error message.
    ``field``: the setting to change, named in the error. ``enabled=False`` (a process other than the
    main one of a launch, which writes nothing there): nothing is taken. Without ``fcntl`` (Windows): no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:  # this process holds it already (run_train, then its Trainer): a nested block
        yield
        return
    path = folder / LOCK_FILE
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a process that has not written its name yet"
            raise FolderBusyError(
                f"{folder}: another process is writing here ({holder}); wait for it to end, or set another "
                f"{field}") from None
        except OSError as exc:  # a file system without locks (some network mounts): run, unguarded, and say so
            logging.getLogger("latentreason").warning("%s: cannot lock (%s); nothing stops a second run writing "
                                                      "this folder meanwhile", folder, exc)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)[:300]}\n")
        fh.flush()
        gone = remove_partial(folder)
        if gone:
            logging.getLogger("latentreason").info("%s: removed what killed writes left: %s", folder, ", ".join(gone))
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        fh.close()  # closing the descriptor releases the lock


def recover_dir(final_dir: str | Path) -> Path:
    """Undo a replace that was killed between its two renames: ``final.old`` becomes ``final``."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.is_dir() and not final_dir.exists():
        try:
            os.replace(old, final_dir)
        except FileNotFoundError:  # another process recovered it first
            pass
    return final_dir


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows, each flushed and synced, so a kill loses at most the row being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path, *, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file; errors name the file and line.

    ``drop_torn_tail`` ignores an unparsable *last* line, which is what a kill during an append
    leaves behind; an unparsable line elsewhere is still an error.
    """
    return list(iter_jsonl(path, drop_torn_tail=drop_torn_tail))


def iter_jsonl(path: str | Path, *, drop_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    for _, row in numbered_jsonl(path, drop_torn_tail=drop_torn_tail):
        yield row


def numbered_jsonl(path: str | Path, *, drop_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(physical line number, row) for each row: what a caller's own checks name (blank lines count)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a byte-order mark (Windows tools write one) is no row
            lines = fh.read().split("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if drop_torn_tail and i == last:
                return
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}")
        yield i + 1, row


def git_commit(package_dir: Path) -> str | None:
    """The commit of the checkout ``package_dir`` is tracked in (``+dirty`` when tracked files differ
    from it); None when it is not a tracked folder of a git checkout. A package installed into a
    virtual environment that happens to sit inside some other repository is untracked there: its
    commit would name the wrong code.
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if not git("ls-files", "--", "."):  # nothing here is tracked (or no checkout at all)
        return None
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """What code made a file: latentreason's version and git commit (see :func:`git_commit`), torch and
    transformers. Stamped on every training and evaluation summary, because a number re-trained after
    a code change is a different number.
    """
    import torch
    import transformers

    from latentreason import __version__

    return {"latentreason": __version__, "commit": git_commit(Path(__file__).resolve().parent),
            "torch": torch.__version__, "transformers": transformers.__version__}
