"""The schema of a sweep file (configs/paper_small.yaml): ``SweepConfig``, a partial run config
``base`` and the ``sweep`` grid over it. Torch-free, built from the pieces of smartfed.config."""

from typing import Annotated, Any, Optional

from pydantic import Field, model_validator

from smartfed.config import ConfigError, NonEmptyStr, Positive, Section, count, validate
from smartfed.config.limits import MAX_SEED

# A method entry with ``lr_grid`` runs once per rate, each run named <entry>@lr=<rate>
# (smartfed.experiments.selection.point_name); an entry named so would pass for one of them.
LR_GRID_MARK = "@lr="


class LearningRateGrid(Section):
    """The ``lr_grid`` of one ``sweep.methods`` entry, checked by the run config's number rules."""

    lr_grid: Annotated[list[Positive], Field(min_length=1)]


class SweepGrid(Section):
    """``seeds`` outermost, then ``tasks`` (name -> run config values of that task), then
    ``methods`` (name -> run config values that differ from ``base``; ``per_task`` holds values
    for one task only; a ``method`` key makes the entry an ablation of that method; ``lr_grid``
    runs the entry once per learning rate, each setting ``federation.lr``)."""

    seeds: Annotated[list[count(0, MAX_SEED)], Field(min_length=1)]
    tasks: Annotated[dict[NonEmptyStr, Optional[dict[str, Any]]], Field(min_length=1)]
    methods: Annotated[dict[NonEmptyStr, Optional[dict[str, Any]]], Field(min_length=1)]

    @model_validator(mode="after")
    def _per_task_names(self):
        for method, entry in self.methods.items():
            per_task = (entry or {}).get("per_task") or {}
            unknown = sorted(set(per_task) - set(self.tasks))
            if unknown:
                raise ConfigError(f"names task(s) {unknown} that sweep.tasks lacks",
                                  key=f"methods.{method}.per_task")
        return self

    @model_validator(mode="after")
    def _lr_grids(self):
        for method, entry in self.methods.items():
            key = f"methods.{method}"
            if LR_GRID_MARK in method:
                raise ConfigError(f"must not contain {LR_GRID_MARK!r}, which names the runs of an lr_grid", key=key)
            entry = entry or {}
            if "lr_grid" not in entry:
                continue
            try:
                rates = validate(LearningRateGrid, {"lr_grid": entry["lr_grid"]}).lr_grid
            except ConfigError as error:
                raise error.located(prefix=key) from None
            for index, rate in enumerate(rates):
                first = rates.index(rate)
                if first < index:
                    raise ConfigError(f"repeats lr_grid[{first}] ({rates[first]!r})", key=f"{key}.lr_grid[{index}]")
            per_task = entry.get("per_task")
            places = [(key, entry)] + [(f"{key}.per_task.{task}", values or {})
                                       for task, values in (per_task.items() if isinstance(per_task, dict) else ())]
            for where, values in places:
                federation = values.get("federation") if isinstance(values, dict) else None
                if isinstance(federation, dict) and "lr" in federation:
                    raise ConfigError("cannot be set in an entry with lr_grid: each rate of the grid sets it",
                                      key=f"{where}.federation.lr")
        return self


class SweepConfig(Section):
    """A sweep file: ``base`` (a run config, partial) and the ``sweep`` grid over it."""

    sweep: SweepGrid
    base: dict[str, Any] = Field(default_factory=dict)
