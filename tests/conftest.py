"""Shared fixtures: a tiny random Llama and real peft LoRA adapters trained and saved on it.

- ``make_tiny_llama(seed=0, **config_overrides)``: a fresh fp32 ``LlamaForCausalLM`` in eval
  mode (hidden 32, 2 layers, vocab 100); the same seed always gives the same weights.
- ``tiny_llama``: ``make_tiny_llama()``.
- ``make_lora_adapter(name, target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8, steps=3,
  seed=1, model_overrides=None, **lora_kwargs)``: wraps a fresh tiny Llama (built with
  ``model_overrides``) with peft, trains it ``steps`` AdamW steps on random tokens so lora_B is
  non-zero, saves it with ``save_pretrained`` under ``tmp_path / name`` and returns that folder.
- ``random_token_ids``: a fixed [2, 12] batch of token ids for the tiny Llama.

transformers and peft are imported inside the fixtures so test files that never use them do not
pay for the import.

Two processes: Triton turns ``@triton.jit`` kernels into compiled kernels or into its CPU
interpreter as they are defined, once per process (TRITON_INTERPRET=1). Tests marked
``interpreter`` run only where TRITON_INTERPRET=1, every other test only where it is not; the
default ``python -m pytest tests`` reaches the interpreter tests through
tests/test_interpreter_suite.py, which runs them in a child process.
"""

import os
import warnings

import pytest
import torch
from tiny_models import TINY_LLAMA

INTERPRETER_PROCESS = os.environ.get("TRITON_INTERPRET") == "1"


def build_tiny_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.float().eval()


@pytest.fixture
def make_tiny_llama():
    return build_tiny_llama


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def random_token_ids():
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=generator)


@pytest.fixture
def make_lora_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    def make(name="adapter", *, target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8, steps=3,
             seed=1, model_overrides=None, **lora_kwargs):
        base = build_tiny_llama(**(model_overrides or {}))
        config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                            lora_dropout=0.0, **lora_kwargs)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, config)
        if steps:
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
            generator = torch.Generator().manual_seed(seed)
            vocab = model.config.vocab_size
            for _ in range(steps):
                tokens = torch.randint(0, vocab, (2, 12), generator=generator)
                model(input_ids=tokens, labels=tokens).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        folder = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder)
        return folder

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine spinning
    OpenMP threads slow these runs down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_kernels():
    """The MoRE CPU kernel library: the test is skipped where it is not built -- and fails instead
    under SMARTFED_REQUIRE_CPU_KERNELS=1 (CI), so that kernels that do not build fail the run."""
    from smartfed_kernels.cpu import build

    library = build.load_library()
    if library is None:
        message = f"no MoRE CPU kernels here: {build.unavailable_reason()}"
        if build.kernels_required():
            pytest.fail(f"{message} ({build.REQUIRE_VARIABLE}=1)")
        pytest.skip(message)
    return library


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A pool cache shared by the tests of one module (pools are deterministic for a seed)."""
    return tmp_path_factory.mktemp("pool_cache")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        runs_here = (item.get_closest_marker("interpreter") is not None) == INTERPRETER_PROCESS
        (keep if runs_here else drop).append(item)
    if not drop:
        return
    if not keep:
        # Only tests of the other process were asked for: say how to run them instead of "no tests ran".
        if INTERPRETER_PROCESS:
            hint = "TRITON_INTERPRET=1 runs only the tests marked interpreter: run these without it"
        else:
            hint = ("these tests need Triton's CPU interpreter: "
                    "TRITON_INTERPRET=1 python -m pytest -m interpreter " + " ".join(config.args))
        raise pytest.UsageError(hint)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
