"""Atomic file writes that leave nothing behind.

Every file the library writes goes through here: it is written under a recognisable
temporary name in the destination's folder, flushed to disk, given its final mode, and
renamed over the destination in one step, so a reader sees the old file or the new one,
never a half-written one. Temporary names carry the writer's process id; temporaries of
processes that no longer run (killed with SIGKILL, say) are removed by the next write
into the same folder. Temporary folders (:func:`temp_folder`) follow the same rule.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ._errors import CLEError

TEMP_MARK = ".cle-tmp-"
"""Every temporary file is named ``.<final name>.cle-tmp-<pid>-<token>``."""

_TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-[0-9a-f]+$")


class OutputPathError(CLEError):
    """An output path cannot be written: it is a folder, or its folder is missing or
    read-only."""


def folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a file: not an
    existing folder, in an existing, writable folder. Call before doing any work."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file name")
    parent = folder_of(path)
    if not parent.is_dir():
        raise OutputPathError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: directory {parent} is not writable")
    return path


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final`` that stale-file clean-up recognises."""
    token = secrets.token_hex(4)
    return folder_of(final) / f".{final.name}{TEMP_MARK}{os.getpid()}-{token}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete our temporary files in ``folder`` whose writing process is gone. Returns
    what was removed. Temporaries of running processes are left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _folder_re(kind: str) -> re.Pattern:
    return re.compile(rf"^cle-{re.escape(kind)}-(\d+)-[A-Za-z0-9_]+$")


def remove_stale_folders(kind: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """Delete the folders of :func:`temp_folder` ``kind`` in ``folder`` (default: the
    system's temporary folder) whose process is gone. Returns what was removed."""
    folder = tempfile.gettempdir() if folder is None else folder
    pattern, removed = _folder_re(kind), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False) and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def temp_folder(kind: str) -> Iterator[Path]:
    """A fresh folder ``cle-<kind>-<pid>-<random>`` in the system's temporary folder,
    deleted on leaving the block (KeyboardInterrupt and SIGTERM included). Such folders
    of processes that no longer run (killed with SIGKILL) are deleted first."""
    remove_stale_folders(kind)
    path = Path(tempfile.mkdtemp(prefix=f"cle-{kind}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def file_mode(final: Path, like: Path | None = None) -> int:
    """The permission bits a new version of ``final`` gets: those of the file it
    replaces (or of ``like``), else what the umask gives a new file."""
    for candidate in (final, like):
        if candidate is not None:
            try:
                return os.stat(candidate).st_mode & 0o7777
            except OSError:
                pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (where the platform allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(final: Path, mode: int | None = None) -> Iterator[tuple[BinaryIO, Path]]:
    """Write a temporary file beside ``final``; yields ``(file, temp path)``. On leaving
    the block normally the file is flushed, synced and given ``mode`` (default:
    :func:`file_mode`) but not renamed: the caller commits it with :func:`commit`. On
    any exception (KeyboardInterrupt and SIGTERM included) the temporary is deleted."""
    final = Path(final)
    tmp = temp_path(final)
    mode = file_mode(final) if mode is None else mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        discard(tmp)
        raise


def commit(tmp: Path, final: Path) -> None:
    """Rename a staged file over ``final`` in one step (deleting it on failure)."""
    try:
        os.replace(tmp, final)
    except BaseException:
        discard(tmp)
        raise
    fsync_folder(folder_of(Path(final)))


def discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, text, or a function that writes into a binary file) to
    ``path`` atomically, keeping the mode of a file it replaces."""
    path = Path(path)
    remove_stale_temps(folder_of(path))
    with staged(path) as (f, tmp):
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
    commit(tmp, path)
    return path
