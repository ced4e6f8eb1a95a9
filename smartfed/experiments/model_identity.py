"""What a base model folder is, for the public pool's inputs hash: weights, shapes, the
architecture settings that change the forward, and the tokenizer's token ids.

``model_fingerprint`` (``v2-`` and 16 hex digits) hashes what a model *is*, not its files'
bytes: every tensor's name, dtype, shape and raw data from the safetensors payload (never the
header's metadata), a fixed list of architecture settings from ``config.json`` (not
``transformers_version``, ``dtype`` / ``torch_dtype`` or other bookkeeping a newer release writes
differently for the same weights; ``rope_theta`` read from either place transformers keeps it,
``head_dim`` derived when absent), and the tokenizer's vocabulary (token -> id), merges and
added tokens. The same weights saved by another transformers release give the same fingerprint.

``legacy_model_fingerprint`` is the hash of the whole files that adapters built before this
scheme recorded; it still identifies the folder while those files are unchanged.
Standard library only: no model is loaded.
"""

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

SCHEME = "v2-"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Tokenizer files other than tokenizer.json, hashed whole when it is absent.
OTHER_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")
ARCHITECTURE_KEYS = (
    "model_type", "architectures", "hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
)
MAX_HEADER_BYTES = 100 * 1024 * 1024
_BLOCK = 1 << 24


def _architecture(model_dir: Path) -> dict:
    config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    extra = {key: value for key, value in rope.items() if key not in ("rope_theta", "rope_type")}
    if config.get("rope_scaling") is None and extra:
        config["rope_scaling"] = {**extra, "rope_type": rope.get("rope_type")}
    if config.get("head_dim") is None and config.get("hidden_size") and config.get("num_attention_heads"):
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return {key: config.get(key) for key in ARCHITECTURE_KEYS}


def _hash_file(digest, path: Path, start=0, length=None) -> None:
    with open(path, "rb") as handle:
        handle.seek(start)
        left = length
        while left is None or left > 0:
            block = handle.read(_BLOCK if left is None else min(_BLOCK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)


def _hash_safetensors(digest, path: Path) -> None:
    """Every tensor's name, dtype, shape and data, in name order; the header's metadata is left out."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {size} bytes")
        header = json.loads(handle.read(size))
    start = 8 + size
    for name in sorted(key for key in header if key != "__metadata__"):
        entry = header[name]
        begin, end = entry["data_offsets"]
        digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
        _hash_file(digest, path, start + begin, end - begin)


def _tokenizer(model_dir: Path, digest) -> None:
    path = model_dir / TOKENIZER_FILE
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        merges = [merge.split(" ", 1) if isinstance(merge, str) else list(merge) for merge in model.get("merges") or ()]
        added = sorted((token.get("id"), token.get("content"), bool(token.get("special")))
                       for token in data.get("added_tokens") or ())
        identity = {"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges, "added": added}
        digest.update(json.dumps(identity, sort_keys=True).encode())
        return
    for name in OTHER_TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode())
            _hash_file(digest, model_dir / name)


def model_fingerprint(model_dir) -> str:
    """``v2-`` and 16 hex digits identifying the weights, architecture and tokenizer of the
    Hugging Face model folder ``model_dir``."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    digest.update(json.dumps(_architecture(model_dir), sort_keys=True).encode())
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".safetensors":
            digest.update(path.name.encode())
            _hash_safetensors(digest, path)
        elif path.suffix == ".bin":
            digest.update(path.name.encode())
            _hash_file(digest, path)
    _tokenizer(model_dir, digest)
    return SCHEME + digest.hexdigest()[:16]


def legacy_model_fingerprint(model_dir) -> str:
    """The scheme before ``v2-``: the hash of the folder's config.json and weight files, bytes and all."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.name == CONFIG_FILE or path.suffix in (".safetensors", ".bin"):
            digest.update(path.name.encode())
            _hash_file(digest, path)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """A model folder's fingerprint and the legacy one its earlier adapters may record."""

    fingerprint: str
    legacy: str

    @classmethod
    def of(cls, model_dir) -> "ModelIdentity":
        return cls(model_fingerprint(model_dir), legacy_model_fingerprint(model_dir))
