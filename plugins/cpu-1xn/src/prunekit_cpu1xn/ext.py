"""Building and loading the C++ extension: once per source version, cached, safe under concurrency.

The cache directory is ``$PRUNEKIT_CACHE_DIR`` (default ``~/.cache/prunekit``) ``/cpu1xn-<hash>``, the
hash covering the sources, the torch version and the compiler, so a changed kernel never loads a stale
library. It holds the finished library ``<name>.so`` and nothing half-built: each build runs in its own
``build-<pid>-*`` directory and the library is renamed into place only once it has built and loaded, so
every later process loads it without running ninja.

An exclusive ``flock`` on ``prunekit.lock`` serialises builds between processes (test workers, benches);
the kernel drops it when its holder dies, so a killed build never leaves a lock behind. A holder killed
mid-build (SIGKILL, the OOM killer) leaves its ninja and compilers running as orphans: they only ever write
into the dead holder's own build directory, so the next holder's build never shares a directory with them
(two ninjas in one directory corrupt each other's objects and logs). Build directories of dead holders are
removed by the next holder.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

SOURCES = ("pk_binding.cpp", "pk_avx2.cpp", "pk_avx512.cpp")
HEADERS = ("pk_args.h", "pk_impl.h")
OP_NAMESPACE = "prunekit_cpu1xn"


class ExtensionUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (no compiler, no ninja, not x86 ...).

    ``missing_prerequisite`` is True when this machine lacks something the build needs (tests skip),
    False when the build itself failed (a defect: tests fail).
    """

    def __init__(self, message: str, missing_prerequisite: bool = True) -> None:
        super().__init__(message)
        self.missing_prerequisite = missing_prerequisite


def _csrc() -> Path:
    return Path(str(resources.files("prunekit_cpu1xn") / "csrc"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build_dir() -> Path:
    src = _csrc()
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update((_compiler() or "").encode())
    h.update(sys.version.encode())
    root = Path(os.environ.get("PRUNEKIT_CACHE_DIR") or Path.home() / ".cache" / "prunekit")
    return root / f"cpu1xn-{h.hexdigest()[:16]}"


@functools.cache
def load() -> object:
    """Build (first time) and load the library; returns ``torch.ops.prunekit_cpu1xn``.

    Raises ExtensionUnavailable with the reason when that is impossible here.
    """
    if os.environ.get("PRUNEKIT_CPU1XN_DISABLE"):
        raise ExtensionUnavailable("disabled by PRUNEKIT_CPU1XN_DISABLE")
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ExtensionUnavailable(f"the kernel needs an x86-64 CPU, this is {platform.machine()}")
    if _compiler() is None:
        raise ExtensionUnavailable("no C++ compiler found (install g++ or set CXX)")
    from torch.utils import cpp_extension

    # pip's ninja lives beside the interpreter; torch runs `ninja` from PATH, which an unactivated venv lacks
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable("ninja is not installed (pip install ninja or apt-get install ninja-build)")
    bdir = build_dir()
    try:
        bdir.mkdir(parents=True, exist_ok=True)
        with open(bdir / "prunekit.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _load_or_build(bdir, cpp_extension)
    except ExtensionUnavailable:
        raise
    except Exception as exc:  # compiler errors, missing headers, ...: say why, let callers fall back
        raise ExtensionUnavailable(
            f"building the C++ kernel failed: {type(exc).__name__}: {str(exc)[-400:]}", missing_prerequisite=False
        ) from exc
    ops = getattr(torch.ops, OP_NAMESPACE)
    if ops.isa() == 0:
        raise ExtensionUnavailable("the CPU has neither AVX-512 nor AVX2+FMA")
    return ops


def library_name(bdir: Path) -> str:
    return f"prunekit_cpu1xn_{bdir.name.split('-')[-1]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_or_build(bdir: Path, cpp_extension: object) -> None:
    """Under the lock: load the published library, or build one in a private directory and publish it."""
    name = library_name(bdir)
    lib = bdir / f"{name}.so"
    for old in bdir.glob("build-*"):  # dead holders' build directories (their orphans may still write there)
        pid = old.name.split("-")[1]
        if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    if lib.is_file():
        try:
            torch.ops.load_library(str(lib))
            return
        except OSError:  # unreadable (a damaged disk, a foreign file): build it again
            lib.unlink(missing_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=bdir))
    src = _csrc()
    built = cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(private),
        is_python_module=False,
        verbose=bool(os.environ.get("PRUNEKIT_VERBOSE_BUILD")),
    )  # builds and loads private/<name>.so
    os.replace(built if isinstance(built, str) and built else private / f"{name}.so", lib)  # published whole, or not at all
    shutil.rmtree(private, ignore_errors=True)


def isa_name(code: int) -> str:
    return {512: "avx512", 2: "avx2"}.get(int(code), "none")
