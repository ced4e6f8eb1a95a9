"""A federated run assembled from its config: the composition root of the engine.

The engine (``smartfed.federated``) is handed everything it runs: the method (by name from
``smartfed.experiments.method_registry``), the model that method built on the frozen base and the pool,
the task's examples split across clients, and the run folder (a ``RunDir``) that records it. This
module builds them from a run config, for the in-process engine (``run_in_process``: ``smartfed
train``, the sweep) and for the Flower apps (``smartfed.experiments.flower_apps``), which then
drive the same ``SmartFedStrategy`` with the same ``driver.drive``.
"""

import json
from dataclasses import dataclass

import numpy as np
import torch

from smartfed.config import SYNTHETIC_TASK, ConfigError, config_fingerprint, config_to_dict
from smartfed.experiments.assets import build_base_model, build_tiny_pool, task_layout
from smartfed.experiments.file_data import file_federated_data, held_out_data, node_data_section, own_data
from smartfed.experiments.method_registry import build_method
from smartfed.federated.client import FederatedClient
from smartfed.federated.data import Examples, FederatedData, split_clients
from smartfed.federated.driver import drive
from smartfed.federated.faults import FaultInjectingGrid
from smartfed.federated.grid import InProcessGrid
from smartfed.federated.run_dir import RunDir
from smartfed.federated.seeding import (
    STREAM_EVAL_DATA, STREAM_ROOT_SET, STREAM_TRAIN_DATA, STREAM_VALIDATION, derived_seed,
)
from smartfed.federated.strategy import SmartFedStrategy
from smartfed.federated.trainer import ClientTrainer
from smartfed.tasks.synthetic import TARGET_TASK, generate_examples


def build_trainer(config, *, device="cpu", progress=False, layout=None):
    """The ``ClientTrainer`` of ``config``: its method built on the frozen base model and the
    pool (trained and cached on first use), and the answer tokens of its task, or of ``layout``
    (``smartfed evaluate`` scores a run's model on another task config). Returns (trainer,
    layout): the layout is the synthetic ``TokenLayout`` or the text task."""
    from smartfed import LoRAPool

    method = build_method(config)
    pool = LoRAPool.from_pretrained(build_tiny_pool(config, progress=progress))
    model = method.build(build_base_model(config.model, config.seed), pool).to(device)
    layout = task_layout(config) if layout is None else layout
    trainer = ClientTrainer(
        method, model, label_token_ids=layout.label_token_ids, pool_fingerprint=pool.fingerprint, device=device
    )
    return trainer, layout


def federated_data(config, layout) -> FederatedData:
    """The target task's training examples split across ``config.federation.num_clients``
    clients and its held-out evaluation examples; deterministic by ``config.seed``. With
    ``task.validation_fraction`` the validation split is held out of the training examples first,
    then with ``robustness.root_examples`` the server's root set, the same way; neither touches the
    evaluation split. A file task (``task.data``) is split by flwr-datasets' partitioners; where its
    clients hold their own data, the server has only its own held-out examples
    (``file_data.held_out_data``). A file task has no root set (the config refuses one)."""
    if config.task.data is not None:
        if config.task.clients_hold_their_data:
            return held_out_data(layout)
        return file_federated_data(layout, config.federation, seed=config.seed,
                                   validation_size=config.task.validation_size(len(layout.train)))
    if config.task.name != SYNTHETIC_TASK:
        train = Examples(layout.train_input_ids, layout.train_labels)
        evaluation = Examples(layout.eval_input_ids, layout.eval_labels)
    else:
        task = config.task
        options = {"seq_len": task.seq_len, "signals_per_example": task.signals_per_example}
        train = Examples(*generate_examples(
            layout, TARGET_TASK, task.train_examples, seed=derived_seed(config.seed, STREAM_TRAIN_DATA), **options
        ))
        evaluation = Examples(*generate_examples(
            layout, TARGET_TASK, task.eval_examples, seed=derived_seed(config.seed, STREAM_EVAL_DATA), **options
        ))
    validation = None
    size = config.task.validation_size(len(train))
    if size:
        train, validation = hold_out(train, size, seed=derived_seed(config.seed, STREAM_VALIDATION))
    root = None
    if config.robustness.root_examples:
        if config.robustness.root_examples >= len(train):
            raise ConfigError(f"leaves none of the {len(train)} training examples to the clients, got "
                              f"{config.robustness.root_examples}", key="robustness.root_examples")
        train, root = hold_out(train, config.robustness.root_examples, seed=derived_seed(config.seed, STREAM_ROOT_SET))
    data = split_clients(train, evaluation, config.federation, seed=config.seed, validation=validation)
    data.root = root
    return data


def build_client(config, *, device="cpu", client_id=0, node_config=None) -> FederatedClient:
    """The client handlers of a process that answers ``config``'s messages: every client of the
    run, their examples split from the run's task (in-process, the simulation engine, a SuperNode
    of a run that splits one file); where the clients hold their own data, client ``client_id``
    alone, on the files its ``node_config`` names (``data-path``, optional ``eval-path``)."""
    if not config.task.clients_hold_their_data:
        trainer, layout = build_trainer(config, device=device)
        return FederatedClient(trainer, federated_data(config, layout), config)
    task = task_layout(config, node_data_section(config.task.data, node_config or {}))
    trainer, _ = build_trainer(config, device=device, layout=task)
    return FederatedClient(trainer, own_data(task, client_id), config)


def hold_out(examples, size, *, seed):
    """(the examples left, in their order; ``size`` held-out examples, stratified by label: each
    label's count within one of its proportional share), chosen by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(examples))
    order = order[np.argsort(examples.labels.numpy()[order], kind="stable")]
    # Evenly spaced positions through the label-sorted order take every label in proportion.
    picks = np.sort(order[((np.arange(size) + 0.5) * len(examples) / size).astype(np.int64)])
    return examples.subset(np.setdiff1d(np.arange(len(examples)), picks)), examples.subset(picks)


@dataclass
class Run:
    """Everything one process needs for a run: the trainer and task layout, the clients' data,
    the server strategy (which holds the state and history) and the run folder that records it."""

    config: object
    trainer: ClientTrainer
    layout: object
    data: FederatedData
    strategy: SmartFedStrategy
    run_dir: RunDir
    progress: bool = False
    client_evaluation: bool = False

    @property
    def state(self):
        return self.strategy.state

    @property
    def history(self):
        return self.strategy.history

    @property
    def output_dir(self):
        return self.run_dir.folder

    def start(self, grid, *, node_wait_s=120.0, stop_after_round=None, listed=()):
        """Drive the strategy over ``grid`` (``smartfed.federated.driver.drive``)."""
        return drive(self.strategy, grid, self.run_dir, node_wait_s=node_wait_s, stop_after_round=stop_after_round,
                     progress=self.progress, listed=listed, client_evaluation=self.client_evaluation)

    def start_in_process(self, *, stop_after_round=None):
        """Drive the strategy over this process's clients (``in_process_grid``)."""
        with in_process_grid(self) as grid:
            return self.start(grid, stop_after_round=stop_after_round)


def open_run(config, output_dir, *, resume=False, progress=True, trainer=None, device="cpu",
             timeout=3600.0, aggregate=None, client_evaluation=False) -> Run:
    """The run of ``config`` in ``output_dir`` (a folder, or a ``RunDir``), fresh (the folder
    guard; refuses a folder with a checkpoint; records ``config.json``) or with ``resume``
    continued from its checkpoint after the resume rules. The other arguments are the
    strategy's (``SmartFedStrategy``) and the driver's."""
    run_dir = output_dir if isinstance(output_dir, RunDir) else RunDir(output_dir)
    config_dict = config_to_dict(config)
    if not resume:
        run_dir.check_writable(config_dict, resume=False)
    # A file task's problems (its files, its partition) come before the model and the pool are built.
    layout = task_layout(config) if trainer is not None or config.task.data is not None else None
    data = None if layout is None else federated_data(config, layout)
    if trainer is None:
        trainer, layout = build_trainer(config, device=device, progress=progress, layout=layout)
    if data is None:
        data = federated_data(config, layout)
    fingerprint = config_fingerprint(config)
    strategy = SmartFedStrategy(
        config, trainer, data.evaluation, fingerprint=fingerprint, partitions=data.clients,
        setup_json=json.dumps(config_dict), timeout=timeout, aggregate=aggregate, validation=data.validation,
        root=data.root,
    )
    if resume:
        checkpoint = run_dir.resume_checkpoint(config=config, pool_fingerprint=trainer.pool_fingerprint,
                                               torch_threads=torch.get_num_threads())
        strategy.restore(checkpoint)
        run_dir.rebuild_metrics(strategy.history, strategy.state.round)
    else:
        run_dir.start_fresh(config_dict)
    return Run(config=config, trainer=trainer, layout=layout, data=data, strategy=strategy, run_dir=run_dir,
               progress=progress, client_evaluation=client_evaluation)


def in_process_grid(run: Run):
    """The run's clients in this process; with the config's ``faults``, wrapped by the fault
    harness (``FaultInjectingGrid``)."""
    client = FederatedClient(run.trainer, run.data, run.config)
    fed = run.config.federation
    grid = InProcessGrid(client, fed.num_clients, client_timeout_s=fed.client_timeout_s)
    if not run.config.faults:
        return grid
    return FaultInjectingGrid(grid, run.config.faults, client_timeout_s=fed.client_timeout_s,
                              wire_dtype=run.config.communication.wire_dtype, seed=run.config.seed)


def run_in_process(config, output_dir, *, resume=False, stop_after_round=None, progress=True, trainer=None,
                   device="cpu") -> Run:
    """Run (or with ``resume`` continue) the rounds of ``config`` into ``output_dir`` in this
    process; returns the ``Run`` (its ``state`` and ``history``)."""
    run = open_run(config, output_dir, resume=resume, progress=progress, trainer=trainer, device=device)
    run.start_in_process(stop_after_round=stop_after_round)
    return run
