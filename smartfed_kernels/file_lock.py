"""An exclusive lock between processes on one machine, for work done once and shared (the C
kernels' first build, the default model folder's conversion)."""

import contextlib
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """Holds an exclusive ``flock`` on ``lock_path`` (created if missing) within the block. Where
    there is no ``fcntl`` (not POSIX) it holds nothing: callers still land their results by an
    atomic rename, only unserialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
