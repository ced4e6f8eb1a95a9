"""Per-item scores (smartfed.experiments.item_scores): every held-out item is scored, the items'
mean is the engine's own score, and the base model's means are those of the frozen model."""

from types import SimpleNamespace

import pytest
import torch

from smartfed.experiments.item_scores import base_model_means, item_scores
from smartfed.federated.data import ClassificationSequences, InstructionExamples
from smartfed.federated.evaluation import GenerationSettings


def random_sequences(generator, count, low, high, vocab=100):
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]


LABEL_IDS = [5, 17, 42]


def classification_examples(seed, count):
    """(examples, their prompts, their labels): ``count`` random prompts of 1-7 tokens, 3 labels."""
    generator = torch.Generator().manual_seed(seed)
    prompts = random_sequences(generator, count, 1, 7)
    labels = torch.randint(0, 3, (count,), generator=generator).tolist()
    return ClassificationSequences.build(prompts, labels, pad_token_id=1), prompts, labels


def decode(ids):
    return " ".join(str(token) for token in ids)


def instruction_examples(max_examples, count=7):
    generator = torch.Generator().manual_seed(11)
    prompts, responses = random_sequences(generator, count, 1, 6), random_sequences(generator, count, 1, 3)
    settings = GenerationSettings(every_rounds=1, max_new_tokens=3, batch_size=3, decode=decode,
                                  max_examples=max_examples, metrics=("exact_match", "f1"))
    return InstructionExamples.build([p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts],
                                     pad_token_id=1, references=[decode(r) for r in responses], generation=settings)


@torch.no_grad()
def test_instruction_items_are_the_engine_answers_and_cover_every_example(tiny_llama):
    examples = instruction_examples(max_examples=None)
    columns = item_scores(tiny_llama, examples, label_token_ids=(), batch_size=4, device="cpu")
    engine = examples.generated_scores(tiny_llama, "cpu")
    assert len(columns["prediction"]) == len(examples) == engine["generated_examples"]
    assert sum(columns["exact_match"]) / len(examples) == pytest.approx(engine["exact_match"])
    assert sum(columns["f1"]) / len(examples) == pytest.approx(engine["f1"])
    assert "rouge_l" not in columns
    # Each answer is the model's greedy continuation of its own prompt.
    for row in (0, len(examples) - 1):
        ids = examples.prompts(torch.tensor([row]))[0]
        for _ in range(3):
            ids.append(int(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert columns["prediction"][row] == decode(ids[-3:])
    # max_examples bounds the generation during training only: the items still cover every example.
    capped = item_scores(tiny_llama, instruction_examples(max_examples=2), label_token_ids=(), batch_size=4,
                         device="cpu")
    assert capped["prediction"] == columns["prediction"]


@torch.no_grad()
def test_classification_items_hold_the_argmax_and_the_margin_to_the_runner_up(tiny_llama):
    examples, prompts, labels = classification_examples(12, 9)
    columns = item_scores(tiny_llama, examples, label_token_ids=LABEL_IDS, batch_size=4, device="cpu")
    for row, prompt in enumerate(prompts):
        scores = tiny_llama(input_ids=torch.tensor([prompt])).logits[0, -1, LABEL_IDS]
        top = torch.topk(scores, 2).values
        assert columns["prediction"][row] == int(scores.argmax())
        assert columns["correct"][row] == int(int(scores.argmax()) == labels[row])
        assert columns["margin"][row] == pytest.approx(float(top[0] - top[1]), abs=1e-4)


def test_base_model_means_are_the_frozen_models_item_means_once_per_process():
    from smartfed.config import config_from_dict
    from smartfed.experiments.assets import build_base_model

    config = config_from_dict({"seed": 5, "model": {"tiny": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}}})
    generator = torch.Generator().manual_seed(13)
    prompts = random_sequences(generator, 12, 2, 6)
    labels = torch.randint(0, 2, (12,), generator=generator).tolist()
    evaluation = ClassificationSequences.build(prompts, labels, pad_token_id=1)
    task = SimpleNamespace(fingerprint="test-base-means", label_token_ids=[7, 9])
    means = base_model_means(config, task, evaluation)
    with torch.no_grad():
        expected = item_scores(build_base_model(config.model, config.seed), evaluation, label_token_ids=[7, 9],
                               batch_size=4, device="cpu")
    assert means == {"base_accuracy": sum(expected["correct"]) / 12}
    means["base_accuracy"] = -1.0  # a caller's change does not reach the cache
    assert base_model_means(config, task, evaluation) == {"base_accuracy": sum(expected["correct"]) / 12}


@torch.no_grad()
def test_an_evaluation_with_items_answers_once_when_its_answers_cover_every_example(tiny_llama, monkeypatch):
    import smartfed.federated.data as data

    calls = []
    real = data.greedy_generate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "greedy_generate", counted)
    examples = instruction_examples(max_examples=None)
    scores = examples.evaluate(tiny_llama, label_token_ids=(), batch_size=4, device="cpu", items=True)
    batches = -(-len(examples) // examples.generation.batch_size)
    assert len(calls) == batches
    assert scores["items"] == examples.answer_items(tiny_llama, "cpu")
    assert sum(scores["items"]["exact_match"]) / len(examples) == pytest.approx(scores["exact_match"])
    # Answers bounded by max_examples do not cover every example: the items answer all of them.
    calls.clear()
    capped = instruction_examples(max_examples=2)
    scores = capped.evaluate(tiny_llama, label_token_ids=(), batch_size=4, device="cpu", items=True)
    assert scores["generated_examples"] == 2 and len(calls) == 1 + batches
    assert scores["items"]["prediction"] == examples.answer_items(tiny_llama, "cpu")["prediction"]


@torch.no_grad()
def test_classification_items_make_up_the_evaluations_accuracy(tiny_llama):
    examples, _, _ = classification_examples(14, 11)
    plain = examples.evaluate(tiny_llama, label_token_ids=LABEL_IDS, batch_size=4, device="cpu")
    scores = examples.evaluate(tiny_llama, label_token_ids=LABEL_IDS, batch_size=4, device="cpu", items=True)
    assert {key: value for key, value in scores.items() if key != "items"} == plain
    assert sum(scores["items"]["correct"]) == round(plain["accuracy"] * len(examples))
