"""`smartfed` console script: each subcommand lives in its own module.

A subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int`` and imports its
heavy dependencies inside ``run``, so building the parser stays cheap for every subcommand.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "bench": ("smartfed.bench", "check every MoRE provider against the reference and time them"),
    "train": ("smartfed.experiments.train", "run a federated experiment (in-process simulation) from a YAML config"),
    "build-pool": ("smartfed.experiments.pool_builder", "train the public LoRA adapter pool with peft (cached, with provenance)"),
    "report": ("smartfed.experiments.report", "markdown tables and PNG plots from federated runs' metrics.jsonl"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartfed", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        sub.set_defaults(module_name=module_name)
        importlib.import_module(module_name).configure_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args.module_name).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
