"""Experiment drivers above the federated engine: train, sweep, pool builder, expert usage, report.

They compose what the engine is handed (tasks from ``smartfed.tasks``, methods, models) and are the
only modules, with the CLI, that import both the engine and the tasks.
"""
