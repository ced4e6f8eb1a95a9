"""Kernel benchmark pieces behind `smartfed bench`: shapes, providers, timing, work model, reports.

Kept free of heavy imports at package level so that building the CLI parser stays cheap.
"""
