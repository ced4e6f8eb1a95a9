"""The README's "Using it" snippets run as written, in a fresh folder, in the order a reader meets them."""

import re
import shlex
from pathlib import Path

import pytest

from smartfed.cli import SUBCOMMANDS, main

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def _blocks(language):
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def _smartfed_lines():
    return [line.strip() for body in _blocks("bash") for line in body.replace("\\\n", " ").splitlines()
            if line.strip().startswith("smartfed ")]


def test_every_smartfed_command_in_the_readme_exists():
    commands = {shlex.split(line)[1] for line in _smartfed_lines()}
    assert commands, "the README shows no smartfed command"
    assert commands <= set(SUBCOMMANDS), commands - set(SUBCOMMANDS)


def test_using_it_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    asset_lines = [line for line in _smartfed_lines() if line.startswith("smartfed tiny-assets")]
    assert len(asset_lines) == 1
    assert main(shlex.split(asset_lines[0])[1:] + ["--no-progress"]) == 0
    namespace = {}
    snippets = _blocks("python")
    assert len(snippets) >= 2
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    capsys.readouterr()
    assert namespace["logits"].shape[:2] == (1, 4)
    trainable = {name for name, parameter in namespace["model"].named_parameters() if parameter.requires_grad}
    assert namespace["state"] and set(namespace["state"]) == trainable
    assert (tmp_path / "routers").is_dir()
    reference = pytest.importorskip("smartfed_kernels.reference")
    expected = reference.more_linear(*(namespace[name].double() for name in (
        "x", "weight", "bias", "router_weight", "router_bias", "expert_a", "expert_b")), 4)
    assert namespace["y"].shape == (namespace["T"], namespace["d_out"])
    assert (namespace["y"].double() - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_tiny_assets_refuse_an_existing_folder(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    assert main(["tiny-assets", "--output", str(tmp_path / "mine"), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
