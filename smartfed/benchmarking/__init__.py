"""The kernel benchmark, in one package: the `smartfed bench` command (command.py) and its GPU check
(gpu_check.py), providers, shapes, timing, work model, targets and reports.

Kept free of heavy imports at package level so that building the CLI parser stays cheap.
"""
