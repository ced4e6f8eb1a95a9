"""Every config the repository ships validates as what it is (run config, sweep config or pool
spec), and the worked example's pool is the committed one, so it runs on any CPU without a build."""

import json
from pathlib import Path

import pytest

from smartfed.config import load_config, read_yaml
from smartfed.experiments.pool_builder import load_spec
from smartfed.experiments.sweep import sweep_runs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("examples/*/*.yaml")])


def kind(path):
    data = read_yaml(path)
    if "sweep" in data:
        return "sweep"
    return "pool" if "adapters" in data else "run"


def test_the_shipped_configs_are_found():
    assert {path.name for path in SHIPPED} >= {"tiny.yaml", "demo.yaml", "paper_small.yaml", "protocol_v2.yaml",
                                                "public_pool.yaml", "public_pool_v2.yaml", "headlines.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(ROOT)))
def test_a_shipped_config_validates(path):
    which = kind(path)
    if which == "pool":
        assert load_spec(path)["adapters"]
    elif which == "sweep":
        assert sweep_runs(read_yaml(path), source=str(path))
    else:
        assert load_config(path).method


def test_the_worked_example_uses_the_committed_pool():
    config = load_config(ROOT / "examples" / "headlines" / "headlines.yaml")
    manifest = json.loads((ROOT / "pools" / "public_v1" / "manifest.json").read_text())
    committed = {adapter["name"] for adapter in manifest["adapters"]}
    assert config.pool.paths
    for path in config.pool.paths:
        assert Path(path).parts[:2] == ("pools", "public_v1") and Path(path).name in committed
        assert (ROOT / path / "adapter_model.safetensors").is_file()
