"""The layering rule of docs/design.md §3.2: imports point only downward.

    smartfed_kernels  <-  module layer  <-  federated engine  <-  baselines, experiments, CLI
    (the op layer)        (smartfed/__init__, errors, choices, staging,
                           layer, inject, adapter_config,
                           pool, routers, eeqa)
    smartfed/tasks: data only; the experiment layer or the CLI hands tasks to the engine.
    smartfed/config: torch-free; only the option names below it (smartfed.choices,
    smartfed.errors, smartfed_kernels.options), so that a config is checked before torch loads.
    smartfed/benchmarking: the op and the module layer only, no engine, experiments or CLI.

Every import in smartfed and smartfed_kernels is read from the source: module level, inside
functions and branches, relative ones, and ``importlib.import_module`` / ``__import__`` of a
literal name. A module loaded by a computed name cannot be checked, so only smartfed/cli.py (lazy
subcommands) may load smartfed modules that way.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("smartfed", "smartfed_kernels")
MODULE_LAYER = (
    "smartfed.errors", "smartfed.choices", "smartfed.staging", "smartfed.layer", "smartfed.inject",
    "smartfed.adapter_config", "smartfed.pool", "smartfed.routers", "smartfed.eeqa",
)
CONFIG_MAY_IMPORT = ("smartfed.config", "smartfed.choices", "smartfed.errors", "smartfed_kernels.options")
DYNAMIC_IMPORT_ALLOWED = ("smartfed.cli",)


def within(module, package):
    return module == package or module.startswith(package + ".")


def within_any(module, packages):
    return any(within(module, package) for package in packages)


def in_module_layer(module):
    # "smartfed" itself: its __init__ runs on every import of a module-layer module.
    return module == "smartfed" or within_any(module, MODULE_LAYER)


# (rule, does it apply to this importing module, is this imported module forbidden to it)
RULES = {
    "smartfed_kernels imports nothing from smartfed": (
        lambda module: within(module, "smartfed_kernels"),
        lambda target: within(target, "smartfed"),
    ),
    "the module layer imports from smartfed only the module layer": (
        in_module_layer,
        lambda target: within(target, "smartfed") and not in_module_layer(target),
    ),
    "the federated engine imports no tasks, experiments, baselines or CLI": (
        lambda module: within(module, "smartfed.federated"),
        lambda target: within_any(target, ("smartfed.tasks", "smartfed.experiments", "smartfed.baselines",
                                           "smartfed.cli")),
    ),
    "smartfed.config imports only smartfed.config, smartfed.choices, smartfed.errors and smartfed_kernels.options": (
        lambda module: within(module, "smartfed.config"),
        lambda target: within_any(target, PACKAGES) and target != "smartfed" and not within_any(target, CONFIG_MAY_IMPORT),
    ),
    "benchmarking imports no engine, baselines, experiments or CLI": (
        lambda module: within(module, "smartfed.benchmarking"),
        lambda target: within_any(target, ("smartfed.federated", "smartfed.baselines", "smartfed.experiments",
                                           "smartfed.cli", "smartfed.tasks")),
    ),
    "tasks (data only) import no engine, baselines, experiments or CLI": (
        lambda module: within(module, "smartfed.tasks"),
        lambda target: within_any(target, ("smartfed.federated", "smartfed.baselines", "smartfed.experiments",
                                           "smartfed.cli")),
    ),
}


def module_of(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name):
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def absolute(name, level, importer, importer_is_package):
    if not level:
        return name
    package = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def is_dynamic_import(call):
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def dynamic_target(call):
    """The module a dynamic import loads, or None when its name is computed."""
    argument = call.args[0] if call.args else None
    if not (isinstance(argument, ast.Constant) and isinstance(argument.value, str)):
        return None
    name = argument.value
    level = len(name) - len(name.lstrip("."))
    if not level:
        return name
    package = next((kw.value.value for kw in call.keywords
                    if kw.arg == "package" and isinstance(kw.value, ast.Constant)), None)
    return absolute(name[level:], level, package, True) if isinstance(package, str) else None


def scan_imports(source, importer, importer_is_package=False):
    """(line, imported module or None for a computed name, "import" or "dynamic") for every
    import in ``source``, in line order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, "import") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level, importer, importer_is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if is_module(submodule) else base, "import"))
        elif isinstance(node, ast.Call) and is_dynamic_import(node):
            found.append((node.lineno, dynamic_target(node), "dynamic"))
    return sorted(found, key=lambda record: record[0])


def package_imports():
    """(file:line, source line, importing module, imported module or None, how) over both packages."""
    records = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            importer = module_of(path)
            for line, target, how in scan_imports(source, importer, path.name == "__init__.py"):
                where = f"{path.relative_to(ROOT)}:{line}"
                records.append((where, lines[line - 1].strip(), importer, target, how))
    return records


@pytest.fixture(scope="module")
def imports():
    return package_imports()


@pytest.mark.parametrize("rule", list(RULES))
def test_imports_point_downward(rule, imports):
    applies, forbidden = RULES[rule]
    importers = {importer for _, _, importer, _, _ in imports if applies(importer)}
    assert importers, f"{rule}: no module of the repository is under this rule (was a package moved?)"
    offending = [f"  {where}: {text}  -> {target}" for where, text, importer, target, _ in imports
                 if applies(importer) and target is not None and forbidden(target)]
    if offending:
        pytest.fail(f"{rule}; {len(offending)} import(s) break it:\n" + "\n".join(offending), pytrace=False)


def test_no_module_loads_smartfed_by_string(imports):
    offending = [
        f"  {where}: {text}  -> {target or 'a computed name'}"
        for where, text, importer, target, how in imports
        if how == "dynamic" and not within_any(importer, DYNAMIC_IMPORT_ALLOWED)
        and (target is None or within_any(target, PACKAGES))
    ]
    if offending:
        pytest.fail("only smartfed/cli.py may load smartfed modules by name (importlib.import_module / "
                    "__import__); elsewhere an import statement keeps the arrow visible:\n" + "\n".join(offending),
                    pytrace=False)


@pytest.mark.parametrize("module", ["smartfed.config", "smartfed.choices", "smartfed.errors", "smartfed.adapter_config",
                                    "smartfed.experiments.flower_settings", "smartfed.experiments.pool_spec",
                                    "smartfed.experiments.sweep_schema"])
def test_configuration_modules_import_no_torch(module):
    """Checked by importing, in a fresh interpreter: what the config imports at run time, whatever
    the source says."""
    code = (f"import sys; import {module}; "
            "heavy = [m for m in ('torch', 'transformers', 'flwr', 'peft', 'safetensors') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_scanner_sees_every_import_form():
    source = '''
import smartfed.tasks.bbc_news
from smartfed import inject_more
from .protocol import ClientResult
from .. import layer
from ..tasks import load_task

def later():
    if True:
        from smartfed.experiments import sweep
    importlib.import_module("smartfed.baselines.fedit")
    import_module(".skills", package="smartfed.tasks")
    __import__(name)
'''
    assert scan_imports(source, "smartfed.federated.client") == [
        (2, "smartfed.tasks.bbc_news", "import"),
        (3, "smartfed", "import"),
        (4, "smartfed.federated.protocol", "import"),
        (5, "smartfed.layer", "import"),
        (6, "smartfed.tasks", "import"),
        (10, "smartfed.experiments.sweep", "import"),
        (11, "smartfed.baselines.fedit", "dynamic"),
        (12, "smartfed.tasks.skills", "dynamic"),
        (13, None, "dynamic"),
    ]
