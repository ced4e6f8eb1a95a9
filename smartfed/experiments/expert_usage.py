"""Which source adapters a trained SmartFed model routes to: per adapter, the share of top-k
selections and of gate mass over every token of some prompts, counted by observers on the MoRE
layers (``origins`` name each expert's adapter).

``smartfed expert-usage RUN_DIR...`` rebuilds each SmartFed run's final model
from its checkpoint (``config.json``, ``checkpoint/``) and writes
``RUN_DIR/expert_usage.json`` for the run's evaluation prompts; ``smartfed report`` tabulates it.
"""

import json
from collections import defaultdict


def expert_usage_by_adapter(model, input_ids, *, batch_size=50):
    """{"selections": {adapter: share}, "gate_mass": {adapter: share}, "by_projection": {projection:
    {adapter: selection share}}} over every token of ``input_ids`` [M, L]."""
    import torch

    import smartfed_kernels
    from smartfed import more_layers

    selections, gate_mass = defaultdict(float), defaultdict(float)
    by_projection = defaultdict(lambda: defaultdict(float))

    def observe(layer, x, y0, delta):
        if layer.origins is None:
            raise ValueError("MoRE layer has no expert origins; inject it from a LoRAPool")
        router_weight, router_bias, expert_a, expert_b = layer._routing_tensors(x.dtype)
        _, indices, gates = smartfed_kernels.more_linear(
            x, None, None, router_weight, router_bias, expert_a, expert_b, layer.top_k, gate=layer.gate,
            gamma=layer.gamma, router=layer.op_router, backend=layer.backend, return_routing=True,
        )
        owners = [layer.origins[i][0] for i in range(layer.num_experts)]
        projection = layer_names[id(layer)].rsplit(".", 1)[-1]
        counts = torch.bincount(indices.reshape(-1), minlength=layer.num_experts).tolist()
        mass = torch.zeros(layer.num_experts).index_add_(0, indices.reshape(-1), gates.reshape(-1).float()).tolist()
        for expert, (count, weight) in enumerate(zip(counts, mass)):
            selections[owners[expert]] += count
            gate_mass[owners[expert]] += weight
            by_projection[projection][owners[expert]] += count

    layers = more_layers(model)
    layer_names = {id(layer): name for name, layer in layers.items()}
    handles = [layer.add_observer(observe) for layer in layers.values()]
    try:
        with torch.no_grad():
            for start in range(0, len(input_ids), batch_size):
                model(input_ids=input_ids[start:start + batch_size], logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()

    def shares(counts):
        total = sum(counts.values()) or 1.0
        return {name: value / total for name, value in sorted(counts.items())}

    return {"selections": shares(selections), "gate_mass": shares(gate_mass),
            "by_projection": {p: shares(c) for p, c in sorted(by_projection.items())}}


def run_config_of(run_dir):
    """The RunConfig of the SmartFed text-task run in ``run_dir`` (resolved); a ConfigError for
    anything else. Reads only its config.json."""
    from smartfed.config import SYNTHETIC_TASK, ConfigError, RunConfig, validate
    from smartfed.federated.run_dir import RunDir

    path = RunDir(run_dir).config_path
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder ({path.name} is missing)")
    config = validate(RunConfig, RunDir(run_dir).read_config(), source=path)
    if config.method != "smartfed":
        raise ConfigError(f"is {config.method!r}; expert usage needs a smartfed run", key="method", source=path)
    if config.task.name == SYNTHETIC_TASK:
        raise ConfigError("is the synthetic task; expert usage needs a text task run", key="task.name", source=path)
    return config


def usage_of_run(run_dir):
    """Expert usage of a finished SmartFed run's final routers on its evaluation prompts."""
    from smartfed.config import ConfigError
    from smartfed.experiments.runs import build_trainer
    from smartfed.federated.run_dir import RunDir

    run_folder = RunDir(run_dir)
    config = run_config_of(run_dir)
    trainer, task = build_trainer(config)  # task: the run's text task, as text_task.json records it
    found = run_folder.read_checkpoint()
    if found is None:
        raise ConfigError(f"{run_dir} holds no checkpoint")
    _, checkpoint = found
    trainer.method.load_trainable_state(trainer.model, checkpoint.global_state)
    trainer.method.apply_quotas(trainer.model, checkpoint.quotas)
    trainer.model.eval()
    usage = expert_usage_by_adapter(trainer.model, task.eval_input_ids)
    return {"round": checkpoint.round, "prompts": int(task.eval_labels.numel()), **usage}


def configure_parser(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="SmartFed run folders with a checkpoint")


def run(args) -> int:
    from smartfed.federated.run_dir import EXPERT_USAGE_FILE, RunDir

    for run_dir in args.runs:  # every folder checked before the first model is built
        run_config_of(run_dir)
    for run_dir in args.runs:
        usage = usage_of_run(run_dir)
        RunDir(run_dir).write_json(EXPERT_USAGE_FILE, usage)
        print(run_dir, json.dumps(usage["selections"]))
    return 0
