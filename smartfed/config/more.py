"""The run config's ``more`` section, derived from :class:`smartfed.choices.MoREConfig`.

Every MoREConfig field declared with an option rule becomes a field of the section with the same
default and the same allowed values; the section adds ``top_k`` (one int: a run gives every
module the same k) and builds the MoREConfig of a run with :meth:`MoRESection.more_config`. The
fields the run supplies itself are ``RUN_SUPPLIED``; a test holds the two declarations together.
"""

from typing import Literal, Optional

from pydantic import create_model

from smartfed.choices import MAX_TOP_K, MoREConfig, more_options
from smartfed.config.number_types import Section, count, number

# MoREConfig fields that are not in the section: where a run takes them from.
RUN_SUPPLIED = {
    "target_modules": "pool.target_modules (the modules the pool adapts)",
    "train_experts": "always false: only routers travel",
    "seed": "derived from the run's seed",
}
DEFAULT_TOP_K = 4


def _annotation(rule):
    if rule.choices:
        annotation = Literal[rule.choices]
    elif rule.kind is bool:
        annotation = bool
    elif rule.kind is int:
        annotation = count(int(rule.minimum if rule.minimum is not None else 0), rule.maximum)
    else:
        bounds = {"gt": rule.minimum} if rule.minimum is not None else {}
        annotation = number(**bounds, **({"le": rule.maximum} if rule.maximum is not None else {}))
    return Optional[annotation] if rule.optional else annotation


class _MoREOptions(Section):
    def more_config(self, *, seed: int) -> MoREConfig:
        """The MoREConfig of a run: this section's values, its ``seed`` for the router inits."""
        return MoREConfig(**self.model_dump(), seed=seed)


def _section():
    defaults = MoREConfig.__dataclass_fields__
    fields = {"top_k": (count(1, MAX_TOP_K), DEFAULT_TOP_K)}
    fields.update({name: (_annotation(rule), defaults[name].default) for name, rule in more_options().items()})
    return create_model("MoRESection", __base__=_MoREOptions, __module__=__name__, **fields)


MoRESection = _section()
MoRESection.__doc__ = (
    "MoRE layers of the \"smartfed\" method: the fields of smartfed.MoREConfig (same defaults and choices) "
    "with one int top_k; gamma null means k; router_dim and projection_seed are the projected router's m "
    "and the seed of its P.")
