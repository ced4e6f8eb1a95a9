"""The ``TextTask`` container and the tokenization helpers every task shares."""

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class TextTask:
    name: str
    label_words: tuple  # the answer text of each class, e.g. " business"
    label_token_ids: tuple  # one token id per class
    train_input_ids: torch.Tensor  # [M, L] int64; the answer follows the last position
    train_labels: torch.Tensor  # [M] class ids
    eval_input_ids: torch.Tensor  # [M_eval, L]
    eval_labels: torch.Tensor  # [M_eval]
    description: str = ""

    @property
    def num_labels(self):
        return len(self.label_token_ids)

    def fingerprint(self) -> str:
        """Hash of everything a model trained on this task sees (ids, labels, label tokens)."""
        digest = hashlib.sha256(self.name.encode())
        for tensor in (self.train_input_ids, self.train_labels, self.eval_input_ids, self.eval_labels):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
        digest.update(repr(self.label_token_ids).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "name": self.name, "labels": list(self.label_words), "label_token_ids": list(self.label_token_ids),
            "train_examples": int(self.train_labels.numel()), "eval_examples": int(self.eval_labels.numel()),
            "prompt_tokens": int(self.train_input_ids.shape[1]), "fingerprint": self.fingerprint(),
        }


def _encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def label_token_ids(tokenizer, label_words):
    """The single token id of each label word; a word that takes several tokens is an error
    (the harness scores one answer token)."""
    ids = []
    for word in label_words:
        tokens = _encode(tokenizer, word)
        if len(tokens) != 1:
            raise ValueError(
                f"label word {word!r} must be a single token for this tokenizer, got {len(tokens)} tokens {tokens}"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(label_words)} map to repeated token ids {ids}")
    return tuple(ids)


def encode_fixed_length(tokenizer, prompts, *, suffix="", max_prompt_tokens=None):
    """Token ids ``[M, L]`` of ``prompt + suffix`` for every prompt, all of one length L.

    With ``max_prompt_tokens`` each prompt is cut to its first ``max_prompt_tokens`` tokens before
    the suffix (prompts shorter than that are an error, so every row is real text). Without it,
    shorter prompts are left-padded by repeating the tokenizer's encoding of a newline: the
    harness feeds no attention mask, so padding must be ordinary, harmless text.
    """
    suffix_ids = _encode(tokenizer, suffix) if suffix else []
    rows = []
    for index, prompt in enumerate(prompts):
        ids = _encode(tokenizer, prompt)
        if max_prompt_tokens is not None:
            if len(ids) < max_prompt_tokens:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens, fewer than max_prompt_tokens={max_prompt_tokens}"
                )
            ids = ids[:max_prompt_tokens]
        rows.append(ids + suffix_ids)
    if not rows:
        raise ValueError("prompts must hold at least one prompt")
    length = max(len(row) for row in rows)
    if any(len(row) != length for row in rows):
        newline = _encode(tokenizer, "\n")
        if not newline:
            raise ValueError("prompts differ in length and the tokenizer has no token for a newline to pad with")
        rows = [[newline[0]] * (length - len(row)) + row for row in rows]
    return torch.tensor(rows, dtype=torch.long)
