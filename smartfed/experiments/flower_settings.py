"""The SmartFed ServerApp's run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):
``FlowerRunSettings``. Torch-free and Flower-free, so the app checks its run config before it
builds anything."""

import shlex
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainValidator

from smartfed.config import ConfigError, NonEmptyStr, RunConfig, config_from_dict, load_config, number, validate
from smartfed.config.errors import describe
from smartfed.config.limits import MAX_TIMEOUT_S


def _override_items(value):
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as error:
            raise ConfigError(f"cannot split into a.b=value items: {error}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"must be a string of a.b=value items or a list of them, got {describe(value)}")


def _node_ids(value):
    if isinstance(value, str) and all(item.isdigit() for item in value.split()):
        return tuple(int(item) for item in value.split())
    if isinstance(value, (list, tuple)) and all(isinstance(item, int) and not isinstance(item, bool) and item >= 0
                                                for item in value):
        return tuple(value)
    raise ConfigError(f"must be SuperNode ids separated by spaces (as flwr supernode register printed them), "
                      f"got {describe(value)}")


class FlowerRunSettings(BaseModel):
    """The SmartFed ServerApp's run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):
    ``config`` (YAML run config, "" = the defaults), ``overrides`` (``a.b=value`` items separated by
    spaces, as ``--set`` takes them), ``output-dir`` (relative to the server side's output root),
    ``resume``, ``node-wait-s``, ``reply-timeout-s``, ``client-evaluation``, ``nodes`` (the
    SuperNode ids of the run; "" = every connected node). Every key has a default: Flower's
    ``run_simulation`` passes an empty run config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True,
                              alias_generator=lambda name: name.replace("_", "-"), validate_by_name=True)

    config: str = ""
    overrides: Annotated[tuple[str, ...], PlainValidator(_override_items)] = ()
    output_dir: NonEmptyStr = "smartfed-flower-run"
    resume: bool = False
    node_wait_s: number(gt=0, le=MAX_TIMEOUT_S) = 120.0
    reply_timeout_s: number(gt=0, le=MAX_TIMEOUT_S) = 3600.0
    client_evaluation: bool = False
    nodes: Annotated[tuple[int, ...], PlainValidator(_node_ids)] = ()

    @classmethod
    def from_run_config(cls, run_config) -> "FlowerRunSettings":
        return validate(cls, dict(run_config), source="run config")

    def run_config(self) -> RunConfig:
        """The RunConfig: ``config`` (or the defaults) with ``overrides`` applied."""
        if self.config:
            return load_config(self.config, self.overrides)
        return config_from_dict({}, self.overrides)
