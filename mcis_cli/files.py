"""File safety without heavy imports: atomic writes and per-folder locks."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from mcis_cli.errors import McisError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    A kill at any moment leaves either the old file or the complete new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.fchmod(fd, new_file_mode())  # results are for others to read too, as the umask allows
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:  # a full disk says ENOSPC without a file name: give it the target's
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (setting it to read
    it back would race with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open()` gives a new file (0644 under a 022 umask); mkstemp's is 0600."""
    return 0o666 & ~umask()


def remove_partials(folder: str | Path) -> int:
    """Delete the temporary files `atomic_path` left under `folder` when a process was killed
    mid-write (never read: they have no final name). Call it only while holding the folder's lock."""
    removed = 0
    for path in Path(folder).rglob(".*.part*") if Path(folder).is_dir() else ():
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


_HELD: dict[str, int] = {}  # lock files this process holds, and how many times (re-entrant)


@contextmanager
def exclusive(folder: str | Path, what: str = "output", name: str = ".mcis.lock",
              subject: str | Path | None = None) -> Iterator[None]:
    """Hold a lock on `folder` (or on `subject`, locked through `folder/name`) so two commands
    never write the same outputs at once.

    The lock is a POSIX record lock on the file `folder/name`: the kernel drops it when the
    process dies (even by kill -9), so a stale lock file never blocks anyone, and unlike flock it
    is not inherited by forked DataLoader workers that may outlive a killed parent for a moment.
    The file is removed on release (a kill leaves it; the next holder removes it). Re-entrant
    within one process.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    while True:
        handle = open(path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise McisError(
                f"{subject or folder} is in use by another mcis command ({owner}); wait for it to "
                f"finish or choose another {what}"
            ) from None
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # the previous holder removed this file as it let go: lock the new one
    _HELD[key] = 1
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)  # still locked: whoever opened it meanwhile retries
        fcntl.lockf(handle, fcntl.LOCK_UN)
        handle.close()


def exclusive_file(path: str | Path, what: str = "output") -> AbstractContextManager[None]:
    """Lock one output file (or a folder that is replaced whole) by a hidden lock beside it."""
    path = Path(path)
    return exclusive(path.parent, what, name=f".{path.name}.lock", subject=path)


_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or point the output elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or point the output elsewhere",
    errno.EFBIG: "the file grew past the size limit: raise the limit or point the output elsewhere",
    errno.EACCES: "no permission: make the folder writable or point the output elsewhere",
    errno.EPERM: "no permission: make the folder writable or point the output elsewhere",
    errno.EROFS: "the file system is read-only: point the output elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed: move it or point the output elsewhere",
    errno.EEXIST: "a file stands where a folder is needed: move it or point the output elsewhere",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an I/O failure: the path, what the system said, and what to do about it."""
    where = f" {exc.filename}" if exc.filename else ""
    hint = _HINTS.get(exc.errno or 0)
    if hint is None:
        return f"cannot access{where}: {exc.strerror or exc}"
    return f"cannot write{where}: {exc.strerror or exc}; {hint} (output_dir, --out)"
