"""Linear merge (LoRAHub-style): one scalar per adapter, shared by every adapted matrix,

    y = W0 x + b0 + sum_e w_e B_e A_e x        (= (W0 + sum_e w_e B_e A_e) x once merged)

trained by gradient (LoRAHub searches them gradient-free; the harness trains every method the
same way). Only the E scalars travel; they start at 1/E, the plain average of the adapters."""

import torch
from torch import nn

from smartfed.baselines.common import TrainableParametersMethod, adapter_factors, replace_pool_linears

WEIGHTS_NAME = "linear_merge_weights"


class LinearMergeLinear(nn.Module):
    def __init__(self, base, experts, adapter_names, weights_owner):
        super().__init__()
        self.base = base
        factors = {name: (a, b) for name, a, b in adapter_factors(experts)}
        place = {"device": base.weight.device, "dtype": base.weight.dtype}
        present = [index for index, name in enumerate(adapter_names) if name in factors]
        self.register_buffer("expert_a", torch.cat([factors[adapter_names[i]][0] for i in present]).to(**place))
        self.register_buffer("expert_b", torch.cat([factors[adapter_names[i]][1] for i in present], dim=1).to(**place))
        owner = [i for i in present for _ in range(factors[adapter_names[i]][0].shape[0])]
        self.register_buffer("expert_owner", torch.tensor(owner, dtype=torch.long, device=base.weight.device))
        # A tuple keeps the shared weights out of this layer's parameters: they belong to the
        # model root once, not to every adapted matrix.
        self._weights_owner = (weights_owner,)

    def forward(self, x):
        weights = getattr(self._weights_owner[0], WEIGHTS_NAME).to(x.dtype)[self.expert_owner]  # [N]
        return self.base(x) + ((x @ self.expert_a.T) * weights) @ self.expert_b.T


class LinearMergeMethod(TrainableParametersMethod):
    name = "linear_merge"

    def build(self, base_model, pool):
        names = [info.name for info in pool.adapters]
        device = next(base_model.parameters()).device
        self._layers = replace_pool_linears(
            base_model, pool, lambda base, experts: LinearMergeLinear(base, experts, names, base_model)
        )
        base_model.register_parameter(
            WEIGHTS_NAME, nn.Parameter(torch.full((len(names),), 1.0 / len(names), device=device))
        )
        self._names = [WEIGHTS_NAME]
        return base_model

    def forward_flops_per_token(self, model):
        return sum(
            2 * layer.expert_a.shape[0] * (layer.base.in_features + layer.base.out_features)
            for layer in self._layers.values()
        )
