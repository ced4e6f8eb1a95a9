"""Training and checking a public adapter on a v2 suite source (smartfed.tasks.source_task).

The adapter trains like a file task's clients do: classification sources by the label token's
cross-entropy at the end of a left-padded prompt (``ClassificationSequences``), instruction
sources by the cross-entropy of the response tokens only (``InstructionExamples``), on
length-bucketed batches. It is stored in ``dtype`` (float16 halves the committed files; the pool
reads any float dtype into float32 exactly) and then checked *from the stored file*: the check
scores are those of the adapter a user loads. The check split scores every row: accuracy for
classification, exact match (skills) or ROUGE-L (headlines) of the greedy answer for instruction,
overall and separately on the templates the adapter trained on (seen) and the one it did not
(unseen), before training (base model) and after.
"""

import hashlib
import math
import time
from pathlib import Path

import torch

from smartfed.experiments.item_scores import item_scores
from smartfed.federated.data import ClassificationSequences, InstructionExamples
from smartfed.federated.evaluation import GenerationSettings
from smartfed.pool import CONFIG_FILE, WEIGHTS_FILE

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHECK_BATCH = 32


def source_metric(task):
    if task.shape == "classification":
        return "correct"
    return "rouge_l" if task.source.startswith("headlines") else "exact_match"


def source_examples(task, split):
    tokens = task.train if split == "train" else task.check
    if task.shape == "classification":
        return ClassificationSequences.build(tokens.token_ids, tokens.labels, pad_token_id=task.pad_token_id)
    generation = None
    if split == "check":
        metric = source_metric(task)
        generation = GenerationSettings(every_rounds=1, max_new_tokens=task.max_new_tokens, batch_size=CHECK_BATCH,
                                        decode=task.decode, stop_token_ids=task.stop_token_ids, metrics=(metric,))
    return InstructionExamples.build(tokens.token_ids, tokens.prompt_lengths, pad_token_id=task.pad_token_id,
                                     references=tokens.references, generation=generation)


def check_scores(model, task):
    """{metric, overall, seen, unseen, by_template, rows} of ``model`` on ``task``'s check split."""
    metric = source_metric(task)
    model.eval()
    columns = item_scores(model, source_examples(task, "check"), label_token_ids=task.label_token_ids,
                          batch_size=CHECK_BATCH)
    values = columns[metric]

    def mean(rows):
        rows = list(rows)
        return math.fsum(values[i] for i in rows) / len(rows) if rows else None

    rows = range(len(values))
    return {
        "metric": metric, "overall": mean(rows), "rows": len(values),
        "seen": mean(i for i in rows if task.check_seen[i]), "unseen": mean(i for i in rows if not task.check_seen[i]),
        "by_template": {template: mean(i for i in rows if task.check_templates[i] == template)
                        for template in sorted(set(task.check_templates))},
    }


def store_adapter(directory, dtype):
    """Rewrite the adapter's weights in ``dtype`` (every value finite after the cast), keep only
    its config and weights; returns the sha256 of each."""
    import safetensors.torch

    path = Path(directory) / WEIGHTS_FILE
    tensors = safetensors.torch.load_file(str(path))
    cast = {name: tensor.to(STORE_DTYPES[dtype]).contiguous() for name, tensor in tensors.items()}
    for name, tensor in cast.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} does not fit {dtype}: storing it would make it non-finite")
    safetensors.torch.save_file(cast, str(path), metadata={"format": "pt"})
    # peft's generated model card holds nothing but this machine's model path; provenance.json says more.
    (Path(directory) / "README.md").unlink(missing_ok=True)
    return {name: hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest()
            for name in (CONFIG_FILE, WEIGHTS_FILE)}


def train_source_adapter(model_dir, task, spec, adapter, directory, *, progress=True, overall=None):
    """Train one peft LoRA adapter on the suite source ``task``, store it into ``directory`` in
    the spec's dtype and check it from there; returns its record."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from smartfed.experiments.pool_builder import code_version, optimize, training_environment
    from smartfed.models import load_frozen_model

    steps = adapter.get("steps", spec["training"]["steps"])
    lr = adapter.get("lr", spec["training"]["lr"])
    batch_size, lora, dtype = spec["training"]["batch_size"], spec["lora"], spec.get("dtype", "float32")
    seed = spec["seed"] * 1_000_003 + int(hashlib.sha256(adapter["name"].encode()).hexdigest()[:8], 16)
    started = time.perf_counter()
    check_before = check_scores(load_frozen_model(model_dir), task)
    check_seconds = time.perf_counter() - started
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(load_frozen_model(model_dir), LoraConfig(
            r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=list(lora["target_modules"]), lora_dropout=0.0,
        ))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    examples = source_examples(task, "train")
    batches = examples.training_batches(batch_size, steps, torch.Generator().manual_seed(seed))
    model.train()
    losses, train_seconds = optimize(
        optimizer, batches,
        lambda index: examples.training_loss(model, index, label_token_ids=task.label_token_ids, device="cpu")[0],
        desc=f"adapter {adapter['name']}", progress=progress, overall=overall)
    model.save_pretrained(str(directory))
    hashes = store_adapter(directory, dtype)
    started = time.perf_counter()
    stored = PeftModel.from_pretrained(load_frozen_model(model_dir), str(directory))
    check_after = check_scores(stored, task)
    check_seconds += time.perf_counter() - started
    tail = losses[-max(1, steps // 5):]
    return {
        "steps": steps, "batch_size": batch_size, "lr": lr, "dtype": dtype, "files_sha256": hashes,
        "first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean_last_20pct": math.fsum(tail) / len(tail),
        "check_before": check_before, "check_after": check_after,
        # The v1 manifest's columns: the check's overall score.
        "eval_accuracy_before": check_before["overall"], "eval_accuracy_after": check_after["overall"],
        "train_seconds": train_seconds, "check_seconds": check_seconds,
        "environment": training_environment(), "code_version": code_version(),
    }
