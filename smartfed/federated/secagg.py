"""Secure aggregation of the router updates with Flower's SecAgg+ (``privacy.secagg``): the
server learns the example-weighted mean of the clients' updates and nothing about any one of them.

Flower 1.42 ships the protocol as ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod``
(client). The workflow drives a legacy ``flwr.server.strategy`` through a ``LegacyContext``;
``secure_mean`` hands it a stand-in (``_OneRound``) whose ``configure_fit`` returns this attempt's
instructions and whose ``aggregate_fit`` keeps what the protocol unmasked, so the message-API
``SmartFedStrategy`` keeps its own round loop, sampling, checkpoints and metrics.

On the wire the protocol speaks the legacy ``FitIns`` / ``FitRes`` records: the global state
travels as ``FitIns.parameters`` (tensors in sorted name order), the instructions and quotas as
its config; a client answers with its UPDATE (trained minus global state, so ``clipping_range``
bounds every value of an update) and its metrics and importance statistics in the clear. The mod
multiplies the update by ``num_examples / max_weight`` before masking; the server sets
``max_weight`` to its largest partition.

What the server can check: each client's metrics, importance statistics and example count (the
count must be the partition the server assigned, since the weight is already inside the sum).
What it cannot: one client's update, so no norm bound, no robust aggregator, and a bad reply
spoils the whole sum: the attempt is dropped and the round retried with a fresh sample.
"""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.workflow import SecAggPlusWorkflow

from smartfed.federated.flower_compat import (
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
    RECORD_KEY_CONFIGS,
    LegacyContext,
    WorkflowKey,
    fitres_to_recorddict,
    recorddict_to_fitins,
)

from smartfed.federated.messages import WireSize, result_parts, result_values
from smartfed.federated.protocol import ClientInstructions, ClientResult

QUOTA = "quota."
FITINS_CONFIG = "fitins.config"  # where a legacy FitIns record keeps its config


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a stage of the SecAgg+ protocol (the mod's business)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def instructions_to_fitins(instructions: ClientInstructions) -> FitIns:
    settings = instructions.settings()
    quotas = settings.pop("quotas") or {}
    settings.update({QUOTA + name: int(k) for name, k in quotas.items()})
    names = sorted(instructions.state)
    arrays = [instructions.state[name].detach().float().numpy() for name in names]
    return FitIns(parameters=ndarrays_to_parameters(arrays), config=settings)


def fitins_to_instructions(fitins: FitIns, names) -> ClientInstructions:
    """The instructions a ``FitIns`` carries; ``names``: the trainable tensors, sorted."""
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ValueError(f"FitIns carries {len(arrays)} tensors, the model trains {len(names)}")
    settings = dict(fitins.config)
    quotas = {key[len(QUOTA):]: int(settings.pop(key)) for key in list(settings) if key.startswith(QUOTA)}
    state = {name: torch.from_numpy(array.copy()).float() for name, array in zip(names, arrays)}
    return ClientInstructions(state=state, quotas=quotas or None, **settings)


def secure_train(msg: Message, context: Context, *, names, train) -> Message:
    """A client's reply to one SecAgg+ stage, the protocol's state kept in ``context``.
    ``train(instructions)`` -> ``ClientResult`` runs when the protocol asks for the masked
    update; ``names``: the trainable tensors, sorted.

    The mod rounds the update stochastically with numpy's global generator; it draws here from
    the client's seed (seed, round, client), so that a run is reproducible and a resumed one
    bit-identical. The rounding hides nothing (the masks do, from the operating system's
    entropy); the caller's generator state is restored afterwards."""

    def update_reply(message, _context):
        instructions = fitins_to_instructions(recorddict_to_fitins(message.content, keep_input=True), names)
        result = train(instructions)
        update = [(result.state[name] - instructions.state[name]).numpy() for name in names]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(result.num_examples),
                        result_values(result))
        return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=message)

    instructions = msg.content.config_records.get(FITINS_CONFIG, {})
    if "seed" not in instructions:
        return secaggplus_mod(msg, context, update_reply)
    saved = np.random.get_state()
    np.random.seed(int(instructions["seed"]) % 2**32)
    try:
        return secaggplus_mod(msg, context, update_reply)
    finally:
        np.random.set_state(saved)


def fitres_to_result(fitres: FitRes) -> ClientResult:
    """What the server may read of a client's SecAgg+ reply: all but its update (``state`` None)."""
    importance, metrics = result_parts(dict(fitres.metrics))
    return ClientResult(state=None, num_examples=fitres.num_examples, importance=importance, metrics=metrics)


class _OneAttempt:
    """The legacy strategy ``SecAggPlusWorkflow`` drives: it returns this attempt's
    instructions and keeps what the protocol unmasked."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.results = None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.pairs

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return (results[0][1].parameters if results else None), {}


class _Available:
    """The workflow asks its client manager only how many clients are available."""

    def __init__(self, count):
        self.count = count

    def num_available(self):
        return self.count


class _Proxy:
    def __init__(self, node_id):
        self.node_id = node_id


def _value_bytes(value):
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return 1 if isinstance(value, bool) else 8


def protocol_size(content: RecordDict) -> WireSize:
    """Size of a protocol message as ``wire_size`` counts it, less Flower's ``count_bytes`` of
    the config records, which cannot size their lists (ciphertexts, masked vectors: counted as
    metadata, the tensors being the array records)."""
    meta = sum(record.count_bytes() for record in content.metric_records.values())
    for record in content.config_records.values():
        meta += sum(len(key.encode()) + _value_bytes(value) for key, value in record.items())
    return WireSize(sum(record.count_bytes() for record in content.array_records.values()), meta)


class _Counting:
    """``grid`` counting every message of the protocol as bytes down and every reply as bytes up."""

    def __init__(self, grid, accounting):
        self.grid = grid
        self.accounting = accounting

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            self.accounting.add_download(protocol_size(message.content))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self.accounting.add_upload(protocol_size(reply.content))
        return replies


def secure_mean(grid, fitins_by_node, *, round_index, settings, max_weight, timeout, accounting, names):
    """Run SecAgg+ once over the nodes of ``fitins_by_node`` ({node_id: FitIns}) with
    ``settings`` (``privacy.secagg``). Returns (the example-weighted mean update {name: tensor},
    {node_id: FitRes} of the clients inside it), or (None, {}) when the protocol halted."""
    attempt = _OneAttempt([(_Proxy(node_id), fitins) for node_id, fitins in fitins_by_node.items()])
    state = RecordDict({
        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index}),
        MAIN_PARAMS_RECORD: ArrayRecord(),
    })
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=attempt, client_manager=_Available(len(fitins_by_node)))
    workflow = SecAggPlusWorkflow(
        num_shares=float(settings.share_fraction), reconstruction_threshold=float(settings.threshold_fraction),
        max_weight=float(max_weight), clipping_range=float(settings.clipping_range),
        quantization_range=settings.quantization_range, timeout=timeout,
    )
    workflow(_Counting(grid, accounting), context)
    if not attempt.results:
        return None, {}
    mean = parameters_to_ndarrays(attempt.results[0][1].parameters)
    replies = {proxy.node_id: fitres for proxy, fitres in attempt.results}
    return {name: torch.from_numpy(array.copy()).float() for name, array in zip(names, mean)}, replies
