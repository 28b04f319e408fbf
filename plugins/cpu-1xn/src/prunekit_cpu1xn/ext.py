"""Building and loading the C++ extension: once per source version, cached, safe under concurrency.

The build directory is ``$PRUNEKIT_CACHE_DIR`` (default ``~/.cache/prunekit``) ``/cpu1xn-<hash>``, the
hash covering the sources, the torch version and the compiler, so a changed kernel never loads a stale
library. An exclusive ``flock`` serialises builds between processes (test workers, benches); the lock
dies with its process, so a killed build never leaves a lock behind (torch's own lock file would).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import sys
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
    bdir.mkdir(parents=True, exist_ok=True)
    src = _csrc()
    try:
        with open(bdir / "prunekit.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # we hold the only build right here: any torch lock file left is stale (killed build)
            (bdir / "lock").unlink(missing_ok=True)
            cpp_extension.load(
                name=f"prunekit_cpu1xn_{bdir.name.split('-')[-1]}",
                sources=[str(src / s) for s in SOURCES],
                extra_include_paths=[str(src)],
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(bdir),
                is_python_module=False,
                verbose=bool(os.environ.get("PRUNEKIT_VERBOSE_BUILD")),
            )
    except Exception as exc:  # compiler errors, missing headers, ...: say why, let callers fall back
        raise ExtensionUnavailable(
            f"building the C++ kernel failed: {type(exc).__name__}: {str(exc)[-400:]}", missing_prerequisite=False
        ) from exc
    ops = getattr(torch.ops, OP_NAMESPACE)
    if ops.isa() == 0:
        raise ExtensionUnavailable("the CPU has neither AVX-512 nor AVX2+FMA")
    return ops


def isa_name(code: int) -> str:
    return {512: "avx512", 2: "avx2"}.get(int(code), "none")
