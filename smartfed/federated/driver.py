"""THE round loop of a SmartFed run, whatever carries its messages: ``drive(strategy, grid,
run_dir)``.

Connect the clients (the strategy's ``NodeMap``: a setup query maps client ids to nodes and
checks every pool), then per round: train (retried with a fresh sample up to ``max_retries``
times while fewer than ``min_clients`` updates are valid, then ``RoundFailed`` with the last
checkpoint untouched), evaluate the global state centrally (or, where the server holds no
held-out examples, on every client's own and average their scores), checkpoint, one line in
``metrics.jsonl``; after the last round the final state and, if asked, the clients' own
evaluation. The strategy computes; the ``RunDir`` writes.

The in-process engine hands ``drive`` a ``smartfed.federated.grid.InProcessGrid``; the Flower
ServerApp hands it Flower's grid (simulation engine or SuperLink); either may be wrapped
(``smartfed.federated.faults``, ``smartfed.federated.grid_wrappers``). Every random stream
derives from (seed, round, client) and each client starts from the server's state with a fresh
AdamW, so a resumed run ends bit-identical to an uninterrupted one, given the same device and
torch thread count (a resume with another count warns).
"""

from logging import INFO

from flwr.app import ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Result
from tqdm.auto import tqdm

from smartfed.federated.messages import state_to_record
from smartfed.federated.run_dir import CLIENT_EVALUATION_FILE
from smartfed.federated.strategy import ATTEMPT, RoundFailed


def drive(strategy, grid, run_dir, *, node_wait_s=120.0, stop_after_round=None, progress=False, listed=(),
          client_evaluation=False) -> Result:
    """Run the remaining rounds of ``federation.rounds`` (or up to ``stop_after_round``) of
    ``strategy`` on the clients behind ``grid``, recorded in ``run_dir``, after waiting up to
    ``node_wait_s`` for them to connect (``listed``: the only node ids that may take part);
    ``progress`` shows a bar instead of log lines; ``client_evaluation``: after the last round,
    every client scores the final state on its own partition."""
    strategy.connect(grid, wait_s=node_wait_s, listed=listed)
    config = strategy.config
    if not progress:
        strategy.summary()
        log(INFO, "SmartFed: clients on nodes %s, output %s", strategy.clients, run_dir.folder)
    last = config.federation.rounds
    if stop_after_round is not None:
        last = min(last, stop_after_round)
    result = Result(arrays=state_to_record(strategy.state.global_state, "fp32"))
    rounds = range(strategy.state.round + 1, last + 1)
    with tqdm(rounds, desc=f"{config.method} rounds", disable=not progress) as bar:
        for round_index in bar:
            arrays, train_metrics = _train_round(strategy, grid, run_dir, round_index, result.arrays)
            result.arrays = arrays
            result.train_metrics_clientapp[round_index] = train_metrics
            scores = strategy.evaluate_global(round_index)
            if scores is None:  # the server holds no held-out data: the clients' own scores are the round's
                scores = _clients_evaluate(strategy, grid, round_index, arrays, result)
            record = strategy.close_round(round_index, scores)
            run_dir.save_checkpoint(strategy.checkpoint())
            run_dir.append_metrics(record)
            if record["loss"] is not None:
                result.evaluate_metrics_serverapp[round_index] = MetricRecord(
                    {"loss": record["loss"], "accuracy": record["accuracy"]}
                )
            bar.set_postfix(loss=_shown(record["loss"]), acc=_shown(record["accuracy"]),
                            up=record["bytes_up"], dropped=len(record["clients_dropped"]))
            if not progress:
                log(INFO, "SmartFed round %d/%d: loss %s accuracy %s bytes up %d down %d dropped %d",
                    round_index, config.federation.rounds, _shown(record["loss"]), _shown(record["accuracy"]),
                    record["bytes_up"], record["bytes_down"], len(record["clients_dropped"]))
    if strategy.state.round == config.federation.rounds:
        _finish(strategy, grid, run_dir, result, client_evaluation=client_evaluation)
    return result


def _train_round(strategy, grid, run_dir, round_index, arrays):
    """Attempts at ``round_index`` from the global state ``arrays`` until one has ``min_clients``
    valid updates; after the last, the failure is recorded and ``RoundFailed`` raised."""
    fed = strategy.config.federation
    for attempt in range(fed.max_retries + 1):
        if strategy.secure is not None:
            new_arrays, train_metrics = strategy.train_secure(round_index, arrays, attempt, grid)
        else:
            messages = strategy.configure_train(round_index, arrays, ConfigRecord({ATTEMPT: attempt}), grid)
            replies = grid.send_and_receive(messages, timeout=strategy.timeout)
            new_arrays, train_metrics = strategy.aggregate_train(round_index, replies)
        if new_arrays is not None:
            return new_arrays, train_metrics
    record = strategy.failed_round(round_index)
    run_dir.append_metrics(record)
    raise RoundFailed(
        f"round {round_index}: fewer than min_clients={fed.min_clients} valid updates after "
        f"{fed.max_retries + 1} attempt(s); dropped: {record['clients_dropped']}. The checkpoint of round "
        f"{strategy.state.round} in {run_dir.folder} is intact"
    )


def _shown(value):
    return "-" if value is None else f"{value:.4f}"


def _clients_evaluate(strategy, grid, round_index, arrays, result):
    """Every client's scores of the global state ``arrays`` on its own examples, and their
    example-weighted means (``loss`` and ``accuracy`` None when no client could score it)."""
    messages = strategy.configure_evaluate(round_index, arrays, ConfigRecord(), grid)
    metrics = strategy.aggregate_evaluate(round_index, grid.send_and_receive(messages, timeout=strategy.timeout))
    if metrics is not None:
        result.evaluate_metrics_clientapp[round_index] = metrics
    scores = strategy.client_scores
    return {"loss": scores.get("loss"), "accuracy": scores.get("accuracy"),
            **({"perplexity": scores["perplexity"]} if "perplexity" in scores else {}), "scored_by": "clients",
            "client_scores": scores["clients"], "client_evaluation_errors": scores["errors"]}


def _finish(strategy, grid, run_dir, result, *, client_evaluation):
    """After the last round: the final state and, with ``client_evaluation``, the clients'
    scores of it on their own partitions."""
    run_dir.write_final_state(strategy.state.global_state, strategy.final_state_metadata())
    if not client_evaluation:
        return
    _clients_evaluate(strategy, grid, strategy.state.round, result.arrays, result)
    run_dir.write_json(CLIENT_EVALUATION_FILE, strategy.client_scores)
    log(INFO, "SmartFed client evaluation: %s",
        {key: value for key, value in strategy.client_scores.items() if key != "clients"})
