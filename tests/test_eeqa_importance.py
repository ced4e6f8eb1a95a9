"""EEQA importance: estimators against direct computation, tracker plumbing, client statistics,
and end to end: layers whose experts matter get the quota."""

import json

import pytest
import torch
from torch import nn

from smartfed import MoRELinear, more_layers
from smartfed.eeqa import (
    ImportanceStats,
    ImportanceTracker,
    allocate_quotas,
    apply_quotas,
    cosine_importance,
    ema_importance,
    gradient_importance,
    magnitude_importance,
)
from smartfed_kernels import reference

D, N, K = 16, 8, 2


def more_layer(generator, expert_scale, d_in=D, d_out=D, n=N, k=K):
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=generator) / d_in**0.5)
        base.bias.copy_(torch.randn(d_out, generator=generator) * 0.1)
    expert_a = torch.randn(n, d_in, generator=generator) / d_in**0.5
    expert_b = torch.randn(d_out, n, generator=generator) * expert_scale / n**0.5
    layer = MoRELinear(base, expert_a, expert_b, k, router_init="normal")
    with torch.no_grad():
        layer.router_weight.copy_(torch.randn(n, d_in, generator=generator))
    return layer


def expert_delta(layer, x):
    """The MoRE contribution by the reference op, in float64."""
    return reference.more_linear(
        x.double(), None, None, layer.router_weight.double(),
        None if layer.router_bias is None else layer.router_bias.double(),
        layer.expert_a.double(), layer.expert_b.double(), layer.top_k,
    )


def test_per_token_estimators_match_their_definitions():
    generator = torch.Generator().manual_seed(1)
    y0 = torch.randn(3, 5, D, generator=generator)
    delta = torch.randn(3, 5, D, generator=generator) * 0.3
    grad = torch.randn(3, 5, D, generator=generator)
    y0d, deltad, gradd = y0.double(), delta.double(), grad.double()
    expected_cosine = 1 - torch.nn.functional.cosine_similarity(y0d, y0d + deltad, dim=-1)
    expected_magnitude = deltad.norm(dim=-1) / y0d.norm(dim=-1)
    expected_gradient = (gradd * deltad).sum(dim=-1).abs()
    torch.testing.assert_close(cosine_importance(y0, delta).double(), expected_cosine.flatten(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(magnitude_importance(y0, delta).double(), expected_magnitude.flatten(), rtol=1e-5, atol=0)
    torch.testing.assert_close(gradient_importance(grad, delta).double(), expected_gradient.flatten(), rtol=1e-5, atol=1e-6)
    assert cosine_importance(y0, delta).dtype == torch.float32


def test_cosine_keeps_precision_for_small_contributions():
    generator = torch.Generator().manual_seed(2)
    y0 = torch.randn(64, D, generator=generator)
    delta = torch.randn(64, D, generator=generator) * 1e-4
    y0d, deltad = y0.double(), delta.double()
    expected = 1 - torch.nn.functional.cosine_similarity(y0d, y0d + deltad, dim=-1)
    measured = cosine_importance(y0, delta).double()
    # 1 - cos is ~1e-9 here: a float32 1 - cos would return mostly zeros.
    torch.testing.assert_close(measured, expected, rtol=1e-2, atol=1e-12)
    assert (measured > 0).all()


def test_zero_contribution_scores_zero():
    y0 = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    delta = torch.zeros(4, D)
    assert cosine_importance(y0, delta).abs().max() == 0
    assert magnitude_importance(y0, delta).abs().max() == 0
    assert cosine_importance(torch.zeros(2, D), torch.zeros(2, D)).abs().max() == 0


@pytest.mark.parametrize("estimator", ["cosine", "magnitude", "gradient"])
def test_tracker_matches_direct_computation_on_a_layer(estimator):
    generator = torch.Generator().manual_seed(4)
    model = nn.Sequential(more_layer(generator, 0.5))
    layer = model[0]
    batches = [torch.randn(2, 7, D, generator=generator), torch.randn(3, 1, D, generator=generator)]
    targets = [torch.randn(2, 7, D, generator=generator), torch.randn(3, 1, D, generator=generator)]
    with ImportanceTracker(model, estimator=estimator) as tracker:
        for x, target in zip(batches, targets):
            loss = (model(x) * target).sum()
            loss.backward()
    values = []
    for x, target in zip(batches, targets):
        y0 = layer.base(x).double()
        delta = expert_delta(layer, x)
        if estimator == "cosine":
            values.append(1 - torch.nn.functional.cosine_similarity(y0, y0 + delta, dim=-1).flatten())
        elif estimator == "magnitude":
            values.append((delta.norm(dim=-1) / y0.norm(dim=-1)).flatten())
        else:  # d(loss)/dy is the target
            values.append((target.double() * delta).sum(dim=-1).abs().flatten())
    expected = torch.cat(values).mean().item()
    stats = tracker.stats()
    assert stats.counts == {"0": 17}
    assert stats.estimator == estimator
    assert tracker.importance()["0"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("estimator", ["cosine", "magnitude", "gradient"])
@pytest.mark.parametrize("gamma", [None, 3.0])
def test_per_expert_tracker_measures_delta_over_gamma(estimator, gamma):
    generator = torch.Generator().manual_seed(14)
    layer = more_layer(generator, 0.5, k=3)
    layer.gamma = gamma
    model = nn.Sequential(layer)
    x = torch.randn(2, 5, D, generator=generator)
    target = torch.randn(2, 5, D, generator=generator)
    with ImportanceTracker(model, estimator=estimator, per_expert=True) as tracker:
        (model(x) * target).sum().backward()
    y0 = layer.base(x).double()
    delta = reference.more_linear(
        x.double(), None, None, layer.router_weight.double(), None, layer.expert_a.double(),
        layer.expert_b.double(), layer.top_k, gamma=gamma,
    ) / (layer.top_k if gamma is None else gamma)
    if estimator == "cosine":
        expected = 1 - torch.nn.functional.cosine_similarity(y0, y0 + delta, dim=-1)
    elif estimator == "magnitude":
        expected = delta.norm(dim=-1) / y0.norm(dim=-1)
    else:
        expected = (target.double() * delta).sum(dim=-1).abs()
    assert tracker.importance()["0"] == pytest.approx(expected.mean().item(), rel=1e-4)


def test_per_expert_importance_does_not_grow_with_the_quota():
    """Identical experts: the gated mean of the selected ones is one expert whatever k is, so the
    per-expert importance stays put while the plain one grows with k (the quota feedback)."""
    generator = torch.Generator().manual_seed(15)
    layer = more_layer(generator, 0.3)
    with torch.no_grad():
        layer.expert_a.copy_(layer.expert_a[:1].expand(N, D))
        layer.expert_b.copy_(layer.expert_b[:, :1].expand(D, N))
    model = nn.Sequential(layer)
    x = torch.randn(6, D, generator=generator)
    measured = {}
    for per_expert in (False, True):
        for k in (1, 4, N):
            layer.top_k = k
            with ImportanceTracker(model, per_expert=per_expert) as tracker, torch.no_grad():
                model(x)
            measured[per_expert, k] = tracker.importance()["0"]
    assert measured[True, 1] == pytest.approx(measured[True, 4], rel=1e-4)
    assert measured[True, 1] == pytest.approx(measured[True, N], rel=1e-4)
    assert measured[False, 1] == pytest.approx(measured[True, 1], rel=1e-4)
    assert measured[False, 1] < measured[False, 4] < measured[False, N]


@pytest.mark.parametrize("estimator", ["cosine", "magnitude", "gradient"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_tracker_leaves_outputs_and_gradients_unchanged(estimator, per_expert):
    generator = torch.Generator().manual_seed(5)
    model = nn.Sequential(more_layer(generator, 1.0), nn.Tanh(), more_layer(generator, 1.0))
    x = torch.randn(4, 3, D, generator=generator)
    plain = model(x)
    plain.square().sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    with ImportanceTracker(model, estimator=estimator, per_expert=per_expert):
        tracked = model(x)
        tracked.square().sum().backward()
    torch.testing.assert_close(tracked, plain, rtol=1e-5, atol=1e-6)
    for grad, plain_grad in zip((p.grad for p in model.parameters() if p.requires_grad), plain_grads):
        torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-6)


def test_attach_detach_reset_and_counts():
    generator = torch.Generator().manual_seed(6)
    model = nn.Sequential(more_layer(generator, 1.0), nn.ReLU(), more_layer(generator, 1.0))
    tracker = ImportanceTracker(model)
    assert set(tracker.layers) == {"0", "2"}
    with pytest.raises(ValueError, match=r"no tokens observed for modules \['0', '2'\]"):
        tracker.importance()
    x = torch.randn(5, D, generator=generator)
    with tracker:
        assert tracker.attached
        with torch.no_grad():
            model(x)
        with pytest.raises(RuntimeError, match="already attached"):
            tracker.attach()
    assert not tracker.attached
    first = tracker.stats()
    with torch.no_grad():
        model(x)
    assert tracker.stats() == first
    assert first.counts == {"0": 5, "2": 5}
    tracker.reset()
    assert tracker.stats().counts == {"0": 0, "2": 0}
    with tracker, torch.no_grad():
        model(x)
        model(x)
    assert tracker.stats().counts == {"0": 10, "2": 10}
    assert tracker.importance() == pytest.approx(first.mean(), rel=1e-6)


def test_gradient_estimator_ignores_passes_without_backward():
    generator = torch.Generator().manual_seed(7)
    model = nn.Sequential(more_layer(generator, 1.0))
    with ImportanceTracker(model, estimator="gradient") as tracker, torch.no_grad():
        model(torch.randn(3, D, generator=generator))
    assert tracker.stats().counts == {"0": 0}


def test_tracker_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"estimator must be one of \('cosine', 'magnitude', 'gradient'\), got 'fisher'"):
        ImportanceTracker(nn.Sequential(more_layer(torch.Generator().manual_seed(0), 1.0)), estimator="fisher")
    with pytest.raises(ValueError, match="model has no MoRE layers"):
        ImportanceTracker(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="per_expert: expected a bool, got str"):
        ImportanceTracker(nn.Sequential(more_layer(torch.Generator().manual_seed(0), 1.0)), per_expert="yes")


def test_client_statistics_serialise_and_merge_weighted_by_tokens():
    generator = torch.Generator().manual_seed(8)
    model = nn.Sequential(more_layer(generator, 1.0), nn.Tanh(), more_layer(generator, 0.2))
    shards = [torch.randn(n, D, generator=generator) for n in (3, 11, 6)]
    client_stats = []
    for shard in shards:
        with ImportanceTracker(model) as tracker, torch.no_grad():
            model(shard)
        payload = json.dumps(tracker.stats().to_dict())
        client_stats.append(ImportanceStats.from_dict(json.loads(payload)))
    with ImportanceTracker(model) as pooled, torch.no_grad():
        model(torch.cat(shards))
    merged = ImportanceStats.merge(client_stats)
    assert merged.counts == {"0": 20, "2": 20}
    assert merged.mean() == pytest.approx(pooled.importance(), rel=1e-5)
    assert all(isinstance(v, float) for v in merged.to_dict()["sums"].values())
    with pytest.raises(ValueError, match=r"cannot merge estimators 'cosine' and 'magnitude'"):
        ImportanceStats.merge([merged, ImportanceStats("magnitude", merged.sums, merged.counts)])
    with pytest.raises(ValueError, match=r"cannot merge statistics of different modules: \['9'\] differ"):
        ImportanceStats.merge([merged, ImportanceStats("cosine", {"9": 1.0, "0": 1.0, "2": 1.0}, {"9": 1, "0": 1, "2": 1})])
    with pytest.raises(ValueError, match=r"counts\['0'\] must be an int >= 0, got -1"):
        ImportanceStats("cosine", {"0": 1.0}, {"0": -1})
    with pytest.raises(ValueError, match=r"must be a mapping with exactly the keys"):
        ImportanceStats.from_dict({"sums": {}, "counts": {}})


def test_server_ema_of_importance():
    assert ema_importance(None, {"a": 1.0}, decay=0.9) == {"a": 1.0}
    smoothed = ema_importance({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, decay=0.75)
    assert smoothed == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\), got 1.0"):
        ema_importance({"a": 1.0}, {"a": 1.0}, decay=1.0)
    with pytest.raises(ValueError, match=r"previous and current must name the same modules: \['b'\] differ"):
        ema_importance({"a": 1.0}, {"a": 1.0, "b": 2.0}, decay=0.5)


class Branches(nn.Module):
    """Two MoRE layers with identical experts on the same input; the loss sees only ``used``."""

    def __init__(self, generator):
        super().__init__()
        self.used = more_layer(generator, 1.0)
        self.unused = more_layer(torch.Generator().manual_seed(0), 1.0)
        self.unused.load_state_dict(self.used.state_dict())

    def forward(self, x):
        return self.used(x) + 0.0 * self.unused(x)


def test_gradient_estimator_sees_what_the_loss_sees_and_forward_estimators_do_not():
    generator = torch.Generator().manual_seed(9)
    model = Branches(generator)
    x = torch.randn(6, D, generator=generator)
    target = torch.randn(6, D, generator=generator)
    measured = {}
    for estimator in ("cosine", "gradient"):
        with ImportanceTracker(model, estimator=estimator) as tracker:
            (model(x) - target).square().mean().backward()
        measured[estimator] = tracker.importance()
    assert measured["cosine"]["used"] == pytest.approx(measured["cosine"]["unused"], rel=1e-6)
    assert measured["gradient"]["used"] > 0
    assert measured["gradient"]["unused"] == 0


def train_routers(model, inputs, targets, steps):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x, target = inputs[step % len(inputs)], targets[step % len(targets)]
        optimizer.zero_grad()
        (model(x) - target).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("estimator", ["cosine", "magnitude", "gradient"])
def test_layers_whose_experts_matter_get_the_quota(estimator):
    generator = torch.Generator().manual_seed(10)
    # Four MoRE layers; the experts of "2" are zero (they change nothing), those of "6" are tiny.
    model = nn.Sequential(
        more_layer(generator, 1.0), nn.Tanh(),
        more_layer(generator, 0.0), nn.Tanh(),
        more_layer(generator, 1.5), nn.Tanh(),
        more_layer(generator, 0.01),
    )
    teacher_routers = {name: torch.randn(N, D, generator=generator) for name in more_layers(model)}
    inputs = [torch.randn(8, 4, D, generator=generator) for _ in range(4)]
    with torch.no_grad():
        saved = {name: layer.router_weight.clone() for name, layer in more_layers(model).items()}
        for name, layer in more_layers(model).items():
            layer.router_weight.copy_(teacher_routers[name])
        targets = [model(x) for x in inputs]
        for name, layer in more_layers(model).items():
            layer.router_weight.copy_(saved[name])
    with ImportanceTracker(model, estimator=estimator) as tracker:
        train_routers(model, inputs, targets, steps=12)
    importance = tracker.importance()
    assert tracker.stats().counts == {name: 12 * 32 for name in ("0", "2", "4", "6")}
    assert importance["2"] == 0
    assert sorted(importance, key=importance.get, reverse=True)[:2] in (["0", "4"], ["4", "0"])
    assert importance["6"] < min(importance["0"], importance["4"])

    max_per_matrix = {name: layer.num_experts for name, layer in more_layers(model).items()}
    quotas = allocate_quotas(importance, K * 4, k_min=1, max_per_matrix=max_per_matrix)
    assert quotas["2"] == 1
    assert quotas["6"] == 1
    assert quotas["0"] + quotas["4"] == K * 4 - 2
    first, second = sorted(("0", "4"), key=importance.get, reverse=True)
    assert quotas[first] >= quotas[second] >= K

    x = inputs[0]
    before = model(x).detach()
    apply_quotas(model, quotas)
    assert {name: layer.top_k for name, layer in more_layers(model).items()} == quotas
    after = model(x).detach()
    assert not torch.allclose(before, after)


def test_end_to_end_on_a_tiny_llama_with_a_peft_pool(make_tiny_llama, make_lora_adapter, random_token_ids):
    from smartfed import LoRAPool, MoREConfig, inject_more

    pool = LoRAPool.from_pretrained([
        make_lora_adapter("qv", target_modules=("q_proj", "v_proj"), seed=1),
        make_lora_adapter("q", target_modules=("q_proj",), seed=2),
    ])
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    layers = more_layers(model)
    dead = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        layers[dead].expert_b.zero_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with ImportanceTracker(model) as tracker:
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=random_token_ids, labels=random_token_ids).loss.backward()
            optimizer.step()
    stats = tracker.stats()
    assert set(stats.counts) == set(layers) and len(layers) == 4
    assert set(stats.counts.values()) == {3 * random_token_ids.numel()}
    importance = stats.mean()
    assert importance[dead] == 0
    assert all(value > 0 for name, value in importance.items() if name != dead)

    max_per_matrix = {name: layer.num_experts for name, layer in layers.items()}
    assert max_per_matrix["model.layers.0.self_attn.q_proj"] == 8
    assert max_per_matrix[dead] == 4
    quotas = allocate_quotas(importance, 2 * len(layers), max_per_matrix=max_per_matrix)
    assert quotas[dead] == 1
    assert sum(quotas.values()) == 8

    model.eval()
    with torch.no_grad():
        before = model(input_ids=random_token_ids).logits
        apply_quotas(model, quotas)
        after = model(input_ids=random_token_ids).logits
    assert {name: layer.top_k for name, layer in layers.items()} == quotas
    assert not torch.allclose(before, after)


class MaskedStack(nn.Module):
    """Two MoRE layers called as a transformers model is: ``attention_mask`` [B, S] by keyword
    or position; the second layer sees only the last ``keep`` positions (as ``logits_to_keep``)."""

    def __init__(self, generator, keep):
        super().__init__()
        self.first = more_layer(generator, 1.0)
        self.last = more_layer(generator, 0.5)
        self.keep = keep

    def forward(self, x, attention_mask=None):
        hidden = torch.tanh(self.first(x))
        return self.last(hidden[:, -self.keep:])


def per_token_values(model, x, estimator, target=None):
    """{layer: per-token estimator values [B * S']} by plain observers (no tracker, no mask)."""
    from smartfed.eeqa import magnitude_importance

    values, handles = {}, []
    for name, layer in more_layers(model).items():
        def observe(module, inputs, y0, delta, name=name):
            if estimator == "gradient":
                delta.register_hook(lambda grad, d=delta.detach(): values.__setitem__(
                    name, gradient_importance(grad, d).double()))
            else:
                measure = cosine_importance if estimator == "cosine" else magnitude_importance
                values[name] = measure(y0, delta).double()
        handles.append(layer.add_observer(observe))
    out = model(x)
    (out * target).sum().backward()
    for handle in handles:
        handle.remove()
    model.zero_grad()
    return values


@pytest.mark.parametrize("estimator", ["cosine", "magnitude", "gradient"])
@pytest.mark.parametrize("positional", [False, True])
def test_tracker_counts_only_the_tokens_of_the_attention_mask(estimator, positional):
    generator = torch.Generator().manual_seed(16)
    model = MaskedStack(generator, keep=3)
    x = torch.randn(3, 7, D, generator=generator)
    target = torch.randn(3, 3, D, generator=generator)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    values = per_token_values(model, x, estimator, target)
    with ImportanceTracker(model, estimator=estimator) as tracker:
        out = model(x, mask) if positional else model(x, attention_mask=mask)
        (out * target).sum().backward()
    stats = tracker.stats()
    keep = {"first": mask.flatten().bool(), "last": mask[:, -3:].flatten().bool()}
    assert stats.counts == {"first": 13, "last": 8}
    for name, kept in keep.items():
        assert stats.sums[name] == pytest.approx(float(values[name][kept].sum()), rel=1e-5)
        assert stats.sums[name] < float(values[name].sum())  # the padded tokens did count before
    # The mask lasts one model call: a layer called on its own afterwards counts every token.
    with tracker, torch.no_grad():
        model.first(x)
    assert tracker.stats().counts["first"] == (13 if estimator == "gradient" else 13 + 21)


def test_tracker_counts_every_token_without_a_mask_and_rejects_a_misaligned_one():
    generator = torch.Generator().manual_seed(17)
    model = MaskedStack(generator, keep=2)
    x = torch.randn(2, 5, D, generator=generator)
    with ImportanceTracker(model) as tracker, torch.no_grad():
        model(x)
        model(x, attention_mask=torch.ones(2, 5, 5))  # a 4-D-style prepared mask is not a token mask
    assert tracker.stats().counts == {"first": 20, "last": 8}
    with ImportanceTracker(model) as tracker, torch.no_grad():
        with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 4\) does not line up with the "
                                             r"tokens \(2, 5\) a MoRE layer sees"):
            model(x, attention_mask=torch.ones(2, 4, dtype=torch.long))
        model.first(x)  # the failed call left no mask behind
    assert tracker.stats().counts["first"] == 10


def test_tracker_skips_left_padding_of_a_tiny_llama(make_tiny_llama, make_lora_adapter):
    from smartfed import LoRAPool, MoREConfig, inject_more
    from smartfed.federated.data import InstructionExamples

    pool = LoRAPool.from_pretrained([make_lora_adapter("qv", target_modules=("q_proj", "v_proj"), seed=3)])
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    generator = torch.Generator().manual_seed(18)
    lengths = [9, 4, 6]
    examples = InstructionExamples.build(
        [torch.randint(3, 100, (n,), generator=generator).tolist() for n in lengths], [2, 2, 3], pad_token_id=0)
    model.train()
    with ImportanceTracker(model) as tracker:
        loss, fed = examples.training_loss(model, torch.arange(3), label_token_ids=(), device="cpu")
        loss.backward()
    assert fed == 3 * 9
    assert set(tracker.stats().counts.values()) == {sum(lengths)}
    # Trimming the padding away (one example at a time) gives the same statistics.
    with ImportanceTracker(model) as alone:
        for row in range(3):
            examples.training_loss(model, torch.tensor([row]), label_token_ids=(), device="cpu")[0].backward()
    assert tracker.importance() == pytest.approx(alone.importance(), rel=1e-4)
