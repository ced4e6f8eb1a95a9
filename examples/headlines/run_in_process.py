"""The worked example in-process: write BBC News headlines, 3 clients, SmolLM2-135M-Instruct.

Until ``smartfed train`` reads ``task.data`` from the run config, this script drives the same
engine through the Python API: the task from the files (``smartfed.tasks.file_task``), each client
holding the rows of its own file (a natural partition of ``all_clients.jsonl`` by ``client``), the
method built by the harness on the public pool, and ``SmartFedStrategy`` over the in-process grid.

    python -m smartfed.tasks.headlines /tmp/headlines          # the data (outside the repository)
    smartfed build-pool --config configs/public_pool.yaml      # the public pool, once
    python examples/headlines/run_in_process.py /tmp/headlines runs/headlines-smartfed
"""

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="the folder python -m smartfed.tasks.headlines wrote")
    parser.add_argument("output", type=Path, help="a new run folder")
    parser.add_argument("--config", type=Path, default=HERE / "headlines.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a run setting, e.g. --set method=fedit or --set federation.rounds=1")
    args = parser.parse_args(argv)

    from smartfed.config import config_fingerprint, config_from_dict, config_to_dict
    from smartfed.experiments.file_data import file_federated_data, format_partition, partition_summary
    from smartfed.experiments.runs import build_trainer
    from smartfed.federated.client import FederatedClient
    from smartfed.federated.grid import InProcessGrid
    from smartfed.federated.strategy import SmartFedStrategy
    from smartfed.models import load_tokenizer, resolve_model_dir
    from smartfed.tasks.file_task import load_file_task
    from smartfed.tasks.schema import InstructionData

    spec = yaml.safe_load(args.config.read_text())
    data_spec = spec.pop("data")
    data = InstructionData(**{**data_spec, "train": str(args.data_dir / data_spec["train"]),
                              "eval": str(args.data_dir / data_spec["eval"])})
    spec["model"] = {"tiny": None, "pretrained": str(resolve_model_dir(spec["model"].get("pretrained")))}
    config = config_from_dict(spec, args.overrides)
    started = time.perf_counter()
    task = load_file_task(data, load_tokenizer(config.model.pretrained))
    print(json.dumps(task.summary(), indent=1))
    print(f"task ready in {time.perf_counter() - started:.2f} s")
    trainer, _ = build_trainer(config, layout=task, progress=True)
    # Each client holds its own file's rows: the run config's partition names no "natural" yet.
    federation = SimpleNamespace(**{**vars(config.federation), "partition": "natural"})
    split = file_federated_data(task, federation, seed=config.seed)
    print(format_partition(partition_summary(split)))
    strategy = SmartFedStrategy(config, trainer, split.evaluation, args.output, fingerprint=config_fingerprint(config),
                                partitions=split.clients, setup_json=json.dumps(config_to_dict(config)), progress=True)
    strategy.start(InProcessGrid(FederatedClient(trainer, split, config), config.federation.num_clients))
    last = strategy.history[-1]
    print({key: last[key] for key in ("round", "loss", "perplexity", "accuracy", "exact_match", "f1", "rouge_l")
           if key in last})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
