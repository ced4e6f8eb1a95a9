"""Server logic of the federated protocol (docs/design.md §6), free of any transport.

One round: ``sample_clients`` -> ``client_instructions`` per client -> (clients train) ->
``screen_results`` on the decoded replies -> at least ``min_clients`` valid ones? ->
``finish_round`` (aggregate, EEQA quota update) -> evaluate -> checkpoint. ``ServerState`` holds
everything that must survive a restart; every random choice draws from a generator derived from
(seed, round, attempt), so there is no RNG state to carry.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from smartfed.eeqa import ImportanceStats, allocate_quotas, client_quotas, ema_importance, uniform_quotas
from smartfed.federated.checkpoint import CheckpointError
from smartfed.federated.seeding import STREAM_CLIENT, STREAM_SAMPLING, derived_seed
from smartfed.federated.protocol import ClientInstructions

# Flower's records carry ints of 64 bits: a larger claim cannot have crossed a real wire.
WIRE_INT_LIMIT = 2**63


@dataclass
class ServerState:
    """Global trainable state and quota bookkeeping; ``round`` counts completed rounds."""

    seed: int
    global_state: dict
    quotas: Optional[dict]
    max_per_matrix: dict
    total_budget: Optional[int]
    round: int = 0
    importance_ema: Optional[dict] = None
    quota_history: list = field(default_factory=list)

    def to_extra(self):
        """The JSON part of a checkpoint (tensors travel separately)."""
        return {
            "seed": self.seed, "max_per_matrix": self.max_per_matrix, "total_budget": self.total_budget,
            "importance_ema": self.importance_ema, "quota_history": self.quota_history,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint, *, reference):
        """The state a ``Checkpoint`` recorded, checked against ``reference`` (the model's
        trainable tensors: names, shapes, float32) and for the types of its bookkeeping; a
        CheckpointError names what does not fit."""
        problem = _state_problem(checkpoint, reference)
        if problem is not None:
            raise CheckpointError(f"the checkpoint of round {checkpoint.round} does not fit this run: {problem}")
        extra = checkpoint.extra
        return cls(
            seed=extra["seed"], global_state=dict(checkpoint.global_state), quotas=checkpoint.quotas,
            max_per_matrix=extra["max_per_matrix"], total_budget=extra["total_budget"],
            round=checkpoint.round, importance_ema=extra["importance_ema"],
            quota_history=extra["quota_history"],
        )


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shown(value) -> str:
    """The repr of ``value`` for a message, at most 40 characters, without converting a huge int
    to text (Python refuses ints of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an int of {value.bit_length()} bits>"
    return f"{value!r:.40}"


def _state_problem(checkpoint, reference) -> Optional[str]:
    """Why a checkpoint's state cannot continue the run whose trainable tensors are ``reference``."""
    state = checkpoint.global_state
    if sorted(state) != sorted(reference):
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, tensor in reference.items():
        if state[name].dtype != torch.float32 or tuple(state[name].shape) != tuple(tensor.shape):
            return (f"{name} is {state[name].dtype} {tuple(state[name].shape)}, the model's is torch.float32 "
                    f"{tuple(tensor.shape)}")
    extra = checkpoint.extra
    missing = sorted({"seed", "max_per_matrix", "total_budget", "importance_ema", "quota_history"} - set(extra))
    if missing:
        return f"'extra' lacks {missing}"
    if not _is_count(extra["seed"]):
        return f"'extra.seed' must be an int >= 0, got {extra['seed']!r:.40}"
    limits = extra["max_per_matrix"]
    if not (isinstance(limits, dict) and all(_is_count(n) for n in limits.values())):
        return "'extra.max_per_matrix' must map modules to ints >= 0"
    if extra["total_budget"] is not None and not _is_count(extra["total_budget"]):
        return f"'extra.total_budget' must be null or an int >= 0, got {extra['total_budget']!r:.40}"
    ema = extra["importance_ema"]
    if ema is not None and not (isinstance(ema, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in ema.values())):
        return "'extra.importance_ema' must be null or map modules to finite numbers"
    history = extra["quota_history"]
    if not (isinstance(history, list) and all(isinstance(e, list) and len(e) == 2 and _is_count(e[0])
                                              and isinstance(e[1], dict) for e in history)):
        return "'extra.quota_history' must be a list of [round, quotas]"
    quotas = checkpoint.quotas
    if quotas is not None and (set(quotas) != set(limits) or any(k > limits[m] for m, k in quotas.items())):
        return "'quotas' must give each module of 'extra.max_per_matrix' at most its number of experts"
    return None


def server_state_for(config, initial_state, max_per_matrix, *, uses_quotas):
    """Round-0 state of a run: quotas only for a method with quotas and EEQA enabled."""
    eeqa = config.eeqa
    with_quotas = uses_quotas and eeqa.enabled
    return initial_server_state(
        initial_state, seed=config.seed, max_per_matrix=max_per_matrix if with_quotas else None,
        top_k=config.more.top_k, total_budget=eeqa.total_budget, k_min=eeqa.k_min,
    )


def initial_server_state(global_state, *, seed, max_per_matrix=None, top_k=None, total_budget=None,
                         k_min=1):
    """State before round 1. With ``max_per_matrix`` (module -> N, MoRE methods) the quotas start
    uniform at ``total_budget`` (default ``top_k`` times the number of matrices)."""
    if not global_state:
        raise ValueError("global_state must hold at least one tensor")
    quotas = None
    if max_per_matrix:
        if total_budget is None:
            if top_k is None:
                raise ValueError("initial_server_state needs top_k or total_budget when max_per_matrix is given")
            total_budget = sum(min(top_k, n) for n in max_per_matrix.values())
        quotas = uniform_quotas(max_per_matrix, total_budget, k_min=k_min, max_per_matrix=max_per_matrix)
    state = ServerState(
        seed=seed, global_state={k: v.detach().clone().float() for k, v in global_state.items()},
        quotas=quotas, max_per_matrix=dict(max_per_matrix or {}), total_budget=total_budget,
    )
    if quotas is not None:
        state.quota_history.append([1, quotas])
    return state


def sample_clients(num_clients, *, fraction, min_clients, seed, round_index, attempt=0):
    """``max(min_clients, ceil(fraction * num_clients))`` distinct client ids, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if not 1 <= min_clients <= num_clients:
        raise ValueError(f"min_clients must lie in [1, num_clients={num_clients}], got {min_clients!r}")
    count = min(num_clients, max(min_clients, math.ceil(fraction * num_clients - 1e-9)))
    rng = np.random.default_rng(derived_seed(seed, STREAM_SAMPLING, round_index, attempt))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def client_round_quotas(state: ServerState, client_id, *, client_budgets, k_min=1, tau=1.0):
    """Quotas sent to ``client_id``: the global ones, or for a client with a budget fraction < 1
    the same allocation rule applied to its share of the budget."""
    if state.quotas is None:
        return None
    fraction = client_budgets.get(int(client_id), 1.0)
    if fraction >= 1.0:
        return dict(state.quotas)
    importance = state.importance_ema or {name: 1.0 for name in state.quotas}
    return client_quotas(
        importance, state.total_budget, fraction, k_min=k_min, tau=tau, max_per_matrix=state.max_per_matrix
    )


def client_instructions(state: ServerState, client_id, round_index, config):
    """What the server sends ``client_id`` in round ``round_index``: the global state, its quotas,
    the local training settings of ``config.federation`` and its seed (seed, round, client)."""
    fed, eeqa = config.federation, config.eeqa
    return ClientInstructions(
        round=round_index, state=state.global_state,
        quotas=client_round_quotas(
            state, client_id, client_budgets=eeqa.client_budgets, k_min=eeqa.k_min, tau=eeqa.tau
        ),
        local_steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr, weight_decay=fed.weight_decay,
        fedprox_mu=fed.fedprox_mu, seed=derived_seed(state.seed, STREAM_CLIENT, round_index, client_id),
    )


def check_update(update, reference) -> Optional[str]:
    """Why a client's tensors cannot be aggregated (missing/extra names, shape, non-finite), or None."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong tensor names: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, tensor in update.items():
        if tuple(tensor.shape) != tuple(reference[name].shape):
            return f"wrong shape for {name}: got {tuple(tensor.shape)}, expected {tuple(reference[name].shape)}"
        if not torch.isfinite(tensor).all():
            return f"non-finite values in {name}"
    return None


def fedavg(states, weights):
    """Weighted mean ``sum_i w_i s_i / sum_i w_i`` per tensor, accumulated in float64, float32 out."""
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg needs one weight per state, got {len(states)} states and {len(weights)} weights")
    weights = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights}")
    total = math.fsum(weights)
    names = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != names and set(state) != set(names):
            raise ValueError(f"state {index} names different tensors than state 0")
    averaged = {}
    for name in names:
        accumulator = torch.zeros(states[0][name].shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            accumulator += state[name].to(torch.float64) * weight
        averaged[name] = (accumulator / total).to(torch.float32)
    return averaged


def screen_results(state: ServerState, results):
    """Split decoded client results ({client_id: ClientResult}) into the aggregatable ones and
    the dropped ones ([{"client", "reason"}]): wrong names, shapes, non-finite values, no examples."""
    valid, dropped = {}, []
    for client_id in sorted(results):
        result = results[client_id]
        reason = check_update(result.state, state.global_state)
        if reason is None and not (_is_count(result.num_examples) and 0 < result.num_examples < WIRE_INT_LIMIT):
            reason = f"num_examples must be an int in [1, 2**63), got {shown(result.num_examples)}"
        if reason is None:
            valid[client_id] = result
        else:
            dropped.append({"client": client_id, "reason": reason})
    return valid, dropped


def finish_round(state: ServerState, valid, *, aggregate, round_index, eeqa, combine=None):
    """Close round ``round_index`` with the screened results ``valid``: ``aggregate`` (the
    method's, FedAvg by examples) into the global state, fold importance (``combine``d, see
    ``update_quotas``) into the EMA and update quotas every ``eeqa.every_rounds`` rounds.
    Returns whether the quotas changed."""
    ordered = sorted(valid)
    if not ordered:
        raise ValueError(f"round {round_index}: finish_round needs at least one valid client result")
    state.global_state = aggregate([valid[c].state for c in ordered], [valid[c].num_examples for c in ordered])
    stats = [ImportanceStats.from_dict(valid[c].importance) for c in ordered if valid[c].importance]
    changed = update_quotas(
        state, stats, round_index=round_index, every_rounds=eeqa.every_rounds, ema=eeqa.ema,
        k_min=eeqa.k_min, tau=eeqa.tau, combine=combine,
    )
    state.round = round_index
    return changed


def update_quotas(state: ServerState, stats_list, *, round_index, every_rounds, ema, k_min=1, tau=1.0,
                  combine=None):
    """Fold this round's client importance statistics, ``combine``d into one value per module
    (default: pooled sums over pooled counts), into the EMA; every ``every_rounds`` rounds
    reallocate the quotas (in force from the next round). Returns True when quotas changed."""
    if state.quotas is None or not stats_list:
        return False
    current = ImportanceStats.merge(stats_list).mean() if combine is None else combine(stats_list)
    state.importance_ema = ema_importance(state.importance_ema, current, decay=ema)
    if round_index % every_rounds != 0:
        return False
    quotas = allocate_quotas(
        state.importance_ema, state.total_budget, k_min=k_min, tau=tau, max_per_matrix=state.max_per_matrix
    )
    changed = quotas != state.quotas
    state.quotas = quotas
    if changed:
        state.quota_history.append([round_index + 1, quotas])
    return changed
