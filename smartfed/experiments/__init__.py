"""Experiment drivers above the federated engine: train, sweep, pool builder, expert usage, report.

They compose what the engine is handed (tasks from ``smartfed.tasks``, methods, models) and are the
only modules, with the CLI, that import both the engine and the tasks. The composition itself:
``methods`` (the methods by name), ``assets`` (base model, task layout, synthetic pool), ``runs``
(a run from its config, driven in-process) and ``flower_apps`` (the Flower ClientApp and
ServerApp, which drive the same strategy over Flower's grid).
"""
