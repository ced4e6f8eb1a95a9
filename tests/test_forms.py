"""The gate and router registries (smartfed_kernels.forms) and the reference they are held to.

The registries follow the option names configuration reads and refuse any other name. The
reference is checked against a third, deliberately naive definition -- one token at a time, in
float64 Python arithmetic -- for every form the registries hold, so that a form added to them
without a definition here fails, and the reference cannot drift with the fast path.
"""

import math

import pytest
import torch

from smartfed_kernels import options, reference
from smartfed_kernels.forms import GATE_FORMS, ROUTER_FORMS, gate_form, router_form
from smartfed_kernels.testing import ARGUMENTS, make_more_inputs


def test_registries_follow_the_option_names_in_order():
    assert tuple(GATE_FORMS) == options.GATES and tuple(ROUTER_FORMS) == options.ROUTERS
    assert [form.code for form in GATE_FORMS.values()] == list(range(len(options.GATES)))
    assert [form.code for form in ROUTER_FORMS.values()] == list(range(len(options.ROUTERS)))
    assert all(gate_form(name) is form for name, form in GATE_FORMS.items())
    assert all(router_form(name) is form for name, form in ROUTER_FORMS.items())


@pytest.mark.parametrize("lookup,kind,name", [
    (gate_form, "gate", "softmax"), (gate_form, "gate", "TOPK_SOFTMAX"), (gate_form, "gate", None),
    (router_form, "router", "projected"), (router_form, "router", "mlp"), (router_form, "router", 0),
])
def test_registries_refuse_unknown_names(lookup, kind, name):
    known = tuple(GATE_FORMS if kind == "gate" else ROUTER_FORMS)
    with pytest.raises(ValueError) as refused:
        lookup(name)
    assert str(refused.value) == f"{kind}: expected one of {known}, got {name!r}"


def _gates_of_token(gate, logits, chosen):
    """One token's gates over its chosen experts, from the definition of docs/design.md §2.2."""
    if gate == "topk_softmax":
        peak = max(logits[i] for i in chosen)
        weights = [math.exp(logits[i] - peak) for i in chosen]
        return [w / sum(weights) for w in weights]
    if gate == "softmax_topk":
        peak = max(logits)
        total = sum(math.exp(z - peak) for z in logits)
        return [math.exp(logits[i] - peak) / total for i in chosen]
    raise NotImplementedError(f"no per-token definition of gate {gate!r}: add one here")


def _router_input(router, x, shrink):
    if router == "linear":
        return x
    if router == "expert_space":
        return shrink
    raise NotImplementedError(f"no per-token definition of router {router!r}: add one here")


def per_token_more(inputs, top_k, gate, router, gamma):
    """The MoRE layer one token at a time, in float64 Python arithmetic: rows of nested lists."""
    rows = {name: None if t is None else t.double().tolist() for name, t in inputs.items()}
    expert_a, expert_b = rows["expert_a"], rows["expert_b"]
    num_experts, d_out = len(expert_a), len(expert_b)
    out = []
    for x in rows["x"]:
        shrink = [sum(a * v for a, v in zip(expert_a[i], x)) for i in range(num_experts)]
        router_in = _router_input(router, x, shrink)
        logits = [sum(w * v for w, v in zip(rows["router_weight"][i], router_in)) + rows["router_bias"][i]
                  for i in range(num_experts)]
        chosen = sorted(range(num_experts), key=lambda i: (-logits[i], i))[:top_k]
        gates = _gates_of_token(gate, logits, chosen)
        y = [sum(w * v for w, v in zip(rows["weight"][o], x)) + rows["bias"][o] for o in range(d_out)]
        for g, i in zip(gates, chosen):
            for o in range(d_out):
                y[o] += gamma * g * shrink[i] * expert_b[o][i]
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("router", ROUTER_FORMS)
@pytest.mark.parametrize("gate", GATE_FORMS)
@pytest.mark.parametrize("top_k", [1, 3, 7], ids=["k=1", "k=3", "k=N"])
def test_reference_matches_a_per_token_loop(router, gate, top_k):
    inputs = make_more_inputs(5, 9, 6, 7, router=router, dtype=torch.float64, seed=top_k)
    got = reference.more_linear(*(inputs[n] for n in ARGUMENTS), top_k, gate=gate, router=router, gamma=0.9)
    torch.testing.assert_close(got, per_token_more(inputs, top_k, gate, router, 0.9), rtol=1e-12, atol=1e-12)


def test_per_token_loop_can_fail():
    """The comparison above detects a wrong gate: the other gate's output differs."""
    inputs = make_more_inputs(4, 9, 6, 7, dtype=torch.float64, seed=1)
    got = reference.more_linear(*(inputs[n] for n in ARGUMENTS), 3, gate="softmax_topk")
    assert not torch.allclose(got, per_token_more(inputs, 3, "topk_softmax", "linear", 3.0))
