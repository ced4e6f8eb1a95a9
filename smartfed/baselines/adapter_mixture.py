"""Adapter-level mixture (MoLE-style): per adapted matrix, a learned per-token gate over the pool's
whole adapters (one gate per adapter, softmax), mixing their full-rank LoRA outputs:

    y = W0 x + b0 + sum_e softmax(Wg x + bg)_e * B_e A_e x

Only the gates (``Wg [E, d_in]``, ``bg [E]``) train and travel; the gate starts at zero, i.e. the
plain average of the adapters. Same pool, same harness as SmartFed, but every adapter is always
active (no top-k over rank-wise experts)."""

import torch
from torch import nn

from smartfed.baselines.common import TrainableParametersMethod, adapter_factors, replace_pool_linears, trainable_tensors


class AdapterMixtureLinear(nn.Module):
    def __init__(self, base, experts):
        super().__init__()
        self.base = base
        factors = adapter_factors(experts)
        place = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("expert_a", torch.cat([a for _, a, _ in factors]).to(**place))
        self.register_buffer("expert_b", torch.cat([b for _, _, b in factors], dim=1).to(**place))
        owner = [index for index, (_, a, _) in enumerate(factors) for _ in range(a.shape[0])]
        self.register_buffer("expert_owner", torch.tensor(owner, dtype=torch.long, device=base.weight.device))
        self.num_adapters = len(factors)
        self.gate = nn.Linear(base.in_features, self.num_adapters, **place)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x):
        gates = torch.softmax(self.gate(x).float(), dim=-1).to(x.dtype)  # [..., E]
        shrink = x @ self.expert_a.T  # [..., N]
        return self.base(x) + (shrink * gates[..., self.expert_owner]) @ self.expert_b.T


class AdapterMixtureMethod(TrainableParametersMethod):
    name = "adapter_mixture"

    def build(self, base_model, pool):
        self._layers = replace_pool_linears(base_model, pool, AdapterMixtureLinear)
        for layer in self._layers.values():
            layer.gate.requires_grad_(True)
        self._names = sorted(trainable_tensors(base_model))
        return base_model

    def forward_flops_per_token(self, model):
        return sum(
            2 * (layer.num_adapters * layer.base.in_features
                 + layer.expert_a.shape[0] * (layer.base.in_features + layer.base.out_features))
            for layer in self._layers.values()
        )
