"""Staging folders this project creates inside folders a user names (the pool cache, the public
pool's output folder), and the cleanup of those a crashed build left behind.

A staging folder is recognised by the marker file written into it when it is made, never by its
name: the cleanup removes only folders that hold a marker naming a process that is no longer
running (or this one), so whatever else a user keeps beside the cache (``.pool-backup/``,
notes) is never touched. The marker leaves the folder before it is renamed into place.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = ".smartfed-staging.json"
MARKER_KIND = "smartfed staging folder"
MAX_MARKER_BYTES = 4096


def make_staging(parent, prefix) -> Path:
    """A new empty folder in ``parent`` holding this process's staging marker."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (folder / MARKER).write_text(json.dumps({"kind": MARKER_KIND, "pid": os.getpid()}), encoding="utf-8")
    return folder


def finish_staging(folder) -> None:
    """Remove the marker: the folder is about to become a result (renamed into place)."""
    (Path(folder) / MARKER).unlink()


def _marker_pid(folder: Path):
    """The pid the folder's marker names, or None when it holds no marker of this project."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > MAX_MARKER_BYTES:
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") != MARKER_KIND:
        return None
    pid = record.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (the staging folders of a live writer are left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(parent) -> list:
    """Remove the staging folders of this project in ``parent`` whose writer is gone (or is this
    process, whose builds run one at a time); returns their paths. Entries without a marker,
    symlinks and files are left alone."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        pid = _marker_pid(entry)
        if pid is None or (pid != os.getpid() and pid_alive(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
