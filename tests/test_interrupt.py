"""Ctrl-C (issue 25 item 1): ``smartfed train`` interrupted anywhere exits 130 with one line,
never "terminate called without an active exception" / Aborted, and ``--resume`` then ends on
the routers of an uninterrupted run.

Each case runs ``smartfed train`` in a child process that stops at one point of round 2 (inside a
client step, which runs in the in-process grid's worker thread since configs/tiny.yaml sets
``federation.client_timeout_s``; inside the write of a checkpoint's state.json; inside the
central evaluation), announces it on stderr and waits there; the test then sends SIGINT.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smartfed.federated.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "@@ interrupt me"
CHILD = r"""
import sys, time
from pathlib import Path

marker, point = Path(sys.argv[1]), sys.argv[2]
calls = {"n": 0}


def stop_at(nth):
    # Waits inside torch's C++ code, as a real step does: a thread torn down there at exit aborts.
    calls["n"] += 1
    if calls["n"] == nth:
        import torch

        print("@@ interrupt me", file=sys.stderr, flush=True)
        marker.write_text("here")
        deadline = time.monotonic() + 120
        a = torch.randn(256, 256)
        while time.monotonic() < deadline:
            a = torch.tanh(a @ a)


if point == "client step":
    from smartfed.federated import trainer

    train = trainer.ClientTrainer.train

    def patched(self, *args, **kwargs):
        stop_at(6)  # round 2 (4 clients a round), its second client
        return train(self, *args, **kwargs)

    trainer.ClientTrainer.train = patched
elif point == "checkpoint write":
    from smartfed.federated import checkpoint

    write = checkpoint.fsync_write

    def patched(path, data):
        if Path(path).name == "state.json":
            stop_at(2)  # the checkpoint of round 2
        return write(path, data)

    checkpoint.fsync_write = patched
elif point == "evaluation":
    from smartfed.federated import trainer

    evaluate = trainer.ClientTrainer.evaluate

    def patched(self, *args, **kwargs):
        stop_at(2)  # the central evaluation of round 2
        return evaluate(self, *args, **kwargs)

    trainer.ClientTrainer.evaluate = patched

from smartfed.cli import main

sys.exit(main(sys.argv[3:]))
"""


def train_command(output, cache_dir, *extra):
    return ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--output", str(output), "--no-progress",
            "--threads", "1", "--set", f"pool.cache_dir={cache_dir}", *extra]


def child(marker, point, arguments):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(marker), point, *arguments], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    output = root / "uninterrupted"
    finished = child(root / "never", "none", train_command(output, root / "pool"))
    _, err = finished.communicate(timeout=600)
    assert finished.returncode == 0, err[-3000:]
    return root, load_checkpoint(output)


@pytest.mark.parametrize("point", ["client step", "checkpoint write", "evaluation"])
def test_ctrl_c_exits_130_with_one_line_and_resume_ends_like_an_uninterrupted_run(reference, point, tmp_path):
    root, expected = reference
    output, marker = tmp_path / "run", tmp_path / "marker"
    running = child(marker, point, train_command(output, root / "pool"))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert running.poll() is None, running.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child never reached the point"
        time.sleep(0.1)
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=120)
    assert running.returncode == 130, err[-3000:]
    after = err.split(SENTINEL + "\n", 1)[1]
    assert after == "smartfed train: interrupted\n"

    resumed = subprocess.run([sys.executable, "-m", "smartfed.cli", *train_command(output, root / "pool", "--resume")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(output)
    assert final.round == expected.round == 4
    for name, tensor in expected.global_state.items():
        assert torch.equal(final.global_state[name], tensor), name
