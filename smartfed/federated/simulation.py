"""In-process federated simulation: one ClientTrainer serves every simulated client in turn.

Each round: sample clients (seed, round, attempt) -> encode the instructions (counted as bytes
down) -> train -> encode the result (counted as bytes up) -> decode and check on the server ->
FedAvg of the valid updates -> EEQA quota update -> evaluate the global model -> checkpoint ->
one line in ``metrics.jsonl``. A client that raises, runs past its time limit, or returns
non-finite or wrongly shaped tensors is dropped with its reason; a round with fewer than
``min_clients`` valid updates is retried (``max_retries``) with a fresh sample, then the run stops
with ``RoundFailed`` and the last checkpoint untouched.

Every random stream derives from (seed, round, client), and each client starts from the server's
state with a fresh AdamW, so a resumed run ends bit-identical to an uninterrupted one, given the
same device and torch thread count (CPU reductions split their work by thread count; a resume
with another count warns).

Faults for tests come from ``config.faults`` ({round: {client_id: kind}}; the same fault hits
every attempt of that round): "raise" raises inside the client, "timeout" gives the client a
0-second wall-clock limit so the in-process check fires after its first step, "nan" and "shape"
corrupt the trained tensors before upload.
"""

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
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
from smartfed.federated.config import RESUMABLE_CHANGES, config_fingerprint, config_to_dict
from smartfed.federated.data import federated_data
from smartfed.federated.protocol import decode_instructions, decode_result, encode_instructions, encode_result
from smartfed.federated.server import (
    ServerState,
    client_instructions,
    finish_round,
    sample_clients,
    screen_results,
    server_state_for,
)
from smartfed.federated.task import ClientTimeout, ClientTrainer

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class RoundFailed(RuntimeError):
    """A round had too few valid client updates after all retries; the checkpoint is intact."""


class InjectedFault(RuntimeError):
    """The failure a "raise" fault makes a client throw."""


@dataclass
class SimulationOutcome:
    state: ServerState
    history: list
    output_dir: Path


def _corrupt(state, kind):
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


def _run_client(trainer, payload, examples, *, fault, time_limit_s, wire_dtype):
    """Client side of one round, from the bytes it receives to the bytes it sends."""
    instructions = decode_instructions(payload.data)
    if fault == "raise":
        raise InjectedFault("injected fault: client raised before training")
    limit = 0.0 if fault == "timeout" else time_limit_s
    result = trainer.train(instructions, examples, time_limit_s=limit)
    if fault in ("nan", "shape"):
        result.state = _corrupt(result.state, fault)
    return encode_result(result, wire_dtype)


def _write_jsonl_atomically(path, records):
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(temporary, path)


def _append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _reconcile_metrics(path, history, completed_round):
    """On resume: keep failure records and completed rounds up to the checkpoint, and restore any
    completed round the checkpoint has but the file lacks (a crash between the checkpoint and the
    metrics line, or during the metrics line)."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash; its round, if completed, is in ``history``
            if record.get("status") == "failed" or record["round"] <= completed_round:
                kept.append(record)
    present = {r["round"] for r in kept if r.get("status") == "completed"}
    kept.extend(record for record in history if record["round"] not in present)
    _write_jsonl_atomically(path, kept)


class Simulation:
    """Holds the trainer, data and server state of one run directory."""

    def __init__(self, config, output_dir, *, resume=False, progress=True, trainer=None):
        self.config = config
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.metrics_path = self.output_dir / METRICS_FILE
        self.fingerprint = config_fingerprint(config)
        existing = find_checkpoint(self.output_dir)
        if existing is not None and not resume:
            raise FileExistsError(
                f"output directory {self.output_dir} already holds a checkpoint: pass --resume to continue it "
                "or choose another --output"
            )
        if resume and existing is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.output_dir} to continue from")
        self.trainer = trainer if trainer is not None else ClientTrainer(config, progress=progress)
        self.data = federated_data(config, self.trainer.layout)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            checkpoint = load_checkpoint(self.output_dir)
            if checkpoint.config_fingerprint != self.fingerprint:
                raise ValueError(
                    f"--resume: the checkpoint in {self.output_dir} was made with another configuration "
                    f"(fingerprint {checkpoint.config_fingerprint}, now {self.fingerprint}); "
                    f"only {', '.join(RESUMABLE_CHANGES)} may change across a resume"
                )
            saved_pool = checkpoint.extra.get("pool_fingerprint")
            if saved_pool != self.trainer.pool.fingerprint:
                raise ValueError(
                    f"--resume: the checkpoint in {self.output_dir} was trained on pool {str(saved_pool)[:16]}, "
                    f"not on the pool now loaded ({self.trainer.pool.fingerprint[:16]}); "
                    "its routers index other experts"
                )
            saved_threads = checkpoint.extra.get("torch_threads")
            if saved_threads != torch.get_num_threads():
                warnings.warn(
                    f"--resume: the checkpoint was written with {saved_threads} torch threads, this process "
                    f"uses {torch.get_num_threads()}; CPU reductions split differently, so the routers will "
                    "not be bit-identical to an uninterrupted run (set torch.set_num_threads to match)",
                    stacklevel=2,
                )
            self.state = ServerState.from_checkpoint(checkpoint)
            self.history = checkpoint.history
            restore_rng_states(checkpoint.rng)
            _reconcile_metrics(self.metrics_path, self.history, self.state.round)
        else:
            self.state = server_state_for(
                config, self.trainer.initial_state(), self.trainer.max_per_matrix(),
                uses_quotas=self.trainer.method.uses_quotas,
            )
            self.history = []
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            (self.output_dir / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=1))

    def _attempt(self, round_index, attempt, accounting):
        """One try at a round: (sampled client ids, valid results by id, dropped records with
        ``client``, ``reason``, ``attempt``). The transport hook: this one runs the clients in
        process; the Flower ServerApp overrides it to reach SuperNodes."""
        config, fed = self.config, self.config.federation
        clients = sample_clients(
            fed.num_clients, fraction=fed.fraction, min_clients=fed.min_clients, seed=config.seed,
            round_index=round_index, attempt=attempt,
        )
        faults = config.faults.get(round_index, {})
        wire_dtype = config.communication.wire_dtype
        received, dropped = {}, []
        for client_id in clients:
            down = encode_instructions(client_instructions(self.state, client_id, round_index, config), wire_dtype)
            accounting.add_download(down)
            try:
                up = _run_client(
                    self.trainer, down, self.data.clients[client_id], fault=faults.get(client_id),
                    time_limit_s=fed.client_timeout_s, wire_dtype=wire_dtype,
                )
            except ClientTimeout as error:
                dropped.append({"client": client_id, "reason": str(error)})
                continue
            except Exception as error:  # any client failure is that client's, never the server's
                dropped.append({"client": client_id, "reason": f"raised {type(error).__name__}: {error}"})
                continue
            accounting.add_upload(up)
            try:
                received[client_id] = decode_result(up.data)
            except Exception as error:  # a reply the server cannot read is the client's fault too
                dropped.append({"client": client_id, "reason": f"undecodable reply: {type(error).__name__}: {error}"})
        valid, rejected = screen_results(self.state, received)
        dropped = sorted(dropped + rejected, key=lambda record: record["client"])
        for client_id, result in valid.items():
            metrics = result.metrics
            accounting.add_client(
                client_id, metrics["compute_s"], metrics["active_flops"], metrics["peak_memory_bytes"]
            )
        return clients, valid, [dict(record, attempt=attempt) for record in dropped]

    def run_round(self, round_index):
        """Run round ``round_index`` (with retries), checkpoint it, log it; returns its record."""
        config, fed = self.config, self.config.federation
        started = time.perf_counter()
        accounting = RoundAccounting()
        all_dropped, sampled_per_attempt = [], []
        quotas_used = self.state.quotas
        for attempt in range(fed.max_retries + 1):
            clients, valid, dropped = self._attempt(round_index, attempt, accounting)
            all_dropped.extend(dropped)
            sampled_per_attempt.append(clients)
            if len(valid) >= fed.min_clients:
                break
        else:
            record = {
                "round": round_index, "status": "failed", "attempts": fed.max_retries + 1,
                "sampled": sampled_per_attempt, "clients_dropped": all_dropped,
                "bytes_up": accounting.bytes_up, "bytes_down": accounting.bytes_down,
                "wall_s": time.perf_counter() - started,
            }
            _append_jsonl(self.metrics_path, record)
            raise RoundFailed(
                f"round {round_index}: fewer than min_clients={fed.min_clients} valid updates after "
                f"{fed.max_retries + 1} attempt(s); dropped: {all_dropped}. The checkpoint of round "
                f"{self.state.round} in {self.output_dir} is intact"
            )
        quotas_changed = finish_round(
            self.state, valid, aggregate=self.trainer.method.aggregate, round_index=round_index, eeqa=config.eeqa
        )
        evaluation = self.trainer.evaluate(
            self.state.global_state, self.state.quotas, self.data.evaluation, batch_size=fed.eval_batch_size
        )
        ordered = sorted(valid)
        examples = sum(valid[c].num_examples for c in ordered)
        record = {
            "round": round_index, "status": "completed", "method": config.method,
            "loss": evaluation["loss"], "accuracy": evaluation["accuracy"],
            "train_loss": sum(valid[c].metrics["loss"] * valid[c].num_examples for c in ordered) / examples,
            **accounting.as_dict(),
            "peak_memory_source": valid[ordered[0]].metrics["peak_memory_source"],
            "wall_s": time.perf_counter() - started,
            "quotas": quotas_used, "quotas_changed": quotas_changed,
            "clients_used": ordered, "clients_dropped": all_dropped, "attempts": len(sampled_per_attempt),
            "wire_dtype": config.communication.wire_dtype, "router": config.more.router,
        }
        previous = self.history[-1] if self.history else {"total_bytes_up": 0, "total_bytes_down": 0}
        record["total_bytes_up"] = previous["total_bytes_up"] + record["bytes_up"]
        record["total_bytes_down"] = previous["total_bytes_down"] + record["bytes_down"]
        self.history.append(record)
        save_checkpoint(self.output_dir, Checkpoint(
            round=round_index, global_state=self.state.global_state, quotas=self.state.quotas,
            history=self.history, config_fingerprint=self.fingerprint,
            extra={
                **self.state.to_extra(), "torch_threads": torch.get_num_threads(),
                "pool_fingerprint": self.trainer.pool.fingerprint,
            },
            rng=capture_rng_states(),
        ))
        _append_jsonl(self.metrics_path, record)
        return record

    def run(self, *, stop_after_round=None):
        last = self.config.federation.rounds
        if stop_after_round is not None:
            last = min(last, stop_after_round)
        rounds = range(self.state.round + 1, last + 1)
        with tqdm(rounds, desc=f"{self.config.method} rounds", disable=not self.progress) as bar:
            for round_index in bar:
                record = self.run_round(round_index)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                                up=record["bytes_up"], dropped=len(record["clients_dropped"]))
        return SimulationOutcome(state=self.state, history=self.history, output_dir=self.output_dir)


def run_simulation(config, output_dir, *, resume=False, stop_after_round=None, progress=True, trainer=None):
    """Run (or with ``resume`` continue) the rounds of ``config`` into ``output_dir``."""
    simulation = Simulation(config, output_dir, resume=resume, progress=progress, trainer=trainer)
    return simulation.run(stop_after_round=stop_after_round)
