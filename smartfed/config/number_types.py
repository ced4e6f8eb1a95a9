"""The number types of the schema and the base class of its sections.

Numbers are finite and kept as given (an int stays an int, so the hashes of existing runs and
pools do not move); counts are ints with a lower and an upper bound (smartfed.config.limits).
"""

import math
import operator
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from smartfed.config.errors import ConfigError, describe, number_hint

_BOUNDS = (("gt", operator.gt, ">"), ("ge", operator.ge, ">="), ("lt", operator.lt, "<"), ("le", operator.le, "<="))


def number(**bounds):
    """A finite number within ``bounds`` (gt / ge / lt / le), kept as given."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {describe(value)}{number_hint(value)}")
        if isinstance(value, int) and abs(value) > 2**1023:
            raise ConfigError(f"must be finite, got {describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"must be finite, got {value!r}")
        for name, holds, sign in _BOUNDS:
            if name in bounds and not holds(value, bounds[name]):
                raise ConfigError(f"must be {sign} {bounds[name]}, got {describe(value)}")
        return value

    return Annotated[Union[int, float], PlainValidator(check)]


def count(minimum=1, maximum=None):
    """An int in [minimum, maximum]."""
    return Annotated[int, Field(ge=minimum, le=maximum)]


Positive = number(gt=0)
Fraction = number(gt=0, le=1)
NonNegative = number(ge=0)
PositiveInt = count(1)
NonNegativeInt = count(0)
# Mapping keys: JSON (config.json, Flower messages) turns int keys into strings.
IntKey = Annotated[int, Field(strict=False, ge=0, le=2**63 - 1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """A frozen part of a config that refuses unknown keys and checks its defaults too."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)
