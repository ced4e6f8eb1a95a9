"""Training and scoring on file tasks (smartfed.federated.data, evaluation, trainer): the padded,
batched computations against brute force on each example alone; every method on both shapes; any
causal LM folder; a federated round that logs the instruction scores."""

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from tiny_data import build_tokenizer, classification_rows, instruction_rows, save_tiny_model, write_rows

from smartfed.federated.accounting import PeakMemory
from smartfed.federated.data import ClassificationSequences, InstructionExamples, length_bucketed_batches
from smartfed.federated.evaluation import answer_scores, exact_match, greedy_generate, normalize_answer, token_f1
from smartfed.tasks.file_task import load_file_task
from smartfed.config.data import DataSection

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_sequences(generator, count, low, high, vocab=100):
    return [torch.randint(3, vocab, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                          generator=generator).tolist() for _ in range(count)]


def full_log_probs(model, ids):
    """log p(token t | tokens < t) for every position t >= 1 of one unpadded sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def test_multi_token_label_scores_equal_brute_force_log_likelihood(tiny_llama):
    generator = torch.Generator().manual_seed(3)
    prompts = random_sequences(generator, 7, 1, 9)
    answers = ((11,), (12, 13), (14, 15, 16), (12, 17))  # lengths 1..3, two sharing a first token
    labels = torch.randint(0, len(answers), (7,), generator=generator).tolist()
    examples = ClassificationSequences.build(prompts, labels, pad_token_id=0, answer_tokens=3)
    scores = examples.label_scores(tiny_llama, torch.arange(7), answers, "cpu")
    brute = torch.zeros(7, len(answers))
    for row, prompt in enumerate(prompts):
        for k, answer in enumerate(answers):
            log_probs = full_log_probs(tiny_llama, prompt + list(answer))
            brute[row, k] = sum(log_probs[len(prompt) - 1 + t] for t in range(len(answer)))
    torch.testing.assert_close(scores, brute, rtol=1e-5, atol=1e-5)
    metrics = examples.evaluate(tiny_llama, label_token_ids=answers, batch_size=3, device="cpu")
    expected_loss = -float(brute[torch.arange(7), torch.tensor(labels)].mean())
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((brute.argmax(1) == torch.tensor(labels)).float().mean()))
    loss, _ = examples.training_loss(tiny_llama, torch.arange(7), label_token_ids=answers, device="cpu")
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)


@torch.no_grad()
def test_single_token_labels_score_the_last_position_of_each_unpadded_prompt(tiny_llama):
    generator = torch.Generator().manual_seed(4)
    prompts = random_sequences(generator, 6, 1, 8)
    labels = [0, 1, 2, 1, 0, 2]
    label_ids = (21, 22, 23)
    examples = ClassificationSequences.build(prompts, labels, pad_token_id=0)
    metrics = examples.evaluate(tiny_llama, label_token_ids=label_ids, batch_size=4, device="cpu")
    losses, correct = [], 0
    for prompt, label in zip(prompts, labels):
        logits = tiny_llama(input_ids=torch.tensor([prompt])).logits[0, -1]
        losses.append(float(F.cross_entropy(logits[None], torch.tensor([label_ids[label]]))))
        correct += int(logits[list(label_ids)].argmax()) == label
    assert metrics["loss"] == pytest.approx(sum(losses) / 6, rel=1e-5)
    assert metrics["accuracy"] == correct / 6


def test_response_only_loss_equals_a_hand_computed_loss_and_its_gradient(make_tiny_llama):
    model = make_tiny_llama()
    generator = torch.Generator().manual_seed(5)
    prompts = random_sequences(generator, 5, 1, 7)
    responses = random_sequences(generator, 5, 1, 4)
    examples = InstructionExamples.build([p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts],
                                         pad_token_id=0)
    index = torch.tensor([4, 0, 2, 3])
    loss, fed = examples.training_loss(model, index, label_token_ids=(), device="cpu")
    assert fed == 4 * max(len(prompts[i]) + len(responses[i]) for i in index.tolist())
    twin = make_tiny_llama()
    total, count = 0.0, 0
    for i in index.tolist():
        # Cross-entropy of each response token given everything before it; prompt tokens carry no loss.
        logits = twin(input_ids=torch.tensor([prompts[i] + responses[i]])).logits[0]
        for t, token in enumerate(responses[i]):
            position = len(prompts[i]) + t - 1
            total = total - torch.log_softmax(logits[position], dim=-1)[token]
            count += 1
    expected = total / count
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_instruction_evaluation_reports_perplexity_and_token_accuracy(tiny_llama):
    generator = torch.Generator().manual_seed(6)
    prompts, responses = random_sequences(generator, 4, 2, 5), random_sequences(generator, 4, 1, 3)
    examples = InstructionExamples.build([p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts],
                                         pad_token_id=1)
    metrics = examples.evaluate(tiny_llama, label_token_ids=(), batch_size=3, device="cpu", round_index=2)
    nll, right, count = 0.0, 0, 0
    for prompt, response in zip(prompts, responses):
        logits = tiny_llama(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        nll += float(F.cross_entropy(logits, torch.tensor(response), reduction="sum"))
        right += int((logits.argmax(-1) == torch.tensor(response)).sum())
        count += len(response)
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert metrics["accuracy"] == right / count and metrics["num_examples"] == 4
    assert "exact_match" not in metrics  # no generation settings


@torch.no_grad()
def test_batched_generation_equals_each_prompt_alone_stops_on_eos_and_respects_the_cap(tiny_llama):
    generator = torch.Generator().manual_seed(7)
    prompts = random_sequences(generator, 5, 1, 8)

    def alone(prompt, steps):
        ids = list(prompt)
        for _ in range(steps):
            ids.append(int(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    free = greedy_generate(tiny_llama, prompts, max_new_tokens=6, stop_token_ids=(), pad_token_id=0)
    assert free == [alone(prompt, 6) for prompt in prompts]
    assert greedy_generate(tiny_llama, prompts, max_new_tokens=2, stop_token_ids=(), pad_token_id=0) == \
        [ids[:2] for ids in free]
    stop = free[0][2]  # the first prompt's third token becomes the stop token
    stopped = greedy_generate(tiny_llama, prompts, max_new_tokens=6, stop_token_ids=(stop,), pad_token_id=0)
    for got, full in zip(stopped, free):
        expected = full[:full.index(stop)] if stop in full else full
        assert got == expected
    assert stopped[0] == free[0][:2]


def test_answer_scores_follow_squad_normalisation_and_rouge_l():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat sat.", "Cat sat") == 1.0
    assert token_f1("cat sat on mat", "the cat sat") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))
    assert token_f1("", "") == 1.0 and token_f1("dog", "") == 0.0
    scores = answer_scores(["cat sat on the mat", "blue"], ["the cat sat", "red"])
    # ROUGE-L: LCS "cat sat" (2) over 5 predicted and 3 reference tokens (rouge-score keeps "the").
    precision, recall = 2 / 5, 2 / 3
    assert scores["rouge_l"] == pytest.approx((2 * precision * recall / (precision + recall)) / 2)
    assert scores["exact_match"] == 0.0
    with pytest.raises(ValueError, match="among exact_match"):
        answer_scores(["a"], ["a"], ["bleu"])


def test_length_buckets_visit_every_example_once_per_epoch_with_less_padding():
    generator = torch.Generator().manual_seed(8)
    lengths = torch.randint(5, 200, (96,), generator=generator)
    batches = length_bucketed_batches(lengths, 8, 12, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(96))
    examples = InstructionExamples.build([[1] * int(n) for n in lengths], [1] * 96, pad_token_id=0)
    random_batches = [torch.randperm(96, generator=generator)[:8] for _ in range(12)]
    assert examples.padding_share(batches) < 0.3 < examples.padding_share(random_batches)
    assert length_bucketed_batches(lengths, 8, 12, torch.Generator().manual_seed(0))[5].tolist() == batches[5].tolist()


def test_peak_memory_counts_what_the_block_allocated_every_time():
    for _ in range(2):  # the process-wide high-water mark would report 0 the second time
        with PeakMemory("cpu") as memory:
            block = torch.ones(8 * 1024 * 1024)  # 32 MiB, held past the end of the block
        assert memory.source in ("malloc_in_use_peak", "rss_peak")
        assert memory.peak_bytes >= 30 * 1024 * 1024
        del block
    with PeakMemory("cpu") as memory:
        block = torch.ones(8 * 1024 * 1024)
        time.sleep(0.5)  # hundreds of sampling intervals: the sampler sees it before it is freed
        del block
    assert memory.peak_bytes >= 30 * 1024 * 1024


def test_peak_memory_read_by_the_caller_needs_no_sampling_thread():
    """On a loaded machine the sampling thread may not run during a short block; the reads the
    measured code makes itself still see what it freed before the end."""
    with PeakMemory("cpu", interval_s=3600.0) as memory:
        block = torch.ones(8 * 1024 * 1024)
        memory.sample()
        del block
    assert memory.peak_bytes >= 30 * 1024 * 1024


# --- every method on both shapes -------------------------------------------------------------------

def file_task(tmp_path, shape):
    tokenizer = build_tokenizer(chat=True)
    if shape == "classification":
        path = write_rows(tmp_path / "c.jsonl", classification_rows(24))
        values = {"labels": ["sports", "business", "politics"],
                  "label_words": [" sports", " business news", " politics"]}
    else:
        path = write_rows(tmp_path / "i.jsonl", instruction_rows(24))
        values = {"generation": {"every_rounds": 1, "max_new_tokens": 3, "batch_size": 4}}
    data = TypeAdapter(DataSection).validate_python({"shape": shape, "train": str(path), **values})
    return load_file_task(data, tokenizer, cache_dir=tmp_path / "cache")


def tiny_config(cache_dir, method, router="linear", **federation):
    from smartfed.config import config_from_dict

    return config_from_dict({
        "seed": 3, "method": method, "model": {"tiny": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}},
        "task": {"train_examples": 64, "eval_examples": 16, "seq_len": 8},
        "pool": {"cache_dir": str(cache_dir), "train_steps": 3, "batch_size": 8},
        "more": {"router": router, "top_k": 2, "router_dim": 4},
        "federation": {"num_clients": 2, "rounds": 2, "min_clients": 2, "local_steps": 2, "batch_size": 4,
                       "min_examples_per_client": 2, "partition": "iid", **federation},
    })


def file_trainer(config, task):
    from smartfed.experiments.runs import build_trainer
    from smartfed.federated.trainer import ClientTrainer

    built, _ = build_trainer(config)
    return ClientTrainer(built.method, built.model, label_token_ids=task.label_token_ids,
                         pool_fingerprint=built.pool_fingerprint)


METHODS = [("smartfed", "linear"), ("smartfed", "expert_space"), ("smartfed", "projected"), ("fedit", "linear"),
           ("ffa_lora", "linear"), ("adapter_mixture", "linear"), ("linear_merge", "linear")]


@pytest.mark.parametrize("shape", ["classification", "instruction"])
@pytest.mark.parametrize("method, router", METHODS)
def test_every_method_trains_and_scores_on_both_shapes(tmp_path, cache_dir, method, router, shape):
    from smartfed.experiments.file_data import file_federated_data
    from smartfed.federated.protocol import ClientInstructions

    task = file_task(tmp_path, shape)
    config = tiny_config(cache_dir, method, router)
    trainer = file_trainer(config, task)
    data = file_federated_data(task, config.federation, seed=config.seed)
    state = trainer.initial_state()
    quotas = None if not trainer.method.uses_quotas else {name: 2 for name in trainer.max_per_matrix()}
    instructions = ClientInstructions(round=1, state=state, quotas=quotas, local_steps=2, batch_size=4, lr=0.05,
                                      seed=1)
    result = trainer.train(instructions, data.clients[0])
    assert any(not torch.equal(result.state[name], state[name]) for name in state)
    assert math.isfinite(result.metrics["loss"]) and result.metrics["peak_memory_bytes"] > 0
    scores = trainer.evaluate(result.state, quotas, data.evaluation, batch_size=4, round_index=1)
    assert 0 <= scores["accuracy"] <= 1 and math.isfinite(scores["loss"])
    if shape == "instruction":
        assert {"perplexity", "exact_match", "f1", "rouge_l"} <= set(scores)


def test_a_federated_run_logs_instruction_scores_at_the_generation_rounds(tmp_path, cache_dir):
    from smartfed.experiments.file_data import file_federated_data
    from smartfed.federated.client import FederatedClient
    from smartfed.federated.driver import drive
    from smartfed.federated.grid import InProcessGrid
    from smartfed.federated.run_dir import RunDir
    from smartfed.federated.strategy import SmartFedStrategy

    task = file_task(tmp_path, "instruction")
    task.generation = task.generation.model_copy(update={"every_rounds": 2})
    config = tiny_config(cache_dir, "smartfed")
    trainer = file_trainer(config, task)
    data = file_federated_data(task, config.federation, seed=config.seed)
    strategy = SmartFedStrategy(config, trainer, data.evaluation, fingerprint="test", partitions=data.clients)
    run_dir = RunDir(tmp_path / "run")
    run_dir.start_fresh({})
    drive(strategy, InProcessGrid(FederatedClient(trainer, data, config), config.federation.num_clients), run_dir)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert "perplexity" in records[0] and "exact_match" not in records[0]
    assert {"exact_match", "f1", "rouge_l", "perplexity"} <= set(records[1])
    assert all(value > 0 for r in records for value in r["client_peak_memory_bytes"].values())


# --- any causal LM folder ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_any_causal_lm_folder_trains_and_answers_padded_as_alone(tmp_path, family):
    from smartfed.models import load_frozen_model, load_tokenizer

    folder = save_tiny_model(tmp_path / family, family, tokenizer=build_tokenizer(chat=family == "llama"))
    tokenizer, model = load_tokenizer(folder), load_frozen_model(folder)
    data = TypeAdapter(DataSection).validate_python({
        "shape": "instruction", "train": str(write_rows(tmp_path / "i.jsonl", instruction_rows(12)))})
    task = load_file_task(data, tokenizer, cache_dir=tmp_path / "cache")
    assert task.template == ("chat" if family == "llama" else "plain")
    from smartfed.experiments.file_data import task_examples

    examples = task_examples(task, "train")
    with torch.no_grad():
        padded = examples.evaluate(model, label_token_ids=(), batch_size=len(examples), device="cpu")
        alone = [examples.subset([i]).evaluate(model, label_token_ids=(), batch_size=1, device="cpu")
                 for i in range(len(examples))]
    tokens = sum(a["response_tokens"] for a in alone)
    assert padded["loss"] == pytest.approx(sum(a["loss"] * a["response_tokens"] for a in alone) / tokens, rel=1e-5)
    prompts = examples.prompts(torch.arange(len(examples)))
    batched = greedy_generate(model, prompts, max_new_tokens=3, stop_token_ids=task.stop_token_ids,
                              pad_token_id=task.pad_token_id)
    assert batched == [greedy_generate(model, [p], max_new_tokens=3, stop_token_ids=task.stop_token_ids,
                                       pad_token_id=task.pad_token_id)[0] for p in prompts]
    model.requires_grad_(True)
    loss, _ = examples.training_loss(model, torch.arange(4), label_token_ids=(), device="cpu")
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_local_step_bench_times_smartfed_and_fedit_on_one_batch(monkeypatch):
    import os

    from smartfed.experiments import local_step_bench as bench
    from smartfed.experiments.local_step_bench import format_table, local_step_bench
    from tiny_models import TINY_LLAMA

    started = []  # the load is 1.0 until the bench builds its batch, 2.0 from then on
    build_batch = bench.instruction_batch
    monkeypatch.setattr(bench, "instruction_batch", lambda *args: started.append(1) or build_batch(*args))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0 + bool(started), 0.0, 0.0))
    record = local_step_bench(shape=TINY_LLAMA, batch_size=3, prompt_tokens=(3, 6), response_tokens=(1, 3),
                              active_rank=2, adapters=2, pool_rank=2, rounds=1, profile=True, profile_top=3)
    names = [row["method"] for row in record["rows"]]
    assert names == ["fedit", "smartfed[expert_space]", "smartfed[linear]"]
    for row in record["rows"]:
        assert row["step_s"] > 0 and row["peak_memory_bytes"] > 0 and row["trainable_parameters"] > 0
        assert row["step_s"] == pytest.approx(row["forward_s"] + row["backward_s"] + row["optimizer_s"], rel=0.5)
    assert record["rows"][0]["step_ratio_vs_fedit"] == 1.0 and len(record["profile"]["fedit"]) == 3
    assert record["batch"]["examples"] == 3 and format_table(record).count("\n") == 4
    assert record["load_average"] == 1.0 and record["load_average_end"] == 2.0


def test_length_buckets_keep_every_example_when_batches_do_not_divide_it():
    lengths = torch.arange(30)
    batches = length_bucketed_batches(lengths, 8, 4, torch.Generator().manual_seed(1), pool_batches=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(30))
    assert sorted(len(batch) for batch in batches) == [6, 8, 8, 8]  # pools of 16 and 14
