"""Which files a process opens: the evidence that a client's data stays on its node.

With ``$SMARTFED_AUDIT_OPENS`` naming a folder, ``audit_opens(role)`` installs a
``sys.addaudithook`` hook that appends every path this process opens (the ``open`` audit event of
``open()``, ``io.open`` and ``os.open``), once each and made absolute, to
``<folder>/<role>-<pid>.txt`` as it happens. The ServerApp and each SuperNode's client worker call
it when they start; tests/test_node_data.py reads the files. Without the variable it does nothing.
"""

import os
import sys
import threading
from pathlib import Path

AUDIT_ENV = "SMARTFED_AUDIT_OPENS"


def audit_opens(role):
    """Record this process's opens under ``$SMARTFED_AUDIT_OPENS`` (see the module); returns the
    record's path, or None when the variable is not set."""
    folder = os.environ.get(AUDIT_ENV)
    if not folder:
        return None
    record = Path(folder).resolve() / f"{role}-{os.getpid()}.txt"
    seen, inside = set(), threading.local()

    def hook(event, args):
        # The record's own writes raise the event too: ``inside`` keeps the hook from recursing.
        if event != "open" or getattr(inside, "busy", False) or not args or isinstance(args[0], int) \
                or args[0] is None:
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path in seen:
            return
        seen.add(path)
        inside.busy = True
        try:
            handle = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(handle, (path + "\n").encode("utf-8", "surrogateescape"))
            finally:
                os.close(handle)
        finally:
            inside.busy = False

    sys.addaudithook(hook)
    return record
