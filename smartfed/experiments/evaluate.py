"""``smartfed evaluate``: score a finished run's final state on its task config, or on a variant.

The model is rebuilt from the run's ``config.json`` (base model, pool, method, router form) and
loaded with the run's final state: ``final_state.safetensors`` (its metadata carries the EEQA
quotas), or, for a folder that kept only its checkpoint, the checkpoint of the last round. The
evaluation examples come from the same config with ``--set`` changes, which may touch only
what does not shape the trained state (``EVALUATION_CHANGES``). Before anything is scored, the
state's method, config fingerprint and pool fingerprint must be those of the rebuilt model:
routers index the pool's experts, so on another pool they would pick meaningless ones. A pool
moved elsewhere (the committed ``pools/public_v1`` of the v1 results) is named with ``--set
pool.paths=[...]``: the config fingerprint is checked against the run's recorded paths and the
pool by its content fingerprint, so only the very same adapters pass.

Besides the aggregate scores, every held-out example's result is kept
(smartfed.experiments.item_scores): ``evaluation_items.json`` beside ``evaluation.json``, what
the intervals and paired tests of ``smartfed report`` read.
"""

import hashlib
import json
import time
from pathlib import Path

from smartfed.federated.run_dir import EVALUATION_FILE, EVALUATION_ITEMS_FILE

# What may differ from the run's config: the data it is scored on and how, never what the state
# was trained on (pool.cache_dir only moves the cached tiny pool, which its fingerprint checks).
EVALUATION_CHANGES = ("task", "federation.eval_batch_size", "pool.cache_dir", "pool.paths", "label")


def configure_parser(parser):
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (config.json and its final state)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change one evaluation setting of the run's config, e.g. --set task.options.split_seed=3 "
                             f"or --set task.eval_examples=256; only keys under {', '.join(EVALUATION_CHANGES)} "
                             "(not task.validation_fraction); repeatable")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="which held-out examples to score (default: test)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help=f"the JSON record (default: RUN_DIR/{EVALUATION_FILE})")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _evaluation_key(key):
    return any(key == allowed or key.startswith(allowed + ".") for allowed in EVALUATION_CHANGES)


def read_run_config(run_dir, overrides, *, split="test"):
    """(the config the model is rebuilt from: the run's, with the pool cache of ``overrides``; the
    config to evaluate with; the run's ``config.json`` mapping); a ConfigError for a missing run
    folder, a ``--set`` outside ``EVALUATION_CHANGES`` or a ``split`` the run does not have.
    Reads only ``config.json``: every mistake here is reported before torch is imported."""
    from smartfed.config import (
        ConfigError, apply_overrides, blame_override, config_from_dict, config_to_dict, override_key, with_overrides,
    )
    from smartfed.federated.run_dir import CONFIG_FILE

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder", key="RUN_DIR")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder ({CONFIG_FILE} is missing)", key="RUN_DIR")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"not valid JSON ({error})", source=path) from None
    for assignment in overrides:
        key = override_key(assignment)
        if not _evaluation_key(key):
            raise ConfigError(f"the final state was trained with this setting; evaluate may change only "
                              f"{', '.join(EVALUATION_CHANGES)}", key=key, source=f"--set {assignment}")
    task = apply_overrides(saved, overrides).get("task") if isinstance(saved, dict) else None
    task = task if isinstance(task, dict) else {}
    # Before the config is validated: validating model.tiny imports transformers.
    if split == "validation" and task.get("validation_fraction", 0) == 0:
        raise ConfigError(f"task {task.get('name', 'synthetic')!r} has no validation split to score (the run's "
                          "task.validation_fraction is 0)", key="--split")
    _check_task_recorded(saved, path)
    run_config = config_from_dict(saved, source=path)
    config = config_from_dict(config_to_dict(run_config), overrides)
    # Which training examples were held out is part of what the state was trained on.
    if config.task.validation_fraction != run_config.task.validation_fraction:
        # Only a --set of task or task.validation_fraction can change it: blame_override names that one.
        raise blame_override(ConfigError(f"the final state was trained with {run_config.task.validation_fraction!r} (it "
                                  "chose the training examples held out); evaluate cannot change it",
                                  key="task.validation_fraction"), overrides)
    # The tiny pool's cache key covers the task section, so the model never takes the new task.
    return with_overrides(run_config, pool={"cache_dir": config.pool.cache_dir, "paths": config.pool.paths}), \
        config, saved


def _check_task_recorded(saved, config_path):
    """A ConfigError for a run whose ``config.json`` names no task while its ``text_task.json``
    names a text task: the first sweeps wrote config.json without ``task.name`` (the sweep entry
    named it), and read as it stands such a run would be scored on the synthetic task. Its
    fingerprint covers the config.json as written, so the task cannot be filled in afterwards."""
    from smartfed.config import ConfigError
    from smartfed.federated.run_dir import TEXT_TASK_FILE

    task = saved.get("task") if isinstance(saved, dict) else None
    if isinstance(task, dict) and "name" not in task and config_path.with_name(TEXT_TASK_FILE).is_file():
        raise ConfigError(f"names no task.name (written before runs recorded it) while {TEXT_TASK_FILE} beside it "
                          f"describes a text task; evaluate cannot rebuild that task from this config.json",
                          source=config_path)


def _final_round_checkpoint(run_dir, config):
    """(tensors file, Checkpoint) of ``run_dir`` when it holds the run's last round; else a
    ConfigError."""
    from smartfed.config import ConfigError
    from smartfed.federated.checkpoint import TENSORS_FILE
    from smartfed.federated.run_dir import RunDir

    found = RunDir(run_dir).read_checkpoint()
    if found is None:
        raise ConfigError(f"{run_dir} holds no final state (neither final_state.safetensors nor a checkpoint)",
                          key="RUN_DIR")
    directory, checkpoint = found
    if checkpoint.round != config.federation.rounds:
        raise ConfigError(f"{run_dir} holds no final state: it stopped at round {checkpoint.round} of "
                          f"{config.federation.rounds} (continue it with smartfed train --resume)", key="RUN_DIR")
    return directory / TENSORS_FILE, checkpoint


def read_final_state(run_dir, config):
    """The run's final state as a dict: ``file``, ``sha256``, ``round``, ``state`` (name ->
    tensor), ``quotas``, ``method``, ``pool_fingerprint``, ``config_fingerprint``."""
    import safetensors
    import safetensors.torch

    from smartfed.config import ConfigError
    from smartfed.federated.run_dir import FINAL_STATE_FILE

    run_dir = Path(run_dir)
    path = run_dir / FINAL_STATE_FILE
    if not path.is_file():
        tensors_file, checkpoint = _final_round_checkpoint(run_dir, config)
        return {
            "file": str(tensors_file), "sha256": hashlib.sha256(tensors_file.read_bytes()).hexdigest(),
            "round": checkpoint.round, "state": checkpoint.global_state, "quotas": checkpoint.quotas,
            "method": config.method, "pool_fingerprint": checkpoint.extra.get("pool_fingerprint"),
            "config_fingerprint": checkpoint.config_fingerprint,
        }
    data = path.read_bytes()
    try:
        state = safetensors.torch.load(data)
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except safetensors.SafetensorError as error:
        raise ConfigError(f"not a readable safetensors file ({error})", source=path) from None
    record = {
        "file": str(path), "sha256": hashlib.sha256(data).hexdigest(), "round": int(metadata.get("round", -1)),
        "state": state, "method": metadata.get("method"), "pool_fingerprint": metadata.get("pool_fingerprint"),
    }
    if "quotas" in metadata:
        record.update(quotas=json.loads(metadata["quotas"]), config_fingerprint=metadata.get("config_fingerprint"))
    else:
        # Written before the final state recorded its quotas: the last checkpoint has them.
        _, checkpoint = _final_round_checkpoint(run_dir, config)
        record.update(quotas=checkpoint.quotas, config_fingerprint=checkpoint.config_fingerprint)
    return record


def check_config(final, model_config, saved=None):
    """A ConfigError unless ``final`` was trained with the method and configuration of the run's
    config.json (``saved``, its mapping, lets a fingerprint recorded before the schema version
    verify; smartfed.config.fingerprint)."""
    from smartfed.config import ConfigError, config_fingerprint, fingerprint_matches

    if final["method"] != model_config.method:
        raise ConfigError(f"holds a {final['method']!r} state, but the run's config.json says method "
                          f"{model_config.method!r}", source=final["file"])
    expected = config_fingerprint(model_config)
    if not fingerprint_matches(final["config_fingerprint"], model_config, saved):
        raise ConfigError(f"was trained with config fingerprint {final['config_fingerprint']}, but the run's "
                          f"config.json gives {expected} (method, router form, pool or training settings differ)",
                          source=final["file"])


def check_pool(final, pool_fingerprint):
    from smartfed.config import ConfigError

    if final["pool_fingerprint"] != pool_fingerprint:
        raise ConfigError(f"was trained on pool {str(final['pool_fingerprint'])[:16]}, not on the pool rebuilt from "
                          f"the run's config.json ({pool_fingerprint[:16]}); its routers would index other experts",
                          source=final["file"])


def evaluate_run(run_dir, overrides=(), *, split="test", device="cpu", progress=False):
    """Score the final state of ``run_dir`` on its task config changed by ``overrides``; returns
    the JSON record (see the ``evaluate`` entry of smartfed.cli)."""
    from smartfed.config import ConfigError, config_to_dict, with_overrides
    from smartfed.experiments.assets import task_layout
    from smartfed.experiments.file_data import INSTRUCTION_SCORES
    from smartfed.experiments.runs import build_trainer, federated_data
    from smartfed.experiments.train import check_inputs, prepare_model

    started = time.perf_counter()
    model_config, config, saved = read_run_config(run_dir, overrides, split=split)
    check_inputs(config)
    prepare_model(config)
    final = read_final_state(run_dir, model_config)
    recorded_paths = (saved.get("pool") or {}).get("paths")
    check_config(final, with_overrides(model_config, pool={"paths": recorded_paths}), saved)
    layout = task_layout(config)
    trainer, _ = build_trainer(model_config, device=device, progress=progress, layout=layout)
    check_pool(final, trainer.pool_fingerprint)
    data = federated_data(config, layout)
    examples = data.evaluation if split == "test" else data.validation
    if examples is None:
        raise ConfigError("is null and the run's clients held their own data: the server holds no held-out "
                          "examples to score (--set task.data.eval=FILE)", key="task.data.eval")
    scores = trainer.evaluate(final["state"], final["quotas"], examples, batch_size=config.federation.eval_batch_size,
                              items=True)
    items = with_item_metadata(scores.pop("items", None), config, split)
    return {
        "run_dir": str(run_dir), "split": split, "overrides": list(overrides), "config": config_to_dict(config),
        "state_file": final["file"], "state_sha256": final["sha256"], "round": final["round"],
        "accuracy": scores["accuracy"], "loss": scores["loss"],
        **{key: scores[key] for key in INSTRUCTION_SCORES if key in scores}, "examples": scores["num_examples"],
        "seconds": time.perf_counter() - started, "items": items,
    }


def with_item_metadata(columns, config, split):
    """The per-item ``columns`` of an evaluation (None for instruction examples without generation
    settings: nothing answered) with the template / seen / item columns of a v2 suite's test file."""
    from smartfed.experiments.item_scores import item_metadata

    data = getattr(config.task, "data", None)
    if columns is not None and split == "test" and data is not None and data.eval is not None:
        count = len(columns["prediction"])
        columns = {**columns, **item_metadata(data.eval, count)}
    return columns


def write_evaluation(run_dir, record, output=None):
    """Write ``record`` (without its items) to ``output`` or the run's ``evaluation.json``, and its
    items to ``evaluation_items.json`` beside it (``<output>.items.json`` for an ``output``);
    returns the record's path."""
    from smartfed.federated.run_dir import RunDir

    record = dict(record)
    items = record.pop("items", None)
    if items is not None:
        items = {"split": record["split"], "round": record["round"], "state_sha256": record["state_sha256"],
                 "overrides": record["overrides"], **items}
    if output:
        output = Path(output).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=1))
        if items is not None:
            output.with_suffix(".items.json").write_text(json.dumps(items))
        return output
    run = RunDir(run_dir)
    if items is not None:
        run.write_json(EVALUATION_ITEMS_FILE, items)
    return run.write_json(EVALUATION_FILE, record)


def run(args) -> int:
    from smartfed.experiments.train import set_threads

    # Everything the run folder and --set can get wrong is checked before torch loads.
    read_run_config(args.run_dir, args.overrides, split=args.split)
    set_threads(args.threads)
    record = evaluate_run(args.run_dir, args.overrides, split=args.split, device=args.device,
                          progress=not args.no_progress)
    output = write_evaluation(args.run_dir, record, args.output)
    from smartfed.experiments.file_data import scores_text

    print(f"{record['run_dir']}: round {record['round']} {record['split']} {scores_text(record)} on "
          f"{record['examples']} examples ({record['seconds']:.1f} s) -> {output}")
    return 0
