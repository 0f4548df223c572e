"""File-system safety for every stage: output-path checks, folder locks, stale temp
clean-up, disk-full errors, permissions that follow the umask, child processes that
die with their parent.

* :func:`check_output_path` rejects an OUT that cannot be written (a parent that is a
  file, a dangling symlink) before any work is done.
* :func:`output_lock` takes an advisory ``fcntl.flock`` on ``.OUT.lock`` beside OUT for
  the whole stage; a second dqtool process on the same OUT (or ``compress`` work folder)
  stops at once with a line naming the process that holds it.
* Temporary folders carry their owner's PID (``.OUT.tmp-<pid>-xxxx``, ``.OUT.old-<pid>``);
  once a stage holds OUT's lock, those left by a killed run are removed
  (:func:`clean_stale_temps`).
* :func:`io_error` turns an ``OSError`` (disk full, read-only, no permission) into one
  :class:`DQToolError` line naming the path.
* :func:`popen_child` starts a worker that is killed when its parent dies (Linux
  ``PR_SET_PDEATHSIG``; elsewhere the worker's own parent poll is the fallback).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterator

from dqtool.base.errors import DQToolError

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


# --------------------------------------------------------------------------- permissions

def umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, folder: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (``mkdtemp`` and
    ``mkstemp`` create 0700 / 0600)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


# --------------------------------------------------------------------------- paths

def check_output_path(out: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail before any work when ``out`` cannot become a folder: OUT is a dangling
    symlink, or one of its parents exists as a file.

    Example:
        >>> f = tmp / "f"; _ = f.write_text("x")
        >>> check_output_path(f / "out")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: output folder .../f/out cannot be created: .../f is a file, not a folder; choose another path
    """
    p = Path(out)
    if p.is_symlink() and not p.exists():
        raise DQToolError(f"{what} {p} is a symlink to {os.readlink(p)}, which does not exist: remove the link or "
                          f"choose another path")
    for parent in p.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise DQToolError(f"{what} {p} cannot be created: {parent} is a file, not a folder; choose another path")
            break
    return p


# --------------------------------------------------------------------------- locks

_HELD: dict[str, int] = {}   # lock path -> fd, so nested calls (compress -> stage) on one path re-enter


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive advisory lock on OUT for the block (re-entrant in one process).

    Example:
        >>> with output_lock(tmp / "out"):
        ...     (tmp / ".out.lock").is_file()
        True
        >>> (tmp / ".out.lock").exists()   # removed when released
        False
    """
    import fcntl

    out = Path(out)
    lock = _lock_path(out)
    key = str(lock.resolve()) if lock.parent.exists() else str(lock)
    if key in _HELD:
        yield lock
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DQToolError(f"{out} is in use by dqtool process {holder} (lock {lock}): wait for it to finish or "
                              f"stop it, then run again") from None
        # The holder before us removes the lock file when it is done: if the file we locked
        # is no longer the one at that path, lock the new one instead.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = fd
    try:
        clean_stale_temps(out)
        yield lock
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()   # still holding the lock: no one else can be using this file
        os.close(fd)        # closing releases the flock


def locked(arg: str = "out_dir"):
    """Decorator: the stage holds :func:`output_lock` on its ``arg`` (a path) while it runs."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*a, **kw):
            target = sig.bind(*a, **kw).arguments[arg]
            check_output_path(target)
            if int(os.environ.get("RANK", "0") or 0) != 0:
                return fn(*a, **kw)  # a worker of a multi-process run: the main process (rank 0) holds the lock
            with output_lock(target):
                return fn(*a, **kw)

        return inner

    return wrap


# --------------------------------------------------------------------------- stale temps

def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_prefix(out: Path, kind: str = "tmp") -> str:
    """``.OUT.tmp-<pid>-`` (the owner's PID in the name, for :func:`clean_stale_temps`)."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def clean_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove ``.OUT.tmp-<pid>-*`` / ``.OUT.old-<pid>*`` folders beside OUT whose owner is
    gone. Call it holding OUT's lock: no live dqtool process can then be writing them."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or m["name"] != out.name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------- errors

def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def is_write_error(e: BaseException) -> bool:
    """Disk full, quota, read-only file system: the output cannot be written, say so in one line."""
    return isinstance(e, OSError) and (e.errno in DISK_FULL or e.errno == errno.EROFS)


def io_error(e: OSError, path: str | os.PathLike | None = None, needed: int | None = None, hint: str = "") -> DQToolError:
    """One line for an ``OSError`` while writing ``path``: what failed, where, what to do."""
    where = e.filename or path or "?"
    if is_disk_full(e):
        need = f" (about {needed:,} bytes needed)" if needed else ""
        msg = f"disk full writing {where}{need}: free space on that file system"
    elif e.errno == errno.EROFS:
        msg = f"cannot write {where}: the file system is read-only; choose another path"
    elif e.errno in (errno.EACCES, errno.EPERM):
        msg = f"cannot write {where}: permission denied; choose another path"
    else:
        msg = f"cannot write {where}: {e.strerror or e}"
    return DQToolError(msg + (f"; {hint}" if hint else ""))


def folder_bytes(folder: str | os.PathLike) -> int:
    root = Path(folder)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- children

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child (``preexec_fn``): get SIGKILL when the parent process dies (Linux)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def popen_child(cmd: list[str], **kw):
    """``subprocess.Popen(cmd, ...)`` whose child dies with this process (for workers whose
    output is read as it comes)."""
    import subprocess

    return subprocess.Popen(cmd, preexec_fn=die_with_parent if os.name == "posix" else None, **kw)
