"""SmartFed's server as a Flower strategy, and the one round loop that drives it.

``SmartFedStrategy`` is a ``flwr.serverapp.strategy.Strategy``:

- ``configure_train``: sample clients by (seed, round, attempt), one instruction message per
  client (global state, that client's quotas, the local training settings, its seed), each
  counted as bytes down.
- ``aggregate_train``: every reply counted as bytes up, decoded and screened
  (``smartfed.federated.screening``); a missing, failed, unreadable or unusable one (wrong names
  or shapes, non-finite values, missing or ill-typed metrics, bad importance statistics) is
  dropped with its reason. Each client weighs the examples of the partition the server assigned
  it; each update is held to the norm bound (``smartfed.federated.robust``). With at least
  ``min_clients`` valid updates: aggregate them (``robustness.aggregator``: the method's FedAvg
  by examples or a Flower strategy's, ``robust.flower_aggregator``; with ``privacy.dp`` the clipped,
  noised mean of ``smartfed.federated.privacy``), then update the EEQA quotas from robustly
  combined importance; else no arrays, and the loop retries the round.
- ``configure_evaluate`` / ``aggregate_evaluate``: every client scores the global state on its
  own partition (means weighted by the server's partition sizes; an unusable reply is an error).
- ``start(grid)``: THE round loop, whatever the transport: connect the clients (a setup query
  maps client ids to nodes and checks every pool), then per round train (retried with a fresh
  sample up to ``max_retries`` times while fewer than ``min_clients`` updates are valid, then
  ``RoundFailed`` with the last checkpoint untouched), evaluate the global state centrally,
  checkpoint, one line in ``metrics.jsonl``; after the last round ``final_state.safetensors``
  and, if asked, the clients' own evaluation.

The in-process engine hands ``start`` a ``smartfed.federated.grid.InProcessGrid``; the Flower
ServerApp hands it Flower's grid (simulation engine or SuperLink). Every random stream derives
from (seed, round, client) and each client starts from the server's state with a fresh AdamW, so
a resumed run ends bit-identical to an uninterrupted one, given the same device and torch thread
count (CPU reductions split their work by thread count; a resume with another count warns).
"""

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Result, Strategy
import safetensors.torch
from tqdm.auto import tqdm

from smartfed.federated.accounting import RoundAccounting
from smartfed.federated.checkpoint import (
    Checkpoint,
    capture_rng_states,
    find_checkpoint,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from smartfed.federated.client import (
    NODE,
    PARTITION_ID,
    POOL,
    POOL_FINGERPRINT,
    NUM_PARTITIONS,
    setup_content,
)
from smartfed.federated.messages import (
    NUM_EXAMPLES,
    content_to_result,
    evaluation_to_content,
    instructions_to_content,
    state_to_record,
    wire_size,
)
from smartfed.federated.privacy import CentralDP
from smartfed.federated.run_dir import (
    CLIENT_EVALUATION_FILE,
    FINAL_STATE_FILE,
    METRICS_FILE,
    append_jsonl,
    fsync_write,
    rebuild_metrics,
)
from smartfed.federated.robust import bound_updates, build_aggregator, combine_importance
from smartfed.federated.screening import check_scores, check_values, screen_replies
from smartfed.federated.secagg import fitres_to_result, instructions_to_fitins, secure_mean
from smartfed.federated.server import (
    ServerState,
    client_instructions,
    finish_round,
    sample_clients,
    server_state_for,
)

ATTEMPT = "attempt"


class RoundFailed(RuntimeError):
    """A round had too few valid client updates after all retries; the checkpoint is intact."""


def last_line(reason):
    """The last non-empty line of a Flower error reason (a whole traceback, ending on the
    exception's message); the full text goes to the log."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


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
    privacy: dict = None
    valid: dict = field(default_factory=dict)
    train_loss: float = 0.0
    quotas_changed: bool = False


class SmartFedStrategy(Strategy):
    """SmartFed's server for the run ``config`` in ``output_dir``.

    ``trainer`` (a ``ClientTrainer``) gives the method, its initial state and the pool; the
    server evaluates the global state with it on ``evaluation`` (held-out examples) and, when
    given, on ``validation`` (held out of the training examples), logged as ``val_loss`` /
    ``val_accuracy``.
    ``fingerprint`` identifies the configuration as far as a completed round depends on it
    (checked on ``resume``); ``setup_json`` is the run configuration sent to every client at
    setup; ``timeout`` bounds each wait for replies. ``partitions`` (Examples per client id,
    the server's own split) give each client's weight and its most plausible token counts.
    ``aggregate(states, weights)`` replaces the configured aggregation (e.g.
    ``flower_aggregator(FedMedian())``). ``round_progress`` holds
    what the round in progress has gathered (samples, drops, accounting; None between rounds).
    A fresh run refuses a directory with a checkpoint; a resumed one restores the state, the RNG
    and ``metrics.jsonl`` of the last checkpoint.
    """

    def __init__(self, config, trainer, evaluation, output_dir, *, fingerprint, partitions, setup_json="{}",
                 resume=False, timeout=3600.0, aggregate=None, client_evaluation=False, progress=False,
                 validation=None):
        self.config = config
        self.trainer = trainer
        self.evaluation = evaluation
        self.validation = validation
        self.output_dir = Path(output_dir)
        self.fingerprint = fingerprint
        self.setup_json = setup_json
        self.aggregate = aggregate if aggregate is not None else build_aggregator(
            config.robustness, trainer.method.aggregate
        )
        self.partition_sizes = {client_id: len(examples) for client_id, examples in enumerate(partitions)}
        fed = config.federation
        widest = max(examples.input_ids.shape[-1] for examples in partitions)
        self.max_importance_count = fed.local_steps * fed.batch_size * widest
        robustness = config.robustness
        self.combine_importance = partial(
            combine_importance, how=robustness.importance, clip=robustness.importance_clip,
            trim_fraction=robustness.trim_fraction,
        )
        self.client_evaluation = client_evaluation
        self.progress = progress
        self.metrics_path = self.output_dir / METRICS_FILE
        self.clients = {}  # client id -> node id, set by ``start``
        self.contested = {}  # client id -> the refused nodes that all claimed it, set by ``start``
        self.client_scores = None
        self.timeout = timeout
        self.round_progress = None
        self.history = []
        if resume:
            # One verified read of the checkpoint, for the check and the state alike.
            try:
                checkpoint = load_checkpoint(self.output_dir)
            except FileNotFoundError:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.output_dir} to continue from") from None
            self._resume(checkpoint)
        else:
            if find_checkpoint(self.output_dir) is not None:
                raise FileExistsError(
                    f"output directory {self.output_dir} already holds a checkpoint: pass --resume to continue it "
                    "or choose another --output"
                )
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.state = server_state_for(
                config, trainer.initial_state(), trainer.max_per_matrix(), uses_quotas=trainer.method.uses_quotas
            )
            if self.metrics_path.exists():
                self.metrics_path.unlink()
        self.dp = None
        if config.privacy.dp.enabled:
            released = [r["privacy"]["releases"] for r in self.history if r.get("privacy")]
            self.dp = CentralDP(config.privacy.dp, releases=max(released, default=0))

    def _resume(self, checkpoint):
        if checkpoint.config_fingerprint != self.fingerprint:
            raise ValueError(
                f"--resume: the checkpoint in {self.output_dir} was made with another configuration "
                f"(fingerprint {checkpoint.config_fingerprint}, now {self.fingerprint})"
            )
        saved_pool = checkpoint.extra.get("pool_fingerprint")
        if saved_pool != self.trainer.pool_fingerprint:
            raise ValueError(
                f"--resume: the checkpoint in {self.output_dir} was trained on pool {str(saved_pool)[:16]}, "
                f"not on the pool now loaded ({self.trainer.pool_fingerprint[:16]}); its routers index other experts"
            )
        saved_threads = checkpoint.extra.get("torch_threads")
        if saved_threads != torch.get_num_threads():
            warnings.warn(
                f"--resume: the checkpoint was written with {saved_threads} torch threads, this process "
                f"uses {torch.get_num_threads()}; CPU reductions split differently, so the routers will "
                "not be bit-identical to an uninterrupted run (set torch.set_num_threads to match)",
                stacklevel=3,
            )
        self.state = ServerState.from_checkpoint(checkpoint)
        self.history = checkpoint.history
        restore_rng_states(checkpoint.rng)
        rebuild_metrics(self.metrics_path, self.history, self.state.round)

    def summary(self) -> None:
        fed = self.config.federation
        log(INFO, "\t├──> SmartFed method %r, %d clients, fraction %.2f, min_clients %d, max_retries %d",
            self.config.method, fed.num_clients, fed.fraction, fed.min_clients, fed.max_retries)
        log(INFO, "\t└──> from round %d of %d, output %s", self.state.round, fed.rounds, self.output_dir)

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

    def configure_train(self, server_round, arrays, config, grid):
        """Instructions for the clients sampled for attempt ``config["attempt"]`` (default 0) of
        ``server_round``. The strategy's own state is the global state ``arrays`` stands for;
        per-client quotas and seeds come with it."""
        attempt = int(config.get(ATTEMPT, 0))
        progress, sampled = self._sample(server_round, attempt)
        cfg = self.config
        messages = []
        for client_id in (c for c in sampled if c in self.clients):
            content = instructions_to_content(
                client_instructions(self.state, client_id, server_round, cfg), cfg.communication.wire_dtype
            )
            progress.accounting.add_download(wire_size(content))
            messages.append(Message(content, self.clients[client_id], MessageType.TRAIN,
                                    group_id=f"{server_round}.{attempt}"))
        return messages

    def aggregate_train(self, server_round, replies):
        """Screen the replies to the last ``configure_train``; with enough valid updates,
        aggregate them and update the quotas (the global state moves to round ``server_round``)
        and return the new global arrays with the clients' mean training loss; else (None, None)."""
        progress = self.round_progress
        sampled = progress.sampled[-1]
        node_to_client = {self.clients[c]: c for c in sampled if c in self.clients}
        by_client = {}
        for reply in replies:
            client_id = node_to_client.get(reply.metadata.src_node_id)
            if client_id is not None:
                by_client[client_id] = reply
        received, dropped = {}, []
        for client_id in sampled:
            reply = by_client.get(client_id)
            if client_id in self.contested:
                dropped.append(self._contested(client_id))
            elif reply is None:
                dropped.append({"client": client_id, "reason": f"no reply within {self.timeout} s"})
            elif reply.has_error():
                log(WARNING, "SmartFed round %d: client %d failed: %s", server_round, client_id, reply.error.reason)
                reason = f"client error {reply.error.code}: {last_line(reply.error.reason)}"
                dropped.append({"client": client_id, "reason": reason})
            else:
                progress.accounting.add_upload(wire_size(reply.content))
                try:
                    received[client_id] = content_to_result(reply.content)
                except Exception as error:  # a reply the server cannot read is the client's fault
                    reason = f"undecodable reply: {type(error).__name__}: {error}"
                    dropped.append({"client": client_id, "reason": reason})
        robustness = self.config.robustness
        screened = screen_replies(
            self.state, received, partition_sizes=self.partition_sizes, example_counts=robustness.example_counts,
            estimator=self.config.eeqa.importance, max_count=self.max_importance_count,
        )
        bound = robustness.norm_bound
        states, progress.norms, clipped, rejected = bound_updates(
            {c: result.state for c, result in screened.valid.items()}, self.state.global_state,
            mode=bound.mode, multiple=bound.multiple, max_norm=bound.max_norm,
        )
        valid = {
            c: replace(screened.valid[c], state=states[c], num_examples=screened.weights[c]) for c in sorted(states)
        }
        aggregate = self.aggregate if self.dp is None else self._private_aggregate
        return self._close_training(server_round, valid, aggregate, dropped + screened.dropped + rejected,
                                    screened.flags + clipped)

    def _contested(self, client_id):
        return {"client": client_id, "reason": f"no node: nodes {self.contested[client_id]} all claimed this "
                "partition and were refused at setup"}

    def _private_aggregate(self, states, weights):
        """Central DP's noised mean (equal weights: ``weights`` are ignored), its parameters
        kept for the round's record."""
        noised, self.round_progress.privacy = self.dp.aggregate(states, self.state.global_state)
        return noised

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

    def secure_train(self, server_round, attempt, grid):
        """One attempt at ``server_round`` under SecAgg+ (``smartfed.federated.secagg``): the
        server gets the example-weighted mean update of the clients that stayed in the protocol,
        and each one's metrics, importance and example count in the clear. A client failing
        screening is inside the sum and cannot be taken out of it: the protocol runs again
        without it (and the clients train again, to the same result). Returns what
        ``aggregate_train`` returns."""
        progress, sampled = self._sample(server_round, attempt)
        present = [c for c in sampled if c in self.clients]
        fitins = {
            c: instructions_to_fitins(client_instructions(self.state, c, server_round, self.config)) for c in present
        }
        dropped = [self._contested(c) for c in sampled if c in self.contested]
        while True:
            mean, replies = secure_mean(
                grid, {self.clients[c]: f for c, f in fitins.items()}, round_index=server_round,
                settings=self.config.privacy.secagg, max_weight=max(self.partition_sizes.values()),
                timeout=self.timeout, accounting=progress.accounting, names=sorted(self.state.global_state),
            )
            results = {c: fitres_to_result(replies[self.clients[c]]) for c in fitins if self.clients[c] in replies}
            if mean is None:
                dropped += [{"client": c, "reason": "SecAgg+ halted: too few clients stayed in the protocol"}
                            for c in sorted(fitins)]
                return self._close_training(server_round, {}, None, dropped, [])
            bad = {c: reason for c, result in results.items() if (reason := self._secure_problem(c, result))}
            if not bad:
                break
            dropped += [{"client": c, "reason": f"{reason} (SecAgg+ run again without it)"} for c, reason in bad.items()]
            fitins = {c: f for c, f in fitins.items() if c not in bad}
        dropped += [{"client": c, "reason": "left the SecAgg+ protocol before the sum was unmasked"}
                    for c in sorted(fitins) if c not in results]
        aggregate_state = {name: tensor + mean[name] for name, tensor in self.state.global_state.items()}
        valid = {
            c: replace(result, state=aggregate_state, num_examples=self.partition_sizes[c])
            for c, result in sorted(results.items())
        }
        secagg = self.config.privacy.secagg
        progress.privacy = {
            "mechanism": "SecAgg+ (Flower SecAggPlusWorkflow + secaggplus_mod)", "clients": len(valid),
            "clipping_range": secagg.clipping_range, "quantization_range": secagg.quantization_range,
        }
        return self._close_training(server_round, valid, lambda states, weights: aggregate_state, dropped, [])

    def _secure_problem(self, client_id, result):
        """Why a SecAgg+ client's clear-text reply (all but its update) is unusable, or None; its
        count must be its partition's, the weight its update already carries inside the sum."""
        known = self.partition_sizes[client_id]
        if result.num_examples != known:
            return f"claimed {result.num_examples!r} examples, its partition holds {known}"
        return check_values(result, quotas=self.state.quotas, estimator=self.config.eeqa.importance,
                            max_count=self.max_importance_count)

    # --- client-side evaluation -------------------------------------------------------------

    def configure_evaluate(self, server_round, arrays, config, grid):
        """One evaluate message per connected client: the global state and quotas."""
        content = evaluation_to_content(self.state.global_state, self.state.quotas, self.config.communication.wire_dtype)
        return [
            Message(content, node_id, MessageType.EVALUATE, group_id=f"{server_round}.evaluate")
            for node_id in self.clients.values()
        ]

    def aggregate_evaluate(self, server_round, replies):
        """The clients' example-weighted mean loss and accuracy; each client's own scores (or
        its error) go to ``client_scores``."""
        node_to_client = {node_id: client_id for client_id, node_id in self.clients.items()}
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
        self.client_scores = {"clients": per_client, "errors": errors, **means}
        return MetricRecord({**means, NUM_EXAMPLES: total}) if total else None

    # --- the round loop ---------------------------------------------------------------------

    def connect(self, grid, *, wait_s):
        """Wait for ``federation.num_clients`` nodes, send each the setup query and map client
        ids (partition ids) to node ids. A node is refused when its setup reply is unusable or
        names another pool than the server's; the nodes of a partition claimed more than once
        are all refused (``contested``), and the run goes on without that client. A partition
        no node claims, or fewer than ``min_clients`` mapped clients, stops the run here."""
        num_clients = self.config.federation.num_clients
        deadline = time.monotonic() + wait_s
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(node_ids)} SuperNode(s) connected after {wait_s} s, federation.num_clients needs {num_clients}"
                )
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        replies = list(grid.send_and_receive(
            [Message(setup_content(self.setup_json), node_id, MessageType.QUERY) for node_id in node_ids],
            timeout=wait_s,
        ))
        claims, problems = {}, []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "SmartFed setup: node %d failed: %s", node_id, reply.error.reason)
                problems.append(f"node {node_id}: {last_line(reply.error.reason)}")
                continue
            try:
                partition_id = reply.content.metric_records[NODE][PARTITION_ID]
                fingerprint = reply.content.config_records[POOL][POOL_FINGERPRINT]
            except KeyError as error:
                problems.append(f"node {node_id}: setup reply without {error}")
                continue
            if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_clients:
                problems.append(f"node {node_id}: partition-id {partition_id!r} outside [0, {num_clients})")
            elif fingerprint != self.trainer.pool_fingerprint:
                problems.append(
                    f"node {node_id}: pool fingerprint {str(fingerprint)[:16]} differs from the server's "
                    f"{self.trainer.pool_fingerprint[:16]}"
                )
            else:
                claims.setdefault(partition_id, []).append(node_id)
        # Nodes claiming one partition cannot be told apart (node authentication can): all are
        # refused, and that client is dropped from every round it is sampled in.
        clients, self.contested, contests = {}, {}, []
        for partition_id, nodes in sorted(claims.items()):
            if len(nodes) == 1:
                clients[partition_id] = nodes[0]
            else:
                nodes = sorted(nodes)
                self.contested[partition_id] = nodes
                contests.append(f"nodes {', '.join(map(str, nodes[:-1]))} and {nodes[-1]} both hold "
                                f"partition-id {partition_id}")
        problems = contests + problems
        missing = sorted(set(range(num_clients)) - set(claims))
        if missing or len(clients) < self.config.federation.min_clients:
            raise RuntimeError(
                f"cannot map federation.num_clients={num_clients} clients onto nodes {node_ids}: "
                f"{'; '.join(problems) or 'no problem reported'}; partitions without a node: {missing} "
                f"({len(replies)} of {len(node_ids)} nodes replied; each needs --node-config "
                f"'{PARTITION_ID}=I {NUM_PARTITIONS}={num_clients}')"
            )
        for problem in problems:
            log(WARNING, "SmartFed setup: refused %s", problem)
        self.clients = clients
        return clients

    def start(self, grid, *, node_wait_s=120.0, stop_after_round=None) -> Result:
        """Run the remaining rounds of ``federation.rounds`` (or up to ``stop_after_round``) on the
        clients behind ``grid``, after waiting up to ``node_wait_s`` for them to connect. The
        initial arrays, the number of rounds, the timeout and the evaluation come from the run,
        not from arguments as in Flower's ``Strategy.start``: a run must resume exactly where its
        checkpoint ended."""
        self.connect(grid, wait_s=node_wait_s)
        if not self.progress:
            self.summary()
            log(INFO, "SmartFed: clients on nodes %s", self.clients)
        last = self.config.federation.rounds
        if stop_after_round is not None:
            last = min(last, stop_after_round)
        result = Result(arrays=state_to_record(self.state.global_state, "fp32"))
        rounds = range(self.state.round + 1, last + 1)
        with tqdm(rounds, desc=f"{self.config.method} rounds", disable=not self.progress) as bar:
            for round_index in bar:
                arrays, train_metrics = self._train_round(grid, round_index, result.arrays)
                result.arrays = arrays
                result.train_metrics_clientapp[round_index] = train_metrics
                record = self._close_round(round_index)
                result.evaluate_metrics_serverapp[round_index] = MetricRecord(
                    {"loss": record["loss"], "accuracy": record["accuracy"]}
                )
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                                up=record["bytes_up"], dropped=len(record["clients_dropped"]))
                if not self.progress:
                    log(INFO, "SmartFed round %d/%d: loss %.4f accuracy %.4f bytes up %d down %d dropped %d",
                        round_index, self.config.federation.rounds, record["loss"], record["accuracy"],
                        record["bytes_up"], record["bytes_down"], len(record["clients_dropped"]))
        if self.state.round == self.config.federation.rounds:
            self._finish(grid, result)
        return result

    def _train_round(self, grid, round_index, arrays):
        """Attempts at ``round_index`` until one has ``min_clients`` valid updates."""
        fed = self.config.federation
        for attempt in range(fed.max_retries + 1):
            if self.config.privacy.secagg.enabled:
                new_arrays, train_metrics = self.secure_train(round_index, attempt, grid)
            else:
                messages = self.configure_train(round_index, arrays, ConfigRecord({ATTEMPT: attempt}), grid)
                replies = grid.send_and_receive(messages, timeout=self.timeout)
                new_arrays, train_metrics = self.aggregate_train(round_index, replies)
            if new_arrays is not None:
                return new_arrays, train_metrics
        progress = self.round_progress
        record = {
            "round": round_index, "status": "failed", "attempts": fed.max_retries + 1,
            "sampled": progress.sampled, "clients_dropped": progress.dropped,
            "bytes_up": progress.accounting.bytes_up, "bytes_down": progress.accounting.bytes_down,
            "wall_s": time.perf_counter() - progress.started,
        }
        append_jsonl(self.metrics_path, record)
        raise RoundFailed(
            f"round {round_index}: fewer than min_clients={fed.min_clients} valid updates after "
            f"{fed.max_retries + 1} attempt(s); dropped: {progress.dropped}. The checkpoint of round "
            f"{self.state.round} in {self.output_dir} is intact"
        )

    def _close_round(self, round_index):
        """Evaluate the new global state, checkpoint it and log the round; returns its record."""
        cfg, progress = self.config, self.round_progress
        evaluation = self.trainer.evaluate(
            self.state.global_state, self.state.quotas, self.evaluation, batch_size=cfg.federation.eval_batch_size,
            round_index=round_index,
        )
        # What the task's shape adds to loss and accuracy (instruction: perplexity, generated-answer scores).
        shape_scores = {k: v for k, v in evaluation.items() if k not in ("loss", "accuracy", "num_examples")}
        validation = {}
        if self.validation is not None:
            scores = self.trainer.evaluate(
                self.state.global_state, self.state.quotas, self.validation, batch_size=cfg.federation.eval_batch_size
            )
            validation = {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]}
        valid = progress.valid
        ordered = sorted(valid)
        record = {
            "round": round_index, "status": "completed", "method": cfg.method,
            "loss": evaluation["loss"], "accuracy": evaluation["accuracy"], **shape_scores, **validation,
            "train_loss": progress.train_loss,
            **progress.accounting.as_dict(),
            "peak_memory_source": valid[ordered[0]].metrics["peak_memory_source"],
            "wall_s": time.perf_counter() - progress.started,
            "quotas": progress.quotas, "quotas_changed": progress.quotas_changed,
            "clients_used": ordered, "clients_dropped": progress.dropped, "attempts": len(progress.sampled),
            "clients_flagged": progress.flagged, "aggregator": cfg.robustness.aggregator,
            "norm_bound_mode": cfg.robustness.norm_bound.mode, **progress.norms,
            "wire_dtype": cfg.communication.wire_dtype, "router": cfg.more.router,
        }
        if progress.privacy is not None:
            record["privacy"] = progress.privacy
        previous = self.history[-1] if self.history else {"total_bytes_up": 0, "total_bytes_down": 0}
        record["total_bytes_up"] = previous["total_bytes_up"] + record["bytes_up"]
        record["total_bytes_down"] = previous["total_bytes_down"] + record["bytes_down"]
        self.history.append(record)
        save_checkpoint(self.output_dir, Checkpoint(
            round=round_index, global_state=self.state.global_state, quotas=self.state.quotas,
            history=self.history, config_fingerprint=self.fingerprint,
            extra={
                **self.state.to_extra(), "torch_threads": torch.get_num_threads(),
                "pool_fingerprint": self.trainer.pool_fingerprint,
            },
            rng=capture_rng_states(),
        ))
        append_jsonl(self.metrics_path, record)
        self.round_progress = None
        return record

    def _finish(self, grid, result):
        """After the last round: the final state and, with ``client_evaluation``, the clients'
        scores of it on their own partitions."""
        fsync_write(self.output_dir / FINAL_STATE_FILE, safetensors.torch.save(
            {name: tensor.contiguous() for name, tensor in self.state.global_state.items()},
            # Quotas and the config fingerprint make the file enough to re-evaluate the run
            # (``smartfed evaluate``) once its checkpoint is gone.
            metadata={"method": self.config.method, "round": str(self.state.round),
                      "pool_fingerprint": self.trainer.pool_fingerprint, "config_fingerprint": self.fingerprint,
                      "quotas": json.dumps(self.state.quotas)},
        ))
        if not self.client_evaluation:
            return
        round_index = self.state.round
        messages = self.configure_evaluate(round_index, result.arrays, ConfigRecord(), grid)
        metrics = self.aggregate_evaluate(round_index, grid.send_and_receive(messages, timeout=self.timeout))
        if metrics is not None:
            result.evaluate_metrics_clientapp[round_index] = metrics
        fsync_write(self.output_dir / CLIENT_EVALUATION_FILE, json.dumps(self.client_scores, indent=1))
        log(INFO, "SmartFed client evaluation: %s", {k: v for k, v in self.client_scores.items() if k != "clients"})
