"""SmartFed's server as a Flower message-API ``Strategy``, composed of pieces as Flower composes
its own (docs/design.md §6):

- ``NodeMap`` (``smartfed.federated.nodes``): which node is which client, from the setup query;
- ``configure_train``: sample clients by (seed, round, attempt) and send each the global state
  of ``arrays`` with its quotas, local training settings and seed, counted as bytes down;
- ``aggregate_train``: every reply counted as bytes up, decoded and screened
  (``smartfed.federated.screening``), weighted by the server's own partition sizes, checked for
  its direction by the aggregator, held to the norm bound and aggregated
  (``smartfed.federated.aggregation``: the filtered mean, the method's FedAvg, a Flower
  strategy's, or central DP's noised mean), then the EEQA quotas updated from robustly combined
  importance; with fewer than ``min_clients`` valid updates, no arrays;
- ``train_secure``: the same attempt under SecAgg+ (``smartfed.federated.secure_round``);
- ``configure_evaluate`` / ``aggregate_evaluate``: every client scores the global state on its
  own partition.

The strategy computes and keeps the run's state; it writes nothing. The round loop is
``smartfed.federated.driver.drive``, and a ``smartfed.federated.run_dir.RunDir`` records what it
produces. Flower's own ``Strategy.start`` is not overridden: a SmartFed run must resume exactly
where its checkpoint ended, so its rounds, initial arrays and evaluation come from the run.
"""

import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from logging import INFO, WARNING

import torch
from flwr.app import Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from smartfed.federated.accounting import RoundAccounting
from smartfed.federated.aggregation import NormBound, RootUpdate, build_aggregation
from smartfed.federated.checkpoint import Checkpoint, capture_rng_states, restore_rng_states
from smartfed.federated.messages import (
    NUM_EXAMPLES,
    content_to_result,
    evaluation_to_content,
    instructions_to_content,
    record_to_state,
    state_to_record,
    wire_size,
)
from smartfed.federated.data import InstructionExamples
from smartfed.federated.evaluation import is_test_round
from smartfed.federated.nodes import NodeMap, last_line
from smartfed.federated.robust import combine_importance
from smartfed.federated.screening import check_scores, check_values, screen_replies
from smartfed.federated.secagg import instructions_to_fitins
from smartfed.federated.secure_round import SecureRound
from smartfed.federated.server import (
    ServerState,
    client_instructions,
    finish_round,
    sample_clients,
    server_state_for,
)

ATTEMPT = "attempt"
# Per-item test results are recorded in each test round's metrics (one character per item) up to
# this many items.
MAX_RECORDED_ITEMS = 20_000


class RoundFailed(RuntimeError):
    """A round had too few valid client updates after all retries; the checkpoint is intact."""


@dataclass
class RoundProgress:
    """What one round has gathered so far, across its attempts."""

    index: int
    quotas: dict
    started: float = field(default_factory=time.perf_counter)
    accounting: RoundAccounting = field(default_factory=RoundAccounting)
    attempt: int = 0
    sampled: list = field(default_factory=list)  # client ids, per attempt
    dropped: list = field(default_factory=list)
    flagged: list = field(default_factory=list)
    norms: dict = field(default_factory=dict)  # update norms and the norm bound of the last attempt
    # The aggregation's record fields of the last attempt (centre cosines, weights, privacy).
    aggregation: dict = field(default_factory=dict)
    valid: dict = field(default_factory=dict)
    train_loss: float = 0.0
    quotas_changed: bool = False


class SmartFedStrategy(Strategy):
    """SmartFed's server for the run ``config``.

    ``trainer`` (a ``ClientTrainer``) gives the method, its initial state and the pool; the
    server evaluates the global state with it on ``evaluation`` (held-out examples) and, when
    given, on ``validation`` (held out of the training examples). ``fingerprint`` identifies the
    configuration as far as a completed round depends on it; ``setup_json`` is the run
    configuration sent to every client at setup; ``timeout`` bounds each wait for replies.
    ``partitions`` (Examples per client id, the server's own split) give each client's weight
    and its most plausible token counts; None where each client holds its own data, which the
    server never sees: each client is then weighted by the example count its node declared at
    setup, capped at ``robustness.max_claimed_examples``, and an example has at most
    ``task.data.max_length`` tokens. ``evaluation`` None: the server holds no held-out examples,
    and the clients score each round's state on their own (``evaluate_global`` returns None).
    ``aggregate(states, weights)`` replaces the configured aggregation (e.g.
    ``flower_aggregator(FedMedian())``). ``root`` (examples held out of the training examples) is
    the server's root set of ``robustness.aggregator: filtered_mean_root``. ``round_progress``
    holds what the round in progress has gathered (None between rounds). A fresh strategy starts
    at round 0; ``restore`` continues from a checkpoint."""

    def __init__(self, config, trainer, evaluation, *, fingerprint, partitions, setup_json="{}", timeout=3600.0,
                 aggregate=None, validation=None, root=None):
        self.config = config
        self.trainer = trainer
        self.evaluation = evaluation
        self.validation = validation
        self.fingerprint = fingerprint
        self.setup_json = setup_json
        self.timeout = timeout
        # Filled at setup where the clients hold their data; the same dict the SecAgg+ round reads.
        self.partition_sizes = {} if partitions is None else {
            client_id: len(examples) for client_id, examples in enumerate(partitions)}
        fed, robustness = config.federation, config.robustness
        widest = config.task.data.max_length if partitions is None else max(
            examples.input_ids.shape[-1] for examples in partitions)
        self.max_importance_count = fed.local_steps * fed.batch_size * widest
        self.combine_importance = partial(
            combine_importance, how=robustness.importance, clip=robustness.importance_clip,
            trim_fraction=robustness.trim_fraction,
        )
        self.nodes = NodeMap()
        self.norm_bound = NormBound(robustness.norm_bound)
        self._aggregate_override = aggregate
        self.secure = SecureRound(
            config.privacy.secagg, partition_sizes=self.partition_sizes, timeout=timeout,
            check_values=self._check_values,
        ) if config.privacy.secagg.enabled else None
        self.state = server_state_for(
            config, trainer.initial_state(), trainer.max_per_matrix(), uses_quotas=trainer.method.uses_quotas
        )
        self.history = []
        self._root_update = None if root is None else RootUpdate(trainer, root, config)
        self.aggregation = build_aggregation(config, trainer.method.aggregate, override=aggregate,
                                             root_update=self._root_update)
        self.round_progress = None
        self.client_scores = None

    def restore(self, checkpoint) -> None:
        """Continue from ``checkpoint`` (already checked against the run by ``RunDir``): its
        state (checked against the model's trainable tensors), history and RNG states."""
        self.state = ServerState.from_checkpoint(checkpoint, reference=self.trainer.initial_state())
        self.history = checkpoint.history
        restore_rng_states(checkpoint.rng)
        self.aggregation = build_aggregation(self.config, self.trainer.method.aggregate,
                                             override=self._aggregate_override, history=self.history,
                                             root_update=self._root_update)

    def checkpoint(self) -> Checkpoint:
        """Everything needed to continue after the last completed round."""
        return Checkpoint(
            round=self.state.round, global_state=self.state.global_state, quotas=self.state.quotas,
            history=self.history, config_fingerprint=self.fingerprint,
            extra={
                **self.state.to_extra(), "torch_threads": torch.get_num_threads(),
                "pool_fingerprint": self.trainer.pool_fingerprint,
            },
            rng=capture_rng_states(),
        )

    @property
    def clients(self):
        return self.nodes.clients

    @clients.setter
    def clients(self, mapping):
        self.nodes.clients = dict(mapping)

    @property
    def contested(self):
        return self.nodes.contested

    def summary(self) -> None:
        fed = self.config.federation
        log(INFO, "\t├──> SmartFed method %r, %d clients, fraction %.2f, min_clients %d, max_retries %d",
            self.config.method, fed.num_clients, fed.fraction, fed.min_clients, fed.max_retries)
        log(INFO, "\t└──> from round %d of %d", self.state.round, fed.rounds)

    def connect(self, grid, *, wait_s, listed=()):
        """Map client ids to the nodes of ``grid`` (``NodeMap.connect``); returns the mapping."""
        fed = self.config.federation
        own_data = self.config.task.clients_hold_their_data
        clients = self.nodes.connect(
            grid, num_clients=fed.num_clients, min_clients=fed.min_clients, setup_json=self.setup_json,
            pool_fingerprint=self.trainer.pool_fingerprint, wait_s=wait_s, reply_timeout_s=self.timeout,
            listed=listed, declared_counts=own_data,
        )
        if own_data:
            cap = self.config.robustness.max_claimed_examples
            self.partition_sizes.clear()
            self.partition_sizes.update({client: min(count, cap) for client, count in self.nodes.declared.items()})
        return clients

    # --- training ---------------------------------------------------------------------------

    def _sample(self, server_round, attempt):
        """The round's progress record and the clients sampled for ``attempt``."""
        if self.round_progress is None or self.round_progress.index != server_round:
            self.round_progress = RoundProgress(index=server_round, quotas=self.state.quotas)
        progress = self.round_progress
        progress.attempt = attempt
        cfg, fed = self.config, self.config.federation
        sampled = sample_clients(
            fed.num_clients, fraction=fed.fraction, min_clients=fed.min_clients, seed=cfg.seed,
            round_index=server_round, attempt=attempt,
        )
        progress.sampled.append(sampled)
        return progress, sampled

    def _instructions(self, global_state, client_id, server_round):
        """What client ``client_id`` is sent in ``server_round``: ``global_state`` with its
        quotas, settings and seed."""
        return replace(client_instructions(self.state, client_id, server_round, self.config), state=global_state)

    def configure_train(self, server_round, arrays, config, grid):
        """Instructions for the clients sampled for attempt ``config["attempt"]`` (default 0) of
        ``server_round``: the global state ``arrays``, each client's quotas and seed."""
        attempt = int(config.get(ATTEMPT, 0))
        progress, sampled = self._sample(server_round, attempt)
        wire_dtype = self.config.communication.wire_dtype
        global_state = record_to_state(arrays)
        messages = []
        for client_id in (c for c in sampled if c in self.clients):
            content = instructions_to_content(self._instructions(global_state, client_id, server_round), wire_dtype)
            progress.accounting.add_download(wire_size(content))
            messages.append(Message(content, self.clients[client_id], MessageType.TRAIN,
                                    group_id=f"{server_round}.{attempt}"))
        return messages

    def _check_values(self, result):
        return check_values(result, quotas=self.state.quotas, estimator=self.config.eeqa.importance,
                            max_count=self.max_importance_count)

    def aggregate_train(self, server_round, replies):
        """Screen the replies to the last ``configure_train``; with enough valid updates,
        aggregate them and update the quotas (the global state moves to round ``server_round``)
        and return the new global arrays with the clients' mean training loss; else (None, None)."""
        progress = self.round_progress
        sampled = progress.sampled[-1]
        node_to_client = self.nodes.client_by_node(sampled)
        by_client = {}
        for reply in replies:
            client_id = node_to_client.get(reply.metadata.src_node_id)
            if client_id is not None:
                by_client[client_id] = reply
        received, dropped = {}, []
        wire_dtype = self.config.communication.wire_dtype
        for client_id in sampled:
            reply = by_client.get(client_id)
            if client_id not in self.clients:
                dropped.append(self.nodes.absent_reason(client_id))
            elif reply is None:
                dropped.append({"client": client_id, "reason": f"no reply within {self.timeout} s"})
            elif reply.has_error():
                log(WARNING, "SmartFed round %d: client %d failed: %s", server_round, client_id, reply.error.reason)
                reason = f"client error {reply.error.code}: {last_line(reply.error.reason)}"
                dropped.append({"client": client_id, "reason": reason})
            else:
                progress.accounting.add_upload(wire_size(reply.content))
                try:
                    received[client_id] = content_to_result(reply.content, wire_dtype)
                except Exception as error:  # a reply the server cannot read is the client's fault
                    reason = f"undecodable reply: {type(error).__name__}: {error}"
                    dropped.append({"client": client_id, "reason": reason})
        robustness = self.config.robustness
        screened = screen_replies(
            self.state, received, partition_sizes=self.partition_sizes, example_counts=robustness.example_counts,
            estimator=self.config.eeqa.importance, max_count=self.max_importance_count,
        )
        checked = self.aggregation.check({c: result.state for c, result in screened.valid.items()}, self.state,
                                         server_round)
        bounded = self.norm_bound(checked.kept, self.state.global_state)
        progress.norms, progress.aggregation = bounded.summary, dict(checked.record)
        valid = {
            c: replace(screened.valid[c], state=bounded.states[c], num_examples=screened.weights[c])
            for c in sorted(bounded.states)
        }
        return self._close_training(server_round, valid, partial(self._aggregate, sorted(valid)),
                                    dropped + screened.dropped + checked.dropped + bounded.dropped,
                                    screened.flags + bounded.flags)

    def _aggregate(self, clients, states, weights):
        """The aggregation of ``states`` and ``weights`` (lists in the order of ``clients``); its
        record fields join the round's."""
        aggregated, record = self.aggregation(dict(zip(clients, states)), dict(zip(clients, weights)),
                                              self.state.global_state)
        self.round_progress.aggregation.update(record)
        return aggregated

    def _close_training(self, server_round, valid, aggregate, dropped, flagged):
        """Record the attempt's ``dropped`` and ``flagged`` clients; with ``min_clients`` results
        in ``valid``, ``aggregate`` them and update the quotas, returning the new global arrays
        and the clients' mean training loss; else (None, None)."""
        progress, fed = self.round_progress, self.config.federation
        progress.dropped.extend(dict(r, attempt=progress.attempt) for r in sorted(dropped, key=lambda r: r["client"]))
        progress.flagged.extend(dict(r, attempt=progress.attempt) for r in sorted(flagged, key=lambda r: r["client"]))
        for client_id, result in valid.items():
            metrics = result.metrics
            progress.accounting.add_client(
                client_id, metrics["compute_s"], metrics["active_flops"], metrics["peak_memory_bytes"]
            )
        if len(valid) < fed.min_clients:
            return None, None
        progress.valid = valid
        progress.quotas_changed = finish_round(
            self.state, valid, aggregate=aggregate, round_index=server_round, eeqa=self.config.eeqa,
            combine=self.combine_importance,
        )
        ordered = sorted(valid)
        examples = sum(valid[c].num_examples for c in ordered)
        progress.train_loss = sum(valid[c].metrics["loss"] * valid[c].num_examples for c in ordered) / examples
        metrics = MetricRecord({"train_loss": progress.train_loss, NUM_EXAMPLES: examples})
        return state_to_record(self.state.global_state, "fp32"), metrics

    def train_secure(self, server_round, arrays, attempt, grid):
        """One attempt at ``server_round`` under SecAgg+ from the global state ``arrays``
        (``SecureRound``); returns what ``aggregate_train`` returns."""
        progress, sampled = self._sample(server_round, attempt)
        present = [c for c in sampled if c in self.clients]
        global_state = record_to_state(arrays)
        fitins = {c: instructions_to_fitins(self._instructions(global_state, c, server_round)) for c in present}
        outcome = self.secure.run(grid, fitins, self.clients, round_index=server_round, reference=global_state,
                                  accounting=progress.accounting)
        if outcome.privacy is not None:
            progress.aggregation = {"privacy": outcome.privacy}
        dropped = [self.nodes.absent_reason(c) for c in sampled if c not in self.clients] + outcome.dropped
        return self._close_training(server_round, outcome.valid, lambda states, weights: outcome.aggregate,
                                    dropped, [])

    # --- evaluation -------------------------------------------------------------------------

    def evaluate_global(self, round_index=None):
        """Loss and accuracy of the global state on the held-out examples, with what the task's
        shape adds (instruction: perplexity and, at the rounds it asks for, generated-answer
        scores) and, with a validation split, ``val_loss`` / ``val_accuracy``; None when the
        server holds no held-out examples. Loss and accuracy are None at a round that
        ``federation.test_every_rounds`` skips (validation is scored every round). A
        classification's test round also records ``test_correct``, each test item's 0/1 result
        in order (what a paired comparison of two rounds needs; smartfed report)."""
        if self.evaluation is None:
            return None
        federation = self.config.federation
        batch_size = federation.eval_batch_size
        if is_test_round(round_index, federation.test_every_rounds, federation.rounds):
            # A classification's per-item results come with the same forward passes; an
            # instruction's would mean generating an answer to every example.
            items = (not isinstance(self.evaluation, InstructionExamples)
                     and len(self.evaluation) <= MAX_RECORDED_ITEMS)
            scores = self.trainer.evaluate(self.state.global_state, self.state.quotas, self.evaluation,
                                           batch_size=batch_size, round_index=round_index, items=items)
            result = {key: value for key, value in scores.items() if key not in ("num_examples", "items")}
            if items:
                result["test_correct"] = "".join(str(int(value)) for value in scores["items"]["correct"])
        else:
            result = {"loss": None, "accuracy": None}
        if self.validation is not None:
            scores = self.trainer.evaluate(self.state.global_state, self.state.quotas, self.validation,
                                           batch_size=batch_size)
            result.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
        return result

    def configure_evaluate(self, server_round, arrays, config, grid):
        """One evaluate message per connected client: the global state ``arrays`` and the quotas."""
        content = evaluation_to_content(record_to_state(arrays), self.state.quotas,
                                        self.config.communication.wire_dtype)
        return [
            Message(content, node_id, MessageType.EVALUATE, group_id=f"{server_round}.evaluate")
            for node_id in self.clients.values()
        ]

    def aggregate_evaluate(self, server_round, replies):
        """The clients' example-weighted mean loss and accuracy; each client's own scores (or
        its error) go to ``client_scores``."""
        node_to_client = self.nodes.client_by_node()
        per_client, errors = {}, {}
        for reply in replies:
            if reply.metadata.src_node_id not in node_to_client:
                continue
            client_id = node_to_client[reply.metadata.src_node_id]
            if reply.has_error():
                errors[str(client_id)] = last_line(reply.error.reason)
                continue
            scores = dict(reply.content.metric_records.get("metrics", {}))
            problem = check_scores(scores)
            if problem is not None:
                errors[str(client_id)] = f"unusable evaluation reply: {problem}"
            else:
                # The server's own count of the client's examples, as in training.
                per_client[str(client_id)] = dict(scores, **{NUM_EXAMPLES: self.partition_sizes[client_id]})
        total = sum(m[NUM_EXAMPLES] for m in per_client.values())
        means = {
            key: sum(m[key] * m[NUM_EXAMPLES] for m in per_client.values()) / total for key in ("loss", "accuracy")
        } if total else {}
        if total and all("perplexity" in m for m in per_client.values()):
            means["perplexity"] = math.exp(min(means["loss"], 700.0))
        self.client_scores = {"clients": per_client, "errors": errors, **means}
        return MetricRecord({**means, NUM_EXAMPLES: total}) if total else None

    # --- what a round leaves behind ---------------------------------------------------------

    def close_round(self, round_index, scores):
        """The record of the completed round ``round_index`` (its ``scores`` from
        ``evaluate_global``), appended to the history; the round's progress is cleared."""
        cfg, progress = self.config, self.round_progress
        valid = progress.valid
        ordered = sorted(valid)
        record = {
            "round": round_index, "status": "completed", "method": cfg.method, **scores,
            "train_loss": progress.train_loss,
            **progress.accounting.as_dict(),
            "peak_memory_source": valid[ordered[0]].metrics["peak_memory_source"],
            "wall_s": time.perf_counter() - progress.started,
            "quotas": progress.quotas, "quotas_changed": progress.quotas_changed,
            "clients_used": ordered, "clients_dropped": progress.dropped, "attempts": len(progress.sampled),
            "clients_flagged": progress.flagged, "aggregator": cfg.robustness.aggregator,
            "norm_bound_mode": cfg.robustness.norm_bound.mode, **progress.norms, **progress.aggregation,
            "wire_dtype": cfg.communication.wire_dtype, "router": cfg.more.router,
        }
        previous = self.history[-1] if self.history else {"total_bytes_up": 0, "total_bytes_down": 0}
        record["total_bytes_up"] = previous["total_bytes_up"] + record["bytes_up"]
        record["total_bytes_down"] = previous["total_bytes_down"] + record["bytes_down"]
        self.history.append(record)
        self.round_progress = None
        return record

    def failed_round(self, round_index):
        """The record of a round that failed after every retry."""
        progress = self.round_progress
        return {
            "round": round_index, "status": "failed", "attempts": len(progress.sampled),
            "sampled": progress.sampled, "clients_dropped": progress.dropped,
            "bytes_up": progress.accounting.bytes_up, "bytes_down": progress.accounting.bytes_down,
            "wall_s": time.perf_counter() - progress.started,
        }

    def final_state_metadata(self):
        # Quotas and the config fingerprint make the file enough to re-evaluate the run
        # (``smartfed evaluate``) once its checkpoint is gone.
        return {"method": self.config.method, "round": str(self.state.round),
                "pool_fingerprint": self.trainer.pool_fingerprint, "config_fingerprint": self.fingerprint,
                "quotas": json.dumps(self.state.quotas)}
