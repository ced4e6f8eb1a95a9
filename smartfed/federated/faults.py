"""Faults and attacks for tests, injected by a grid wrapper over any grid (``faults``:
{round: {client_id: kind}}; the same fault hits every attempt of that round's train messages).

``FaultInjectingGrid`` stands where a faulty or hostile client's messages pass: the server sees
what such a client would send, whatever carries the messages (the in-process grid, Flower's
simulation engine, a SuperLink). It learns which node holds which client from the setup replies
that pass through it. The kinds:

- "raise": the client fails; its reply is the error reply Flower's runtime makes of a ClientApp's
  exception (the message is never delivered);
- "timeout": the client is told a 0-second wall-clock limit (``client.INJECTED`` record), so its
  own check fires after its first step;
- "hang": the client is told to wait 1.25 times ``client_timeout_s`` before training, so that
  the in-process grid cuts it at its timeout and the abandoned step trains while later rounds run;
- "nan" / "shape": the trained tensors are corrupted before upload (a NaN, an extra row);
- "poison": the update (trained minus received state) x1000 and a claim of 10**9 examples;
- "malformed": only the example count in the metrics record, and a string ``loss``;
- an attack of ``smartfed.federated.attacks.ATTACKS`` ("<name>" or "<name>:<param>"): once every
  reply of an attempt is in, the Byzantine clients' trained states are rewritten by
  ``ATTACKS[name](byzantine, honest, reference, param, rng)``, the attacker seeing the honest
  clients' updates (those of the clients without a fault) before the strategy does. All the
  clients of one attack send what it returns for them together.

Under SecAgg+ only the clear-text part of a masked-update reply can be corrupted
(``corrupt_secure_reply``); "raise", "timeout" and "hang" act the same, and an attack is refused
(it would rewrite an update the client has masked).
"""

import numpy as np
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from smartfed.config import FAULT_KINDS
from smartfed.federated import attacks
from smartfed.federated.protocol import INJECTED, INJECTED_DELAY_S, INJECTED_TIME_LIMIT_S, NODE, PARTITION_ID
from smartfed.federated.flower_compat import CLIENT_APP_RAISED_EXCEPTION
from smartfed.federated.grid_wrappers import GridWrapper
from smartfed.federated.messages import INFO, METRICS, NUM_EXAMPLES, STATE, record_to_state, state_to_record
from smartfed.federated.seeding import STREAM_ATTACK, derived_seed

POISON_SCALE = 1000.0
POISON_EXAMPLES = 10**9
HANG_FACTOR = 1.25
# Where a legacy FitRes record (SecAgg+ replies) keeps the example count and the metrics.
SECURE_EXAMPLES, SECURE_EXAMPLES_KEY, SECURE_METRICS = "fitres.num_examples", "num_examples", "fitres.metrics"


class InjectedFault(RuntimeError):
    """The failure a "raise" fault makes a client throw."""


def parse_attack(kind):
    """(attack name, its parameter or None) of an attack fault kind, or None for another kind."""
    name, _, param = str(kind).partition(":")
    if name not in attacks.ATTACKS:
        return None
    return name, (float(param) if param else None)


def corrupt_state(state, kind):
    """The tensors a faulty client would upload: "nan" poisons one value, "shape" adds a row."""
    corrupted = dict(state)
    name = sorted(corrupted)[0]
    tensor = corrupted[name].clone()
    if kind == "nan":
        tensor.view(-1)[0] = float("nan")
    else:
        tensor = torch.cat([tensor, tensor[:1]], dim=0)
    corrupted[name] = tensor
    return corrupted


def poison_content(content: RecordDict, received: RecordDict, wire_dtype):
    """A "poison" fault's reply: the update (trained minus received state) times
    ``POISON_SCALE`` and a claim of ``POISON_EXAMPLES`` examples."""
    state = record_to_state(content.array_records[STATE])
    start = record_to_state(received.array_records[STATE])
    poisoned = {name: start[name] + POISON_SCALE * (tensor - start[name]) for name, tensor in state.items()}
    content[STATE] = state_to_record(poisoned, wire_dtype)
    content.metric_records[METRICS][NUM_EXAMPLES] = POISON_EXAMPLES


def malform_content(content: RecordDict):
    """A "malformed" fault's reply: no metrics but the example count, and a string ``loss``."""
    metrics = content.metric_records[METRICS]
    content[METRICS] = MetricRecord({NUM_EXAMPLES: metrics[NUM_EXAMPLES]})
    info = dict(content.config_records[INFO])
    info["loss"] = "low"
    content[INFO] = ConfigRecord(info)


def corrupt_secure_reply(content: RecordDict, kind):
    """A SecAgg+ masked-update reply with what a "poison" or "malformed" client can still change
    in the clear: its example count (10**9), or its metrics (only a string ``loss``). Its masked
    update is the honest one: the mod masks it before any fault could touch it."""
    if kind == "poison":
        content.metric_records[SECURE_EXAMPLES][SECURE_EXAMPLES_KEY] = POISON_EXAMPLES
    else:
        content[SECURE_METRICS] = ConfigRecord({"loss": "low"})


def error_reply(msg: Message, error: Exception) -> Message:
    """The reply the Flower runtime makes of a ClientApp's exception (same code, same reason format)."""
    reason = f"{type(error)}:<'{error}'>"
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _round_and_attempt(msg):
    # Group ids start with the round: "round.attempt" (SmartFedStrategy), "round" (SecAgg+ stages).
    round_text, _, attempt_text = msg.metadata.group_id.partition(".")
    return int(round_text), int(attempt_text or 0)


def _with_record(msg: Message, name, record) -> Message:
    """A copy of ``msg`` (same destination, type and group) whose content also holds ``record``."""
    content = RecordDict(dict(msg.content.items()))
    content[name] = record
    return Message(content, msg.metadata.dst_node_id, msg.metadata.message_type, group_id=msg.metadata.group_id,
                   ttl=msg.metadata.ttl)


class FaultInjectingGrid(GridWrapper):
    """``inner`` with the client faults of ``faults``; ``client_timeout_s`` sizes a "hang";
    ``wire_dtype`` encodes corrupted tensors; ``seed`` derives each attack's generator."""

    def __init__(self, inner, faults, *, client_timeout_s=None, wire_dtype="fp32", seed=0):
        super().__init__(inner)
        self.faults = {int(r): {int(c): kind for c, kind in kinds.items()} for r, kinds in (faults or {}).items()}
        unknown = sorted({kind for kinds in self.faults.values() for kind in kinds.values()
                          if kind not in FAULT_KINDS and parse_attack(kind) is None})
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}: faults are {list(FAULT_KINDS)} or an attack of "
                             f"smartfed.federated.attacks {sorted(attacks.ATTACKS)}")
        if client_timeout_s is None and any("hang" in kinds.values() for kinds in self.faults.values()):
            raise ValueError("a 'hang' fault needs federation.client_timeout_s, else the run would hang with it")
        self.client_timeout_s = client_timeout_s
        self.wire_dtype = wire_dtype
        self.seed = seed
        self.partitions = {}  # node id -> partition id, from the setup replies

    def _fault(self, msg):
        if msg.metadata.message_type != MessageType.TRAIN:
            return None
        partition = self.partitions.get(msg.metadata.dst_node_id)
        return self.faults.get(_round_and_attempt(msg)[0], {}).get(partition)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        faults = {msg.metadata.dst_node_id: self._fault(msg) for msg in messages}
        failed, sent = [], []
        for msg in messages:
            fault = faults[msg.metadata.dst_node_id]
            if fault == "raise":
                failed.append(error_reply(msg, InjectedFault("injected fault: client raised before training")))
            elif fault == "timeout":
                sent.append(_with_record(msg, INJECTED, ConfigRecord({INJECTED_TIME_LIMIT_S: 0.0})))
            elif fault == "hang":
                sent.append(_with_record(msg, INJECTED, ConfigRecord(
                    {INJECTED_DELAY_S: HANG_FACTOR * self.client_timeout_s})))
            else:
                sent.append(msg)
        replies = list(self.inner.send_and_receive(sent, timeout=timeout)) if sent else []
        by_node = {msg.metadata.dst_node_id: msg for msg in messages}
        for reply in replies:
            if by_node.get(reply.metadata.src_node_id) is not None and not reply.has_error():
                self._learn_partition(reply)
                self._corrupt(reply, by_node[reply.metadata.src_node_id], faults[reply.metadata.src_node_id])
        self._attack(messages, replies, faults)
        return replies + failed

    def _learn_partition(self, reply):
        node_record = reply.content.metric_records.get(NODE)
        if node_record is not None and PARTITION_ID in node_record:
            self.partitions[reply.metadata.src_node_id] = node_record[PARTITION_ID]

    def _corrupt(self, reply, msg, fault):
        content = reply.content
        if fault in (None, "raise", "timeout", "hang"):
            return
        masked = STATE not in content.array_records and SECURE_METRICS in content.config_records
        if parse_attack(fault) is not None:
            if masked:  # the config refuses this; a wrapper built by hand must not pass it silently
                raise ValueError(f"the attack {fault!r} cannot rewrite a SecAgg+ masked update: the client masks "
                                 "it before it leaves")
            return
        if STATE not in content.array_records:
            if fault in ("poison", "malformed") and masked:
                corrupt_secure_reply(content, fault)
            return
        if fault in ("nan", "shape"):
            content[STATE] = state_to_record(corrupt_state(record_to_state(content.array_records[STATE]), fault),
                                             self.wire_dtype)
        elif fault == "poison":
            poison_content(content, msg.content, self.wire_dtype)
        elif fault == "malformed":
            malform_content(content)

    def _attack(self, messages, replies, faults):
        """Rewrite the Byzantine clients' trained states of one attempt (plain train replies) from
        the honest ones: those of the clients without a fault."""
        usable = {r.metadata.src_node_id: r for r in replies if not r.has_error()
                  and STATE in r.content.array_records and r.metadata.src_node_id in self.partitions}
        attackers = {node: parse_attack(faults.get(node)) for node in usable if faults.get(node) is not None}
        attackers = {node: attack for node, attack in attackers.items() if attack is not None}
        if not attackers:
            return

        def states(nodes):
            return {self.partitions[node]: record_to_state(usable[node].content.array_records[STATE]) for node in nodes}

        honest = states(node for node in usable if faults.get(node) is None)
        first = next(msg for msg in messages if msg.metadata.dst_node_id in attackers)
        reference = record_to_state(first.content.array_records[STATE])
        round_index, attempt = _round_and_attempt(first)
        rng = np.random.default_rng(derived_seed(self.seed, STREAM_ATTACK, round_index, attempt))
        node_of = {self.partitions[node]: node for node in attackers}
        for name, param in sorted(set(attackers.values()), key=str):
            group = states(node for node, attack in attackers.items() if attack == (name, param))
            forged = attacks.ATTACKS[name](group, honest, reference, param, rng)
            for client_id, state in forged.items():
                usable[node_of[client_id]].content[STATE] = state_to_record(state, self.wire_dtype)
