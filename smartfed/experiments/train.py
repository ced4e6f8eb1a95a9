"""``smartfed train --config FILE --output DIR [--resume]``: run a federated experiment in-process.

Writes ``DIR/metrics.jsonl`` (one JSON object per round) and ``DIR/checkpoint/`` after every
round; ``--resume`` continues from that checkpoint and ends bit-identical to an uninterrupted run.
Exit status: 0 done, 2 bad configuration or run directory, 3 a round failed (too few clients
after retries; the checkpoint of the last completed round is intact).
"""

import sys


def configure_parser(parser):
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/tiny.yaml)")
    parser.add_argument("--output", required=True, help="run directory for metrics.jsonl and checkpoint/")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint/")
    parser.add_argument("--stop-after-round", type=int, default=None, metavar="R",
                        help="stop after round R (resume later with --resume)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); a resume must use the same number")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from smartfed.federated.config import load_config
    from smartfed.federated.simulation import RoundFailed, Simulation
    from smartfed.federated.task import ClientTrainer

    import torch

    if args.threads is not None:
        if args.threads < 1:
            print(f"smartfed train: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    try:
        config = load_config(args.config)
        trainer = ClientTrainer(config, device=args.device, progress=progress)
        simulation = Simulation(config, args.output, resume=args.resume, progress=progress, trainer=trainer)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"smartfed train: {error}", file=sys.stderr)
        return 2
    try:
        outcome = simulation.run(stop_after_round=args.stop_after_round)
    except RoundFailed as error:
        print(f"smartfed train: {error}", file=sys.stderr)
        return 3
    last = outcome.history[-1] if outcome.history else None
    if last is not None:
        print(
            f"{config.method}: round {last['round']}/{config.federation.rounds} loss {last['loss']:.4f} "
            f"accuracy {last['accuracy']:.4f} bytes up {last['total_bytes_up']} down {last['total_bytes_down']} "
            f"-> {args.output}"
        )
    return 0
