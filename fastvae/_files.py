"""Writing a file so that a reader, or a run resumed after a kill, never sees half of it, and
holding a folder so that a second process cannot write into it meanwhile."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Callable

from fastvae._signals import ctrl_c_deferred

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# What write_atomically appends to a name for its temporary: unique per process and call, so two
# writers of one file (two runs, two `fastvae sample`) never write into each other's temporary.
# ``writer`` is the writing process's pid.
TEMPORARY_SUFFIX = re.compile(r"\.(?P<writer>\d+)\.[0-9a-f]{8}\.tmp")


class HeldError(RuntimeError):
    """Another process holds the lock; the message names it (pid and host)."""


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    A kill or an error at any point leaves either the old file or the new one, whole, and no
    temporary file after an error. An OSError of the write (a full disk, a file too large, a
    folder refusing the temporary) names ``path``, not the temporary nor no file at all. A Ctrl-C
    meanwhile takes effect once the new file is in place: landing inside a writer such as
    torch.save's, it would leave that writer's own error instead. A second one stops the write at
    once, as a KeyboardInterrupt: the old file stays, and the temporary is removed (or, cut off
    in the removal itself, left for remove_stale_temporaries once this process is gone).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with ctrl_c_deferred():
        try:
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.filename not in (None, str(tmp)):  # another file's error, raised by ``write``
                raise
            raise naming(exc, path) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _sync_folder(path.parent)
    return path


def remove_stale_temporaries(folder: Path, names: re.Pattern) -> None:
    """Delete the temporaries that write_atomically left in ``folder`` for files named as ``names``
    matches, where their writer has died (a kill -9 mid-write). A live writer's (a `fastvae sample`
    writing into the folder) is its to finish."""
    for path in folder.iterdir():
        match = re.fullmatch(rf"(?P<name>.+){TEMPORARY_SUFFIX.pattern}", path.name)
        if match and names.fullmatch(match["name"]) and path.is_file() and not _alive(int(match["writer"])):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    # Signal 0 asks whether a process exists; only POSIX has it (on Windows os.kill would end it).
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def hold(path: str | Path) -> BinaryIO | None:
    """Lock the file ``path`` (made if missing) for as long as the returned file stays open, and
    write this process's pid and host into it; None where there is no fcntl (Windows).

    The lock is flock's: the OS drops it when the process dies, kill -9 included, so a file left
    behind is never a stale lock. Raises HeldError, naming the holder, when another process holds it.
    """
    if fcntl is None:
        return None
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Empty only in the instant between the holder's lock and its write.
        holder = f.read().decode(errors="replace").strip() or "another process"
        f.close()
        raise HeldError(holder) from None
    except BaseException:
        f.close()
        raise
    # Written over the last holder's words in place and then cut: the file is never empty once
    # written, so a process refused meanwhile can always name the holder.
    try:
        f.seek(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        f.truncate()
        f.flush()
    except OSError as exc:  # a full disk: the file was made, but its words do not fit
        with contextlib.suppress(OSError):  # the flush on close fails again, yet closes the file
            f.close()
        raise naming(exc, path) from exc
    return f


def naming(exc: OSError, path: str | Path) -> OSError:
    """``exc`` naming ``path``: a failed write of an open file names no file at all. OSError(errno,
    ...) comes back as the same subclass (FileNotFoundError, ...)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def _sync_folder(folder: Path) -> None:
    # The rename survives a power cut only once the folder's entry is on disk too. Only POSIX
    # lets a folder be opened for that.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
