"""EEQA: importance of each adapted matrix and the expert quotas that follow from it."""

from smartfed.eeqa.importance import (
    ESTIMATORS,
    ImportanceStats,
    ImportanceTracker,
    cosine_importance,
    ema_importance,
    gradient_importance,
    magnitude_importance,
)
from smartfed.eeqa.quotas import (
    allocate_quotas,
    apply_quotas,
    client_budget,
    client_quotas,
    uniform_quotas,
)

__all__ = [
    "ESTIMATORS",
    "ImportanceStats",
    "ImportanceTracker",
    "allocate_quotas",
    "apply_quotas",
    "client_budget",
    "client_quotas",
    "cosine_importance",
    "ema_importance",
    "gradient_importance",
    "magnitude_importance",
    "uniform_quotas",
]
