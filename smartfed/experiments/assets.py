"""The frozen base model, the target task's layout and the public LoRA pool of a run config.

``build_base_model`` makes the tiny random Llama of a config (same weights for the same seed,
in every process) or loads a pretrained one. ``build_tiny_pool`` trains one peft LoRA adapter per
synthetic source task on that base and saves each with ``save_pretrained``; the result is cached
under a key of everything that determines it, written atomically so that concurrent runs never
see a half-built pool.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smartfed.config import SYNTHETIC_TASK
from smartfed.federated.data import answer_logits, answer_loss, batch_indices
from smartfed.staging import finish_staging, make_staging, remove_stale_staging
from smartfed.federated.seeding import STREAM_BASE_MODEL, STREAM_LAYOUT, STREAM_POOL, derived_seed
from smartfed.tasks.synthetic import generate_examples, make_layout

POOL_COMPLETE = "pool.json"
# Staging folders are recognised by their marker (smartfed.staging), not by this name.
POOL_STAGING_PREFIX = ".pool-staging-"


def build_base_model(model_config, seed):
    """A frozen causal LM in eval mode (no dropout): tiny random Llama or pretrained."""
    if model_config.tiny is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, STREAM_BASE_MODEL))
            model = LlamaForCausalLM(LlamaConfig(**model_config.tiny))
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"gguf_file": model_config.gguf_file} if model_config.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(model_config.pretrained, **kwargs)
    model.requires_grad_(False)
    return model.eval()


def task_layout(config, data=None):
    """The target task's layout: the synthetic layout, a smartfed.tasks text task (whose
    ``label_token_ids`` is all the trainer reads) tokenized by ``model.pretrained``'s tokenizer,
    or the file task of ``task.data`` (``data``: another data section in its place, a node's own
    files); where the clients hold their data, only the server's held-out file is read."""
    if config.task.data is not None or config.task.name != SYNTHETIC_TASK:
        from smartfed.models import load_tokenizer

        tokenizer = load_tokenizer(config.model.pretrained)
        if config.task.data is None:
            from smartfed.tasks import load_task

            return load_task(config.task.name, tokenizer, **config.task.options)
        from smartfed.tasks.file_task import load_file_task

        return load_file_task(config.task.data if data is None else data, tokenizer)
    return synthetic_layout(config)


def synthetic_layout(config):
    """The synthetic tasks' token layout (the target's, and the tiny pool's source tasks)."""
    vocab_size = base_vocab_size(config.model)
    return make_layout(
        vocab_size, config.task.num_labels, config.pool.source_tasks,
        config.task.signal_tokens_per_class, seed=derived_seed(config.seed, STREAM_LAYOUT),
    )


def base_vocab_size(model_config):
    if model_config.tiny is not None:
        from transformers import LlamaConfig

        return LlamaConfig(**model_config.tiny).vocab_size
    from transformers import AutoConfig

    kwargs = {"gguf_file": model_config.gguf_file} if model_config.gguf_file else {}
    return AutoConfig.from_pretrained(model_config.pretrained, **kwargs).vocab_size


def _pool_key(config):
    pool = {k: v for k, v in vars(config.pool).items() if k not in ("cache_dir", "paths")}
    # The pool never sees the target's examples, so holding some out, or the target's files, do not change it.
    task = {k: v for k, v in vars(config.task).items() if k not in ("validation_fraction", "data")}
    key = {"model": vars(config.model), "seed": config.seed, "task": task, "pool": pool}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir():
    return Path(os.environ.get("SMARTFED_CACHE", Path.home() / ".cache" / "smartfed")) / "pools"


def _train_source_adapter(config, layout, task_index, directory):
    from peft import LoraConfig, get_peft_model

    pool = config.pool
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(config.seed, STREAM_POOL, task_index, 2))
        model = get_peft_model(
            build_base_model(config.model, config.seed),
            LoraConfig(
                r=pool.rank, lora_alpha=pool.lora_alpha, target_modules=list(pool.target_modules),
                lora_dropout=0.0,
            ),
        )
    input_ids, labels = generate_examples(
        layout, task_index, max(pool.batch_size * 8, 256), seq_len=config.task.seq_len,
        signals_per_example=config.task.signals_per_example,
        seed=derived_seed(config.seed, STREAM_POOL, task_index, 0),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=pool.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(derived_seed(config.seed, STREAM_POOL, task_index, 1))
    model.train()
    for _ in range(pool.train_steps):
        index = batch_indices(len(labels), pool.batch_size, generator)
        logits = answer_logits(model, input_ids[index])
        loss = answer_loss(logits, labels[index], layout.label_token_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(directory))
    return float(loss.detach())


def build_tiny_pool(config, *, progress=True):
    """Paths of the pool's adapter directories: ``config.pool.paths`` when given, else adapters
    trained on the synthetic source tasks (cached)."""
    if config.pool.paths:
        return [Path(p) for p in config.pool.paths]
    # Resolved before anything is checked or written: ".." and symlinks name the folder they reach.
    root = (Path(config.pool.cache_dir) if config.pool.cache_dir else default_cache_dir()).resolve()
    target = root / _pool_key(config)
    names = [f"source_{index}" for index in range(config.pool.source_tasks)]
    if not (target / POOL_COMPLETE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(root)
        staging = make_staging(root, POOL_STAGING_PREFIX)
        try:
            layout = synthetic_layout(config)
            final_losses = {}
            for index, name in enumerate(tqdm(names, desc="training pool adapters", disable=not progress)):
                final_losses[name] = _train_source_adapter(config, layout, index, staging / name)
            (staging / POOL_COMPLETE).write_text(json.dumps({"adapters": names, "final_loss": final_losses}))
            finish_staging(staging)
            try:
                os.replace(staging, target)
            except OSError:
                pass  # another process finished the same pool first; its copy is identical by construction
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [target / name for name in names]
