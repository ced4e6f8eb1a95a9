"""The resume check and log over a run folder's files: ``config.json`` read and compared by the
rule of smartfed.config.fingerprint, ``resumes.jsonl`` appended. (The run folder's owner,
smartfed.federated.run_dir, takes these over; they stay here until it does.)"""

import json
from pathlib import Path

from smartfed.config.errors import ConfigError
from smartfed.config.fingerprint import resume_changes
from smartfed.config.loading import config_to_dict
from smartfed.config.schema import RunConfig

CONFIG_FILE = "config.json"
RESUME_LOG = "resumes.jsonl"


def read_saved_config(output_dir) -> dict:
    """The ``config.json`` mapping of the run in ``output_dir``; a ConfigError when it is missing
    or unreadable."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{output_dir} holds no run to continue ({CONFIG_FILE} is missing)", key="--resume")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigError(f"cannot read the configuration of the run to continue: {error}", source=path) from None
    return saved


def check_resume(output_dir, config: RunConfig) -> dict:
    """Compare ``config`` with the ``config.json`` of the run in ``output_dir`` before a resume.

    Reads only that file. Raises a ConfigError naming the first key that differs outside
    ``RESUMABLE_CHANGES``; returns the resumable changes ``{key: (old, new)}`` for
    :func:`record_resume`."""
    saved = read_saved_config(output_dir)
    return resume_changes(saved, config, source=Path(output_dir) / CONFIG_FILE)


def record_resume(output_dir, config: RunConfig, changes, *, at_round=None):
    """Make ``config.json`` describe the run as it continues and log what changed in
    ``resumes.jsonl`` (one line per resume that changed something)."""
    if not changes:
        return
    output_dir = Path(output_dir)
    (output_dir / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=1))
    entry = {"at_round": at_round, "changes": {key: list(pair) for key, pair in changes.items()}}
    with open(output_dir / RESUME_LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
