"""Output files that appear whole or not at all: ``atomic_output`` and the errors of writing one.

A regular file is written under a fresh temporary name beside it and renamed into place at the
end: a failed write leaves no partial file behind. A FIFO or a device (``-o /dev/null``) is
written in place, never replaced.

    with atomic_output(Path("out.csv"), "wb") as handle:
        handle.write(b"a,b\\n")
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import EwError, first_line


class OutputError(EwError):
    """An output file could not be written; says which file, why, and what to do."""

    def __init__(self, path: Path | str, reason: str, hint: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot write {self.path}: {reason}; {hint}")




# Errors of writing to an open file. Others raised inside the block (a Delta file that cannot be
# read, say) are not about the output and pass through unchanged.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EPIPE})


def written_in_place(path: Path) -> bool:
    """True where ``path`` exists and is neither a regular file nor a directory (a FIFO, a device):
    :func:`atomic_output` writes into such a file instead of replacing it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextmanager
def atomic_output(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open ``path`` for writing; a regular file appears, complete, only if the block succeeds.

    The temporary file is created exclusively (``mkstemp``) beside ``path``, so a name planted
    in a shared directory cannot redirect the write; on failure only that file is removed. A FIFO
    or a device is written in place; a directory is refused. OS errors while writing (a full
    disk, a read-only directory) raise :class:`OutputError`.

        with atomic_output(Path("out.csv"), "wb") as handle:
            handle.write(b"a,b\\n")
    """
    path = Path(path)
    handle = _open_in_place(path, mode)
    if handle is not None:
        with _write_errors(path, in_place=True), handle:
            yield handle
        return
    descriptor, temporary = _create_beside(path)
    try:
        with _write_errors(path, in_place=False), os.fdopen(descriptor, mode, **_text_encoding(mode)) as handle:
            yield handle
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise _output_error(path, error, in_place=False) from None
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _text_encoding(mode: str) -> dict:
    return {} if "b" in mode else {"encoding": "utf-8"}


def _open_in_place(path: Path, mode: str) -> IO | None:
    """An open handle on ``path`` where it exists and is not a regular file; None to write beside it."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _output_error(path, error, in_place=False) from None
    if stat.S_ISDIR(status.st_mode):
        raise OutputError(path, "it is a directory", f"give a file name, e.g. {path / 'result'}")
    if stat.S_ISREG(status.st_mode):
        return None
    try:
        # Neither created nor truncated here: if a regular file was swapped in since the check,
        # it is left alone and written beside, like any regular file.
        descriptor = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise _output_error(path, error, in_place=True) from None
    if stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        return None
    return os.fdopen(descriptor, mode, **_text_encoding(mode))


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, empty temporary file in ``path``'s directory, with the permissions ``path`` will have."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".ew-tmp")
    except OSError as error:
        raise _output_error(path, error, in_place=False) from None
    try:
        os.fchmod(descriptor, new_file_permissions(path))  # mkstemp makes 0600; open() would honour the umask
    except OSError as error:
        os.close(descriptor)
        os.unlink(temporary)
        raise _output_error(path, error, in_place=False) from None
    return descriptor, temporary


def new_file_permissions(path: Path) -> int:
    """What a plain ``open(path, "w")`` would leave: an existing file's permissions, else 0666 less the umask."""
    try:
        status = os.stat(path)
        if stat.S_ISREG(status.st_mode):
            return stat.S_IMODE(status.st_mode) & 0o777
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it (setting it, even briefly, races with other threads)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


@contextmanager
def _write_errors(path: Path, *, in_place: bool) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS:
            raise
        raise _output_error(path, error, in_place=in_place) from None


def _output_error(path: Path, error: OSError, *, in_place: bool) -> OutputError:
    directory = path.parent
    left = "anything already written to it stays there" if in_place else "nothing was written"
    denied = "permission denied" if in_place else f"permission denied in {directory}"
    reasons = {
        errno.ENOENT: (f"the directory {directory} does not exist", "create it, or write somewhere else"),
        errno.ENOTDIR: (f"{directory} is not a directory", "give a path inside a directory"),
        errno.EACCES: (denied, "write somewhere you can write to"),
        errno.EPERM: (denied, "write somewhere you can write to"),
        errno.EROFS: (f"{directory} is on a read-only file system", "write somewhere else"),
        errno.ENOSPC: ("no space left on the device", f"free some space or write somewhere else ({left})"),
        errno.EDQUOT: ("the disk quota is exceeded", f"free some space or write somewhere else ({left})"),
        errno.EFBIG: ("the file grew too large for the file system", f"write somewhere else ({left})"),
        errno.EPIPE: ("its reader went away before the end", "keep the reader open until ew finishes"),
        errno.EISDIR: ("it is a directory", f"give a file name, e.g. {path / 'result'}"),
    }
    reason, hint = reasons.get(error.errno, (error.strerror or first_line(error), f"check the path ({left})"))
    return OutputError(path, reason, hint)
