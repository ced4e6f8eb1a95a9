"""What a federated method is to the engine: how to build the trainable model from the frozen
base and the pool, which tensors travel, how to aggregate them, what the adapter path costs.

SmartFed (MoRE routers over the pool's rank-wise experts, EEQA quotas) lives here; the baselines
(smartfed.baselines) implement the same interface, and the experiment layer
(``smartfed.experiments.method_registry``) picks one by name and hands it to the engine, so every method
runs through the same strategy, messages and accounting.
"""

from abc import ABC, abstractmethod

from smartfed.federated.accounting import more_forward_flops_per_token
from smartfed.federated.seeding import STREAM_ROUTER_INIT, derived_seed
from smartfed.federated.server import fedavg


class FederatedMethod(ABC):
    """Subclasses set ``name`` and implement the abstract methods."""

    name = ""
    uses_quotas = False

    def __init__(self, config):
        self.config = config

    @abstractmethod
    def build(self, base_model, pool):
        """Make ``base_model`` (frozen) trainable in place by this method; returns the model."""

    @abstractmethod
    def trainable_state(self, model):
        """name -> detached clone of every tensor that travels (the trainable ones)."""

    @abstractmethod
    def load_trainable_state(self, model, state):
        """Copy ``state`` into the model (strict on names and shapes)."""

    @abstractmethod
    def forward_flops_per_token(self, model):
        """Forward FLOPs per token of the trainable adapter path (the frozen base excluded)."""

    def aggregate(self, states, weights):
        """FedAvg of every travelling tensor, weighted by ``weights`` (examples per client)."""
        return fedavg(states, weights)

    def max_per_matrix(self, model):
        """module -> number of experts, for methods with EEQA quotas (else None)."""
        return None

    def apply_quotas(self, model, quotas):
        if quotas is not None:
            raise ValueError(f"method {self.name!r} has no expert quotas, got quotas for {len(quotas)} modules")

    def importance_tracker(self, model):
        """An EEQA ImportanceTracker to attach during local training, or None."""
        return None


class SmartFedMethod(FederatedMethod):
    """MoRE routers over the pool's rank-wise experts; only router tensors travel."""

    name = "smartfed"
    uses_quotas = True

    def build(self, base_model, pool):
        from smartfed import inject_more

        seed = derived_seed(self.config.seed, STREAM_ROUTER_INIT) % (2**31)
        return inject_more(base_model, pool, self.config.more.more_config(seed=seed))

    def trainable_state(self, model):
        from smartfed import router_state_dict

        return router_state_dict(model)

    def load_trainable_state(self, model, state):
        from smartfed import load_router_state_dict

        load_router_state_dict(model, state)

    def forward_flops_per_token(self, model):
        from smartfed import more_layers

        return sum(
            more_forward_flops_per_token(
                layer.in_features, layer.out_features, layer.num_experts, layer.top_k, layer.op_router
            )
            for layer in more_layers(model).values()
        )

    def max_per_matrix(self, model):
        from smartfed import more_layers

        return {name: layer.num_experts for name, layer in more_layers(model).items()}

    def apply_quotas(self, model, quotas):
        from smartfed.eeqa import apply_quotas

        if quotas is not None:
            apply_quotas(model, quotas)

    def importance_tracker(self, model):
        from smartfed.eeqa import ImportanceTracker

        if not self.config.eeqa.enabled:
            return None
        return ImportanceTracker(
            model, self.config.eeqa.importance, per_expert=self.config.eeqa.per_expert
        )

