"""Compiles the MoRE CPU kernels (more_cpu.c) with the system C compiler at first use.

The library is built for the machine it runs on (-march=native) and cached under
``$SMARTFED_KERNELS_CACHE`` (default ``$XDG_CACHE_HOME/smartfed_kernels``, else
``~/.cache/smartfed_kernels``) by a name that hashes the sources, the flags, the compiler and the
CPU, so a changed source, compiler or machine builds anew and a shared home never hands one CPU a
library built for another. Compiling takes under a second; without a C compiler, or with
``SMARTFED_CPU_KERNELS=0``, :func:`load_library` returns None and callers keep the PyTorch path.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = ("more_cpu.c", "more_cpu_body.h")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
# With OpenMP the kernels spread tokens over PyTorch's own threads; a compiler without it (Apple
# clang, say) still builds them single-threaded.
THREADING_FLAGS = (("-fopenmp",), ("-fopenmp-simd",))
DISABLE_VARIABLE = "SMARTFED_CPU_KERNELS"
CACHE_VARIABLE = "SMARTFED_KERNELS_CACHE"

_library = None
_reason = None


def cache_dir() -> Path:
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smartfed_kernels"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what -march=native compiles for), where Linux tells."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted))) or platform.processor()


def _compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def library_path(compiler: str, flags) -> Path:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    for part in (*flags, compiler, platform.machine(), _cpu_identity()):
        digest.update(part.encode() + b"\0")
    return cache_dir() / f"more_cpu-{digest.hexdigest()[:20]}.so"


def _compile(compiler: str, flags, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target under a unique name, then renamed: concurrent first uses (pytest
    # workers, Flower clients) never load a half-written library.
    fd, partial = tempfile.mkstemp(prefix=".more_cpu-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-o", partial, str(Path(__file__).parent / "more_cpu.c"), "-lm"],
            check=True, capture_output=True, text=True, timeout=120,
        )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _build_and_load(compiler: str):
    """The first library that builds and loads, over THREADING_FLAGS; (library, failures)."""
    failures = []
    for threading_flags in THREADING_FLAGS:
        flags = (*FLAGS, *threading_flags)
        target = library_path(compiler, flags)
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            return ctypes.CDLL(str(target)), failures
        except subprocess.CalledProcessError as error:
            last_line = (error.stderr or "").strip().splitlines()[-1:]
            failures.append(f"{compiler} {' '.join(flags)} failed: {last_line[0] if last_line else error}")
        except (OSError, subprocess.SubprocessError) as error:
            failures.append(f"could not build or load {target}: {error}")
    return None, failures


def load_library():
    """The loaded kernel library, built on first call; None (see :func:`unavailable_reason`) when
    disabled or when it cannot be built or loaded. The outcome is kept for the process."""
    global _library, _reason
    if _library is not None or _reason is not None:
        return _library
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        _reason = f"disabled by {DISABLE_VARIABLE}=0"
        return None
    compiler = _compiler()
    if compiler is None:
        _reason = "no C compiler found (set CC, or install cc/gcc/clang)"
        return None
    _library, failures = _build_and_load(compiler)
    if _library is None:
        _reason = "; ".join(failures)
    return _library


def unavailable_reason():
    """Why :func:`load_library` gave None, or None when it loaded (or was not tried yet)."""
    return _reason
