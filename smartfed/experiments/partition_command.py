"""``smartfed partition``: how a run config splits its training examples over the clients.

It builds what ``smartfed train`` builds before the model (the task's examples, the validation
hold-out, the partition: flwr-datasets' IID, Dirichlet or natural for a file task, the project's
own for the built-in tasks), then prints one line per client (its size, its label histogram,
the token lengths of its examples) and, with ``--plot``, writes a stacked bar chart of it. No
model is built and nothing is trained.
"""

import json
from pathlib import Path


def configure_parser(parser):
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config value, as smartfed train --set; repeatable")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write the partition's bar chart here")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the partition summary as JSON here")


def partition_of(config):
    """(the task's layout, its ``FederatedData``) of ``config``, as ``smartfed train`` splits it."""
    from smartfed.experiments.assets import task_layout
    from smartfed.experiments.runs import federated_data

    layout = task_layout(config)
    return layout, federated_data(config, layout)


def label_names(config, layout):
    """The label names of a task: a classification file's labels, a text task's label words, or
    the synthetic task's class ids; none for an instruction file."""
    data = config.task.data
    if data is not None:
        return list(data.labels) if data.shape == "classification" else []
    words = getattr(layout, "label_words", None)
    if words:
        return [str(word).strip() for word in words]
    return [str(label) for label in range(len(layout.label_token_ids))]


def run(args) -> int:
    from smartfed.config import ConfigError, load_config
    from smartfed.experiments.train import check_inputs, prepare_model

    config = load_config(args.config, args.overrides)
    if config.task.clients_hold_their_data:
        raise ConfigError("is null: each client holds its own data on its SuperNode, which no one splits (name the "
                          "file to split over simulated clients)", key="task.data.train", source=args.config)
    try:
        check_inputs(config)
    except ConfigError as error:
        raise error.located(source=args.config) from None
    outputs = [Path(path).resolve() for path in (args.plot, args.json) if path is not None]
    for path in outputs:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; name a file", key="--plot" if path.suffix == ".png" else "--json")
    prepare_model(config)

    from smartfed.experiments.file_data import format_partition, partition_summary, plot_partition

    layout, data = partition_of(config)
    summary = partition_summary(data, label_names(config, layout))
    fed = config.federation
    how = f"{fed.partition}" + (f" (alpha {fed.alpha})" if fed.partition == "dirichlet" else "")
    print(f"{summary['total']} training examples over {fed.num_clients} clients, partition {how}, seed {config.seed}")
    print(format_partition(summary))
    if args.plot is not None:
        print(f"plot: {plot_partition(summary, Path(args.plot).resolve())}")
    if args.json is not None:
        path = Path(args.json).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"partition": fed.partition, "seed": config.seed, **summary}, indent=1))
        print(f"summary: {path}")
    return 0
