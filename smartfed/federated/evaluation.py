"""Generated answers and their scores, for the instruction shape's held-out examples.

``greedy_generate`` decodes a batch of prompts of any lengths together: left padding, an
attention mask and position ids counted over the real tokens only (so a padded prompt is
continued exactly as it would be alone), the key/value cache, and per-example stopping on a stop
token or after ``max_new_tokens``. ``answer_scores`` compares decoded answers with the
references: exact match after SQuAD's normalisation (lower case, punctuation and the articles
a / an / the removed, whitespace collapsed), SQuAD's token-level F1 on those normalised tokens,
and ROUGE-L's F-measure from Google's ``rouge-score`` package (its own tokenizer, no stemming).
"""

import collections
import re
import string
from dataclasses import dataclass, field

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """SQuAD v1.1's answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction, reference):
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction, reference):
    """SQuAD's F1 over normalised tokens (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def answer_columns(predictions, references, metrics=("exact_match", "f1", "rouge_l")):
    """Each of ``metrics`` for every (prediction, reference) pair, in their order."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"predictions and references must be non-empty and of one length, got {len(predictions)} "
                         f"and {len(references)}")
    unknown = sorted(set(metrics) - {"exact_match", "f1", "rouge_l"})
    if unknown:
        raise ValueError(f"metrics must be among exact_match, f1, rouge_l, got {unknown}")
    columns = {}
    if "exact_match" in metrics:
        columns["exact_match"] = list(map(exact_match, predictions, references))
    if "f1" in metrics:
        columns["f1"] = list(map(token_f1, predictions, references))
    if "rouge_l" in metrics:
        scorer = _rouge_scorer()
        columns["rouge_l"] = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return columns


def answer_scores(predictions, references, metrics=("exact_match", "f1", "rouge_l")):
    """Mean of each of ``metrics`` over the (prediction, reference) pairs."""
    return {name: sum(values) / len(predictions)
            for name, values in answer_columns(predictions, references, metrics).items()}


def left_padded(sequences, pad_token_id, *, width=None):
    """(ids [B, W] with each sequence at the right end, mask [B, W]); W = the longest (or ``width``)."""
    width = max(len(ids) for ids in sequences) if width is None else width
    ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence):] = torch.as_tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence):] = 1
    return ids, mask


def positions(mask):
    """Position ids that count real tokens only (padding gets 0): a left-padded row sees the
    positions it would see unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_generate(model, prompts, *, max_new_tokens, stop_token_ids, pad_token_id, device="cpu"):
    """The greedy continuation of each prompt (token id lists): at most ``max_new_tokens`` ids
    each, ending before the first stop token (which is not returned)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    stops = torch.as_tensor(list(stop_token_ids) or [-1], device=device)
    ids, mask = (t.to(device) for t in left_padded(prompts, pad_token_id))
    position = positions(mask)
    outputs = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    # transformers renamed the key/value cache from past_key_values to cache (both in and out).
    cache_key = "cache" if "cache" in getattr(type(outputs), "__dataclass_fields__", {}) else "past_key_values"
    generated = torch.empty((len(prompts), 0), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    lengths = torch.zeros(len(prompts), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = outputs.logits[:, -1, :].argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, int(pad_token_id)), token)
        finished = finished | torch.isin(token, stops)
        lengths += ~finished
        generated = torch.cat([generated, token[:, None]], dim=1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position[:, -1:] + 1
        outputs = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                        **{cache_key: getattr(outputs, cache_key)})
    return [generated[row, :int(lengths[row])].tolist() for row in range(len(prompts))]


@dataclass
class GenerationSettings:
    """When and how the held-out examples are answered by generation (``GenerationSection`` of
    the data config, plus the task's tokens): at rounds divisible by ``every_rounds``; ``decode``
    turns generated ids into text."""

    every_rounds: int
    max_new_tokens: int
    batch_size: int
    decode: object = field(repr=False)
    stop_token_ids: tuple = ()
    max_examples: int = None
    metrics: tuple = ("exact_match", "f1", "rouge_l")

    def due(self, round_index):
        """Generate at ``round_index`` (None: a standalone evaluation, which always does unless
        ``every_rounds`` is 0)?"""
        if self.every_rounds == 0:
            return False
        return round_index is None or round_index % self.every_rounds == 0


def is_test_round(round_index, every_rounds, last_round):
    """Score the test split at ``round_index``: every ``every_rounds`` rounds and at the last one
    (None: a standalone evaluation, which always does)."""
    return round_index is None or round_index % every_rounds == 0 or round_index >= last_round
