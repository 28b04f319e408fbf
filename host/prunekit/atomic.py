"""Writes that never leave half a file: write to a temp file beside the target, flush it to disk, then rename.

A process killed mid-write (SIGKILL, power loss) leaves the previous file whole and, at worst, its temp
file ``.NAME.XXXXXXXX.PID.tmp``; ``clean_stale`` removes the temp files of processes that no longer run
(``prunekit run`` calls it on its output directory when it starts). A write that fails (a full disk, a
read-only directory, a file size limit) removes its temp file and raises WriteError naming the target, with
the free space there; the previous file is untouched.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError

TMP_SUFFIX = ".tmp"
_STALE = re.compile(r"^\..+\.(\d+)" + re.escape(TMP_SUFFIX) + r"$")
# Tests only: ``write:NAME:K`` SIGKILLs this process in the middle of the K-th atomic write of a file named
# NAME (half its bytes in the temp file, not renamed), the crash tests/test_faults.py recovers from.
KILL_AT_ENV = "PRUNEKIT_TEST_KILL_AT"
_writes: dict[str, int] = {}


def _test_kill_mid_write(path: Path, tmp: str) -> None:
    point = os.environ.get(KILL_AT_ENV, "")
    if not point.startswith("write:"):
        return
    _, name, k = point.split(":", 2)
    if name != path.name:
        return
    _writes[name] = _writes.get(name, 0) + 1
    if str(_writes[name]) == k:
        size = os.path.getsize(tmp)
        os.truncate(tmp, size // 2)
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class WriteError(PrunekitError, OSError):
    """A file could not be written (the message names it and says what is left as it was)."""


def free_bytes(directory: Path) -> int | None:
    """Free space on ``directory``'s filesystem for this user (``None`` when it cannot be read)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _why(exc: BaseException, directory: Path) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {str(exc)[:120]}"
    free = free_bytes(directory)
    return reason + (f"; {free / 1e6:.1f} MB free there" if free is not None else "")


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is what matters
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it, then rename onto ``path``; on any failure the temp file is removed.

    An I/O failure (OSError, or the RuntimeError torch.save raises when the disk is full) becomes one
    WriteError naming ``path``; a PrunekitError raised by ``write`` passes through unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}{TMP_SUFFIX}", dir=path.parent)
    except OSError as exc:
        raise WriteError(f"{path}: cannot create a file in {path.parent} ({_why(exc, path.parent)}); "
                         "pass a writable directory") from None  # fmt: skip
    os.close(fd)
    try:
        write(tmp)
        _test_kill_mid_write(path, tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file should get what open() gives
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, PrunekitError):
            old = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
            raise WriteError(f"{path}: writing failed ({_why(exc, path.parent)}); {old}; free space or pass "
                             "another directory") from exc  # fmt: skip
        raise
    _fsync(str(path.parent), directory=True)


def clean_stale(directory: Path) -> list[Path]:
    """Remove the temp files ``atomic_write`` left in ``directory`` when its process died mid-write (their
    PID no longer runs); returns what was removed. Temp files of live processes are left alone."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STALE.match(p.name)
        if m is None or not p.is_file() or _alive(int(m.group(1))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, OSError):
        return False
    return True


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Recording(io.RawIOBase):
    """A file torch.save writes through, keeping the OSError of a failed write: torch reports it only as
    ``RuntimeError: unexpected pos``, which says nothing about a full disk."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, tmp: str) -> None:
    with open(tmp, "wb") as f:
        rec = _Recording(f)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is not None:
                raise rec.error from None
            raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def write_text_atomic(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
