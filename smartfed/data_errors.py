"""The one error class of bad data input, shared by the data readers (smartfed.tasks) and the
engine's partitioning (smartfed.federated.partition), which may not import each other."""

from smartfed.errors import SmartFedError


class DatasetError(SmartFedError, ValueError):
    """A data file, column, row, setting or partition is unusable; ``str()`` is one line naming
    it (the CLI prints it and exits 2)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))
