"""One client's local step, SmartFed against FedIT: forward + backward + AdamW on the same
instruction batch through SmolLM2-135M-shaped layers, at the same active rank.

The base is a random ``LlamaForCausalLM`` of SmolLM2-135M-Instruct's shape (hidden 576, 30 layers,
9 heads / 3 key-value heads, MLP 1536, vocabulary 49152; ``layers`` shrinks it for tests) and the
pool ``adapters`` random rank-``pool_rank`` peft LoRA adapters on q_proj and v_proj, saved and
loaded through the real loader. Both methods are built by the harness (``build_trainer``) and
step exactly as a client does (``ClientTrainer.train``'s loop: the batch's response-only loss,
EEQA's importance tracker attached for SmartFed, a fresh AdamW). SmartFed keeps the ``active_rank``
top experts per token (``more.top_k``); FedIT trains a LoRA of rank ``active_rank``.

Each step is split into forward, backward and optimizer time (CPU work is synchronous), the
steps of the methods are interleaved round by round, and the peak memory of a step is measured as
the engine does (``smartfed.federated.accounting.PeakMemory``, over at least ``PEAK_WINDOW_S`` of
steps so that the sampler sees a short one). ``profile`` adds torch
profiler's top operators of one step per method.

    smartfed bench-step [--layers 30] [--rounds 5] [--profile] [--output PREFIX]   (PREFIX.json, PREFIX.md)
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_135M = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}


PEAK_WINDOW_S = 0.2


def _pool(shape, folder, *, adapters, rank, seed):
    """Paths of ``adapters`` random peft LoRA adapters (q_proj, v_proj) on the base of ``shape``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**shape))
    paths = []
    for index in range(adapters):
        torch.manual_seed(seed + 1 + index)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        model.save_pretrained(str(folder / f"adapter_{index}"))
        base = model.unload()
        paths.append(str(folder / f"adapter_{index}"))
    return paths


def _trainer(method, router, shape, pool_paths, active_rank, seed):
    from smartfed.config import config_from_dict
    from smartfed.experiments.runs import build_trainer

    config = config_from_dict({
        "seed": seed, "method": method, "model": {"tiny": shape},
        "pool": {"paths": pool_paths, "target_modules": ["q_proj", "v_proj"]},
        "more": {"top_k": active_rank, "router": router},
        "baseline": {"lora_rank": active_rank, "lora_alpha": float(2 * active_rank)},
    })
    trainer, _ = build_trainer(config)
    return trainer


def instruction_batch(batch_size, prompt_tokens, response_tokens, vocab_size, seed):
    """A left-padded instruction batch of random token ids (prompt and response lengths uniform in
    the given ranges), as ``InstructionExamples``."""
    from smartfed.federated.data import InstructionExamples

    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(prompt_tokens[0], prompt_tokens[1] + 1, (batch_size,), generator=generator).tolist()
    answers = torch.randint(response_tokens[0], response_tokens[1] + 1, (batch_size,), generator=generator).tolist()
    sequences = [torch.randint(3, vocab_size, (p + a,), generator=generator).tolist() for p, a in zip(prompts, answers)]
    return InstructionExamples.build(sequences, prompts, pad_token_id=0)


class _Stepper:
    """One method's model, optimizer and batch; ``step()`` runs a local step and returns its
    (forward, backward, optimizer) seconds."""

    def __init__(self, trainer, examples):
        self.trainer, self.examples = trainer, examples
        self.index = torch.arange(len(examples))
        trainer.model.train()
        self.optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)
        self.tracker = trainer.method.importance_tracker(trainer.model)
        if self.tracker is not None:
            self.tracker.attach()

    def step(self):
        started = time.perf_counter()
        loss, _ = self.examples.training_loss(self.trainer.model, self.index, label_token_ids=(), device="cpu")
        forward = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        self.optimizer.step()
        done = time.perf_counter()
        return forward - started, backward - forward, done - backward

    def trainable(self):
        return sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)


def _profile(stepper, top):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stepper.step()
    rows = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    return [{"op": event.key, "self_ms": event.self_cpu_time_total / 1e3, "calls": event.count} for event in rows]


def local_step_bench(*, layers=30, shape=None, batch_size=8, prompt_tokens=(48, 96), response_tokens=(8, 24), active_rank=8,
                     adapters=3, pool_rank=8, routers=("expert_space", "linear"), rounds=5, seed=0, profile=False,
                     profile_top=12):
    """Seconds per local step (median over ``rounds`` interleaved rounds, with its forward,
    backward and optimizer parts), the peak memory of a step and the ratio to FedIT, for FedIT and
    SmartFed with each of ``routers``; a JSON-ready dict. ``shape``: LlamaConfig arguments
    replacing SmolLM2-135M's (tests use a tiny one)."""
    from smartfed.federated.accounting import PeakMemory

    load_at_start = os.getloadavg()[0]
    shape = dict(SMOLLM2_135M, num_hidden_layers=layers) if shape is None else dict(shape)
    examples = instruction_batch(batch_size, prompt_tokens, response_tokens, shape["vocab_size"], seed)
    methods = [("fedit", "linear")] + [("smartfed", router) for router in routers]
    with tempfile.TemporaryDirectory(prefix="smartfed-local-step-") as scratch:
        pool = _pool(shape, Path(scratch), adapters=adapters, rank=pool_rank, seed=seed)
        steppers = {
            ("fedit" if method == "fedit" else f"smartfed[{router}]"): _Stepper(
                _trainer(method, router, shape, pool, active_rank, seed), examples)
            for method, router in methods
        }
    for stepper in steppers.values():
        stepper.step()  # warm-up: first-call allocations and lazy kernel loads
    parts = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, stepper in steppers.items():
            parts[name].append(stepper.step())
    rows = []
    for name, stepper in steppers.items():
        with PeakMemory("cpu") as memory:
            # Steps for at least PEAK_WINDOW_S: the sampler needs a few intervals to see a step's peak.
            deadline = time.perf_counter() + PEAK_WINDOW_S
            stepper.step()
            while time.perf_counter() < deadline:
                stepper.step()
        totals = [sum(p) for p in parts[name]]
        rows.append({
            "method": name, "step_s": statistics.median(totals),
            "forward_s": statistics.median(p[0] for p in parts[name]),
            "backward_s": statistics.median(p[1] for p in parts[name]),
            "optimizer_s": statistics.median(p[2] for p in parts[name]),
            "peak_memory_bytes": memory.peak_bytes, "peak_memory_source": memory.source,
            "trainable_parameters": stepper.trainable(),
        })
    fedit = rows[0]
    for row in rows:
        # Ratios within each round first, then the median: load from elsewhere hits both alike.
        row["step_ratio_vs_fedit"] = statistics.median(
            sum(a) / sum(b) for a, b in zip(parts[row["method"]], parts["fedit"]))
        row["peak_memory_ratio_vs_fedit"] = row["peak_memory_bytes"] / max(1, fedit["peak_memory_bytes"])
    record = {
        "bench": "local_step", "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": load_at_start, "rounds": rounds,
        "shape": shape, "pool": {"adapters": adapters, "rank": pool_rank, "experts_per_module": adapters * pool_rank},
        "active_rank": active_rank, "batch": {
            "examples": len(examples), "tokens": int(examples.lengths.sum()),
            "padded_tokens": int(len(examples) * examples.lengths.max()),
            "response_tokens": int(examples.response_lengths.sum())},
        "rows": rows, "load_average_end": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
    }
    if profile:
        record["profile"] = {name: _profile(stepper, profile_top) for name, stepper in steppers.items()}
    for stepper in steppers.values():
        if stepper.tracker is not None:
            stepper.tracker.detach()
    return record


def format_table(record) -> str:
    lines = ["| method | step s | forward s | backward s | AdamW s | x FedIT | peak MiB | x FedIT | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        lines.append(f"| {row['method']} | {row['step_s']:.3f} | {row['forward_s']:.3f} | {row['backward_s']:.3f} | "
                     f"{row['optimizer_s']:.4f} | {row['step_ratio_vs_fedit']:.2f} | "
                     f"{row['peak_memory_bytes'] / 2 ** 20:.0f} | {row['peak_memory_ratio_vs_fedit']:.2f} | "
                     f"{row['trainable_parameters']} |")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m smartfed.experiments.local_step_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the SmolLM2 shape (default: 30)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--active-rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed steps per method (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="add torch profiler's top operators of one step")
    parser.add_argument("--output", type=Path, default=None, metavar="PREFIX",
                        help="write PREFIX.json (the record) and PREFIX.md (its table); default: "
                             "benchmarks/results/local_step-cpu-<date>")
    return parser


def markdown(record) -> str:
    """The record's table with what it measured: the shape, the batch, the machine and its load."""
    batch, shape = record["batch"], record["shape"]
    return (f"# One local step: SmartFed vs FedIT ({record['date']})\n\n"
            f"{shape['num_hidden_layers']} SmolLM2-135M-shaped layers (hidden {shape['hidden_size']}), a pool of "
            f"{record['pool']['adapters']} rank-{record['pool']['rank']} adapters on q_proj and v_proj, active rank "
            f"{record['active_rank']}; one instruction batch of {batch['examples']} examples "
            f"({batch['tokens']} tokens, {batch['padded_tokens']} with padding, {batch['response_tokens']} "
            "response tokens); median of "
            f"{record['rounds']} interleaved steps. {record['machine']}, {record['cpus']} CPUs, "
            f"{record['torch_threads']} torch threads, load average {record['load_average']:.2f} at the start and "
            f"{record['load_average_end']:.2f} at the end.\n\n{format_table(record)}\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = local_step_bench(layers=args.layers, batch_size=args.batch_size, active_rank=args.active_rank,
                              rounds=args.rounds, profile=args.profile)
    prefix = args.output or Path("benchmarks") / "results" / f"local_step-cpu-{record['date']}"
    prefix = Path(prefix).resolve()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, table_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    json_path.write_text(json.dumps(record, indent=1))
    table_path.write_text(markdown(record))
    print(format_table(record))
    print(f"wrote {json_path} and {table_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
