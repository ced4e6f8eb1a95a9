"""Rows of a user's data file, read with Hugging Face ``datasets`` and checked before any use.

A data file is JSONL (or a JSON array), CSV, Parquet, or a folder written by
``datasets.Dataset.save_to_disk``. ``locate`` resolves and hashes it (checking its size and
encoding), ``read_columns`` returns the named columns as Python lists,
and every problem is a ``DatasetError``: one line naming the file, the column or row, and what
was expected. Nothing is written: ``datasets`` prepares each file in a temporary folder that is
removed afterwards (``keep_in_memory``), never in the user's Hugging Face cache, and it never
reaches a hub (the packaged json / csv / parquet builders read local files only).
"""

import codecs
import hashlib
import logging
import tempfile
from pathlib import Path

from smartfed.data_errors import DatasetError

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# A file is read into memory by ``datasets``: bound it before reading (the machine this targets
# has 24 GiB; a federated client's data is far smaller).
MAX_FILE_BYTES = 2 * 1024 ** 3
_CHUNK = 1 << 20


def resolve_path(path, argument) -> Path:
    """``path`` resolved (``~`` expanded); a DatasetError naming ``argument`` when it does not exist."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise DatasetError(f"{argument}: {resolved} does not exist")
    return resolved


def detect_format(path: Path, declared, argument) -> str:
    if declared != "auto":
        expected_folder = declared == "arrow"
        if path.is_dir() != expected_folder:
            kind = "a folder written by save_to_disk" if expected_folder else "a file"
            raise DatasetError(f"{argument}: {path} must be {kind} for format {declared!r}")
        return declared
    if path.is_dir():
        return "arrow"
    if path.suffix.lower() not in SUFFIX_FORMATS:
        raise DatasetError(f"{argument}: cannot tell the format of {path.name} from its suffix: name it .jsonl, "
                           ".json, .csv or .parquet, or set the format")
    return SUFFIX_FORMATS[path.suffix.lower()]


def _files_of(path: Path):
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def content_hash(path: Path, format_name) -> str:
    """sha256 of the data (every file of a folder, by relative name), checking on the way that a
    text format is UTF-8 and that no file is over ``MAX_FILE_BYTES``."""
    digest = hashlib.sha256(format_name.encode())
    for file in _files_of(path):
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DatasetError(f"{file}: {size} bytes, more than the {MAX_FILE_BYTES} a data file may hold")
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        decoder = codecs.getincrementaldecoder("utf-8")() if format_name in ("jsonl", "csv") else None
        offset = 0
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                if decoder is not None:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as error:
                        raise DatasetError(f"{file}: not UTF-8 text (byte {chunk[error.start]:#04x} at offset "
                                           f"{offset + error.start})") from None
                offset += len(chunk)
        if decoder is not None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DatasetError(f"{file}: not UTF-8 text (it ends inside a multi-byte character)") from None
    return digest.hexdigest()


def _load(path: Path, format_name):
    import datasets

    # One short line per problem: datasets' progress bars and warnings would drown it, and the
    # errors it logs itself (some versions log a parse error before raising) become its reason.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logged = _Collected()
    library_logger = logging.getLogger("datasets")
    handlers, propagate = library_logger.handlers[:], library_logger.propagate
    for handler in handlers:
        library_logger.removeHandler(handler)
    library_logger.addHandler(logged)
    library_logger.propagate = False
    try:
        with tempfile.TemporaryDirectory(prefix="smartfed-datasets-") as scratch:
            try:
                if format_name == "arrow":
                    loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
                else:
                    reader = {"jsonl": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
                              "parquet": datasets.Dataset.from_parquet}[format_name]
                    loaded = reader(str(path), cache_dir=scratch, keep_in_memory=True)
            except (FileNotFoundError, ValueError, TypeError, OSError, KeyError, StopIteration) as error:
                raise DatasetError(f"{path}: not a readable {format_name} dataset ({logged.reason(error)})") from None
            except Exception as error:  # pyarrow and pandas parse errors have no common base class
                if type(error).__module__.split(".")[0] not in ("pyarrow", "pandas", "datasets", "json"):
                    raise
                raise DatasetError(f"{path}: not a readable {format_name} dataset ({logged.reason(error)})") from None
    finally:
        library_logger.removeHandler(logged)
        for handler in handlers:
            library_logger.addHandler(handler)
        library_logger.propagate = propagate
    if isinstance(loaded, datasets.DatasetDict):
        raise DatasetError(f"{path}: holds the splits {sorted(loaded)}, not one dataset: name one split's folder "
                           f"(e.g. {path / sorted(loaded)[0]})")
    return loaded


class _Collected(logging.Handler):
    """The messages datasets logs while it reads a file, kept instead of printed."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def reason(self, error):
        """The cause datasets logged (its text after "with error <class ...>: "), else the error's first line."""
        if self.messages:
            text = self.messages[-1].split(">: ", 1)[-1].strip().splitlines()
            if text:
                return text[0][:200]
        return _first_line(error)


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def locate(path, format_name="auto", argument="task.data.train"):
    """(resolved path, format, content hash) of the data at ``path``: a DatasetError for a missing
    path, an unknown format, an oversized or non-UTF-8 file. Reads the bytes, not the rows."""
    path = resolve_path(path, argument)
    format_name = detect_format(path, format_name, argument)
    return path, format_name, content_hash(path, format_name)


def read_columns(path, format_name, columns, *, max_rows=None):
    """{column: list of values} for ``columns`` of the data at ``path`` (as ``locate`` returned
    it), its first ``max_rows`` rows when given; a DatasetError for an unreadable file, a missing
    column or no rows."""
    if path.is_file() and not path.read_bytes()[:_CHUNK].strip() and path.stat().st_size < _CHUNK:
        raise DatasetError(f"{path}: no examples (the file is empty)")
    table = _load(path, format_name)
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: no column {missing[0]!r} (it has {', '.join(table.column_names) or 'none'})")
    if max_rows is not None and len(table) > max_rows:
        table = table.select(range(max_rows))
    if len(table) == 0:
        raise DatasetError(f"{path}: no examples")
    return table.select_columns(list(columns)).to_dict()


def _numbers(values, numbers):
    return range(1, len(values) + 1) if numbers is None else numbers


def check_texts(values, *, path, column, numbers=None):
    """The values of a text column as strings; a DatasetError naming the first row (by its
    ``numbers``, the file's 1-based row numbers) that is not a non-blank string."""
    for row, value in zip(_numbers(values, numbers), values):
        if not isinstance(value, str):
            raise DatasetError(f"{path}: row {row}: column {column!r} must be text, got "
                               f"{'null' if value is None else type(value).__name__}")
        if not value.strip():
            raise DatasetError(f"{path}: row {row}: column {column!r} is empty")
    return values


def check_labels(values, labels, *, path, column, numbers=None):
    """Class ids of a label column's values (text, or integers read as their text) within ``labels``."""
    index = {label: position for position, label in enumerate(labels)}
    ids = []
    for row, value in zip(_numbers(values, numbers), values):
        text = value if isinstance(value, str) else str(value) if isinstance(value, int) and not isinstance(
            value, bool) else None
        if text not in index:
            raise DatasetError(f"{path}: row {row}: label {value!r} in column {column!r} is not one of the "
                               f"labels {list(labels)}")
        ids.append(index[text])
    return ids


def check_messages(values, *, path, column, numbers=None):
    """Chat turns ``[{"role", "content"}, ...]`` per row, the last one the assistant's non-empty answer."""
    for row, turns in zip(_numbers(values, numbers), values):
        where = f"{path}: row {row}: column {column!r}"
        if not isinstance(turns, list) or len(turns) < 2:
            raise DatasetError(f"{where} must be a list of at least two chat turns")
        for turn in turns:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(
                    turn.get("content"), str):
                raise DatasetError(f"{where}: every turn must have a text 'role' and 'content'")
        if turns[-1]["role"] != "assistant":
            raise DatasetError(f"{where}: the last turn must be the assistant's answer, got role "
                               f"{turns[-1]['role']!r}")
        if not turns[-1]["content"].strip():
            raise DatasetError(f"{where}: the assistant's answer (the response) is empty")
    return values
