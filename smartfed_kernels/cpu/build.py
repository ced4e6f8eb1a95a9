"""Compiles the MoRE CPU kernels (more_cpu.c) with the system C compiler at first use.

The library is built for the machine it runs on (``-march=native``, or the instruction set named
by ``SMARTFED_CPU_KERNELS_ISA``: ``avx2`` or ``avx512``) and cached under
``$SMARTFED_KERNELS_CACHE`` (default ``$XDG_CACHE_HOME/smartfed_kernels``, else
``~/.cache/smartfed_kernels``) by a name that hashes the sources, the flags, the compiler and the
CPU, so a changed source, compiler, instruction set or machine builds anew and a shared home
never hands one CPU a library built for another. The first build of a name runs under a file
lock (concurrent first uses compile once), and the library is left readable by every user of
the cache (mode 0755). Before use, its ``more_abi()`` must match the Python mirror (abi.py).

Compiling takes under a second. When the library cannot be built or loaded, :func:`load_library`
returns None, callers keep the PyTorch path, and :func:`fall_back` warns once per process with
the reason (the compiler's first ``error:`` line) -- or raises, with
``SMARTFED_REQUIRE_CPU_KERNELS=1`` (CI), so that broken kernels fail instead of running slower.
``SMARTFED_CPU_KERNELS=0`` turns them off on purpose, silently.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from smartfed_kernels.cpu import abi
from smartfed_kernels.file_lock import exclusive

SOURCE_DIR = Path(__file__).parent
SOURCES = ("more_cpu.c", "more_cpu_body.h")
FLAGS = ("-O3", "-fPIC", "-shared")
ISA_FLAGS = {"native": ("-march=native",), "avx2": ("-march=x86-64-v3", "-mtune=native"),
             "avx512": ("-march=x86-64-v4", "-mtune=native")}
# With OpenMP the kernels spread large calls over PyTorch's own threads; a compiler without it
# (Apple clang, say) still builds them single-threaded.
THREADING_FLAGS = (("-fopenmp",), ("-fopenmp-simd",))
DISABLE_VARIABLE = "SMARTFED_CPU_KERNELS"
REQUIRE_VARIABLE = "SMARTFED_REQUIRE_CPU_KERNELS"
ISA_VARIABLE = "SMARTFED_CPU_KERNELS_ISA"
CACHE_VARIABLE = "SMARTFED_KERNELS_CACHE"
LIBRARY_MODE = 0o755


class CPUKernelsUnavailable(RuntimeError):
    """Raised on a fall-back while SMARTFED_REQUIRE_CPU_KERNELS=1."""


class CPUKernelsFallbackWarning(RuntimeWarning):
    """The MoRE CPU kernels could not be used; the PyTorch ops answer instead (slower)."""


_library = None
_reason = None
_deliberate = False
_warned = False
_load_lock = threading.Lock()


def cache_dir() -> Path:
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smartfed_kernels"


def kernels_required() -> bool:
    """Whether a fall-back is an error here (SMARTFED_REQUIRE_CPU_KERNELS=1)."""
    return os.environ.get(REQUIRE_VARIABLE, "0") == "1"


def isa_flags() -> tuple:
    name = os.environ.get(ISA_VARIABLE) or "native"
    if name not in ISA_FLAGS:
        raise ValueError(f"{ISA_VARIABLE}: expected one of {tuple(ISA_FLAGS)}, got {name!r}")
    return ISA_FLAGS[name]


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
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (*flags, compiler, platform.machine(), _cpu_identity()):
        digest.update(part.encode() + b"\0")
    return cache_dir() / f"more_cpu-{digest.hexdigest()[:20]}.so"


def first_error_line(output: str) -> str:
    """The compiler's first ``error:`` line (not the source or caret lines after it), else its last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line
    return lines[-1] if lines else ""


def _build_lock(target: Path):
    """Holds an exclusive lock on ``target``'s lock file: one process builds a name at a time."""
    return exclusive(target.with_name(target.name + ".lock"))


def _compile(compiler: str, flags, target: Path) -> None:
    # Built beside the target under a unique name, then renamed: a reader never loads a
    # half-written library.
    fd, partial = tempfile.mkstemp(prefix=".more_cpu-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-o", partial, str(SOURCE_DIR / "more_cpu.c"), "-lm"],
            check=True, capture_output=True, text=True, timeout=120,
            env={**os.environ, "LC_ALL": "C"},  # plain ASCII messages: they end up in a warning
        )
        os.chmod(partial, LIBRARY_MODE)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def ensure_built(compiler: str, flags, target: Path) -> None:
    """Builds ``target`` unless it exists; the first build of a name runs under its lock, and a
    process that waited there finds the library another one built."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if not target.exists():
            _compile(compiler, flags, target)


def _build_and_load(compiler: str, isa: tuple):
    """The first library that builds, loads and matches the mirror, over THREADING_FLAGS;
    (library, failures)."""
    failures = []
    for threading_flags in THREADING_FLAGS:
        flags = (*FLAGS, *isa, *threading_flags)
        target = library_path(compiler, flags)
        try:
            ensure_built(compiler, flags, target)
            library = ctypes.CDLL(str(target))
        except subprocess.CalledProcessError as error:
            detail = first_error_line(error.stderr or "") or f"exit status {error.returncode}, no output"
            failures.append(f"{compiler} {' '.join(flags)} failed: {detail}")
            continue
        except (OSError, subprocess.SubprocessError) as error:
            failures.append(f"could not build or load {target}: {error}")
            continue
        problem = abi.mismatch(library)
        if problem is None:
            return library, failures
        failures.append(f"{target} refused: {problem}")
    return None, failures


def load_library():
    """The loaded kernel library, built on first call; None (see :func:`unavailable_reason`) when
    disabled or when it cannot be built, loaded or matched. The outcome is kept for the process."""
    global _library, _reason, _deliberate
    if _library is not None or _reason is not None:
        return _library
    with _load_lock:
        if _library is not None or _reason is not None:
            return _library
        if os.environ.get(DISABLE_VARIABLE, "1") == "0":
            _deliberate = True
            _reason = f"disabled by {DISABLE_VARIABLE}=0"
            return None
        compiler = _compiler()
        if compiler is None:
            _reason = "no C compiler found (set CC, or install cc/gcc/clang)"
            return None
        try:
            isa = isa_flags()
        except ValueError as error:
            _reason = str(error)
            return None
        library, failures = _build_and_load(compiler, isa)
        if library is None:
            _reason = "; ".join(failures)
        _library = library
    return _library


def unavailable_reason():
    """Why :func:`load_library` gave None, or None when it loaded (or was not tried yet)."""
    return _reason


def fall_back() -> None:
    """Called where a call would have used the kernels and cannot: nothing when they were turned
    off on purpose; otherwise one warning per process naming the reason, or CPUKernelsUnavailable
    under SMARTFED_REQUIRE_CPU_KERNELS=1."""
    global _warned
    if _deliberate:
        return
    message = f"the MoRE CPU kernels are unavailable ({_reason})"
    if kernels_required():
        raise CPUKernelsUnavailable(f"{message}, and {REQUIRE_VARIABLE}=1 forbids falling back to PyTorch ops")
    if not _warned:
        _warned = True
        warnings.warn(f"{message}; MoRE CPU inference runs on PyTorch ops alone, which is slower",
                      CPUKernelsFallbackWarning, stacklevel=3)
