"""The project's own error base class, torch-free (standard library only).

A :class:`SmartFedError` is a problem its user can fix: a config, an argument, an input file, an
adapter folder, a run folder. ``smartfed`` prints it as one line and exits 2 (``--debug`` shows
its traceback). Any other exception is a defect of SmartFed (an internal invariant that failed)
and keeps its traceback, exit status 1. Every error type a user can cause derives from it:
``smartfed.config.ConfigError``, ``smartfed.pool.AdapterError``, the CLI's usage errors, and
the run folder's and checkpoints' errors.
"""


class SmartFedError(Exception):
    """A problem the user can fix; ``str()`` says what and where in one line."""
