"""Tasks from the user's own files (smartfed.config.data, files, formatting, file_task) and their
client partitions: every format, both shapes, the cache, every bad input as one DatasetError line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError
from tiny_data import build_tokenizer, classification_rows, instruction_rows, write_rows

from smartfed.data_errors import DatasetError
from smartfed.tasks import file_task
from smartfed.tasks.file_task import load_file_task
from smartfed.config.data import DataSection

FORMATS = ["rows.jsonl", "rows.csv", "rows.parquet", "rows_folder"]
LABELS = ["sports", "business", "politics"]


def data_config(**values):
    return TypeAdapter(DataSection).validate_python(values)


def instruction_config(path, **values):
    return data_config(shape="instruction", train=str(path), eval_fraction=0.25, **values)


def classification_config(path, **values):
    return data_config(shape="classification", train=str(path), labels=LABELS, eval_fraction=0.25, **values)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("shape", ["classification", "instruction"])
def test_every_format_gives_the_same_examples(tmp_path, chat_tokenizer, shape):
    rows = classification_rows() if shape == "classification" else instruction_rows()
    make = classification_config if shape == "classification" else instruction_config
    tasks = [load_file_task(make(write_rows(tmp_path / name, rows)), chat_tokenizer, cache_dir=tmp_path / "cache")
             for name in FORMATS]
    for task in tasks[1:]:
        assert task.train.token_ids == tasks[0].train.token_ids
        assert task.evaluation.token_ids == tasks[0].evaluation.token_ids
        assert task.train.labels == tasks[0].train.labels
    assert len(tasks[0].train) + len(tasks[0].evaluation) == len(rows)
    assert len(tasks[0].evaluation) == round(0.25 * len(rows))


def test_classification_prompts_labels_and_multi_token_words(tmp_path, plain_tokenizer):
    path = write_rows(tmp_path / "c.jsonl", classification_rows(8))
    config = classification_config(path, label_words=[" sports", " business news", " politics"],
                                   prompt_template="topic of {text} is")
    task = load_file_task(config, plain_tokenizer, cache_dir=tmp_path / "cache")
    encode = lambda text: plain_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert task.multi_token_labels and task.label_token_ids[1] == tuple(encode(" business news"))
    rows = {tuple(ids): label for split in (task.train, task.evaluation)
            for ids, label in zip(split.token_ids, split.labels)}
    first = classification_rows(8)[0]
    assert rows[tuple(encode("topic of") + encode(first["text"]) + encode("is"))] == LABELS.index(first["label"])
    single = load_file_task(classification_config(path), plain_tokenizer, cache_dir=tmp_path / "cache")
    assert not single.multi_token_labels and single.label_token_ids == tuple(encode(f" {w}")[0] for w in LABELS)


def test_integer_labels_read_as_their_text(tmp_path, plain_tokenizer):
    rows = [{"text": "very good news", "label": i % 2} for i in range(8)]
    config = data_config(shape="classification", train=str(write_rows(tmp_path / "c.csv", rows)), labels=["0", "1"],
                         label_words=[" negative", " positive"], eval_fraction=0.25)
    task = load_file_task(config, plain_tokenizer, cache_dir=tmp_path / "cache")
    assert sorted(task.train.labels + task.evaluation.labels) == [0] * 4 + [1] * 4


def test_instruction_uses_the_chat_template_when_there_is_one(tmp_path, chat_tokenizer, plain_tokenizer):
    path = write_rows(tmp_path / "i.jsonl", instruction_rows(4))
    chat = load_file_task(instruction_config(path), chat_tokenizer, cache_dir=tmp_path / "cache")
    plain = load_file_task(instruction_config(path, plain_template="question {prompt} answer"), plain_tokenizer,
                           cache_dir=tmp_path / "cache")
    assert (chat.template, plain.template) == ("chat", "plain")
    row = chat.train.references.index("five")
    ids, prompt = chat.train.token_ids[row], chat.train.prompt_lengths[row]
    assert chat_tokenizer.decode(ids[:prompt]) == "<|user|> what is two plus three <|assistant|>"
    assert chat_tokenizer.decode(ids[prompt:]) == "five [EOS]"
    row = plain.train.references.index("five")
    ids, prompt = plain.train.token_ids[row], plain.train.prompt_lengths[row]
    assert plain_tokenizer.decode(ids[:prompt]) == "question what is two plus three answer"
    assert ids[prompt:] == plain_tokenizer.encode("five", add_special_tokens=False) + [plain_tokenizer.eos_token_id]


def test_a_messages_column_equals_the_same_prompt_and_response(tmp_path, chat_tokenizer):
    pairs = instruction_rows(8)
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in pairs]
    by_columns = load_file_task(instruction_config(write_rows(tmp_path / "p.jsonl", pairs)), chat_tokenizer,
                                cache_dir=tmp_path / "cache")
    by_messages = load_file_task(instruction_config(write_rows(tmp_path / "m.jsonl", chats), messages_column="messages"),
                                 chat_tokenizer, cache_dir=tmp_path / "cache")
    assert by_messages.train.token_ids == by_columns.train.token_ids
    assert by_messages.train.prompt_lengths == by_columns.train.prompt_lengths


def test_truncation_cuts_the_prompt_keeps_the_response_and_counts(tmp_path, plain_tokenizer):
    rows = [{"prompt": "the cat sat on the mat " * (1 + i % 3), "response": "very good news"} for i in range(8)]
    task = load_file_task(instruction_config(write_rows(tmp_path / "i.jsonl", rows), max_length=10), plain_tokenizer,
                          cache_dir=tmp_path / "cache")
    response = plain_tokenizer.encode("very good news", add_special_tokens=False) + [plain_tokenizer.eos_token_id]
    for split in (task.train, task.evaluation):
        assert all(len(ids) <= 10 and ids[-len(response):] == response for ids in split.token_ids)
    cut = sum(6 * (1 + i % 3) + len(response) > 10 for i in range(8))  # the template's newline encodes to nothing
    assert task.train.truncated + task.evaluation.truncated == cut
    assert task.summary()["truncated_train_examples"] == task.train.truncated


def test_tokenized_examples_are_cached_by_content(tmp_path, chat_tokenizer, monkeypatch):
    path = write_rows(tmp_path / "i.jsonl", instruction_rows(8))
    first = load_file_task(instruction_config(path), chat_tokenizer, cache_dir=tmp_path / "cache")
    assert not first.cache_hit

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached task must not read its rows again")

    with monkeypatch.context() as patch:
        patch.setattr(file_task, "read_columns", no_reading)
        again = load_file_task(instruction_config(path), chat_tokenizer, cache_dir=tmp_path / "cache")
    assert again.cache_hit and again.train == first.train and again.evaluation == first.evaluation
    write_rows(path, instruction_rows(9))
    changed = load_file_task(instruction_config(path), chat_tokenizer, cache_dir=tmp_path / "cache")
    assert not changed.cache_hit and len(changed.train) + len(changed.evaluation) == 9
    (tmp_path / "cache" / f"{changed.fingerprint}.safetensors").write_bytes(b"damaged")
    assert not load_file_task(instruction_config(path), chat_tokenizer, cache_dir=tmp_path / "cache").cache_hit


def test_reading_never_connects_anywhere(tmp_path, chat_tokenizer, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network use while reading a data file")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import datasets

    hf_cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(hf_cache.rglob("*")) if hf_cache.exists() else []
    for name in FORMATS:
        task = load_file_task(instruction_config(write_rows(tmp_path / name, instruction_rows(8))), chat_tokenizer,
                              cache_dir=tmp_path / "cache")
        assert len(task.train) == 6
    # Nothing went to the Hugging Face cache: datasets prepared every file in a scratch folder.
    assert (sorted(hf_cache.rglob("*")) if hf_cache.exists() else []) == before


def _bad(tmp_path, case, plain_tokenizer, chat_tokenizer):
    """(config, tokenizer, expected text in the message) of one bad input."""
    rows = instruction_rows(8)
    if case == "missing file":
        return instruction_config(tmp_path / "absent.jsonl"), plain_tokenizer, "task.data.train: "
    if case == "missing column":
        return instruction_config(write_rows(tmp_path / "x.jsonl", rows), response_column="answer"), \
            plain_tokenizer, "no column 'answer'"
    if case == "empty dataset":
        (tmp_path / "x.jsonl").write_text("")
        return instruction_config(tmp_path / "x.jsonl"), plain_tokenizer, "x.jsonl"
    if case == "label outside the label set":
        rows = classification_rows(8) + [{"text": "very bad news", "label": "weather", "source": "s0"}]
        return classification_config(write_rows(tmp_path / "x.csv", rows)), plain_tokenizer, \
            "row 9: label 'weather' in column 'label' is not one of the labels"
    if case == "non-UTF-8 text":
        (tmp_path / "x.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "five"}\n')
        return instruction_config(tmp_path / "x.jsonl"), plain_tokenizer, "not UTF-8 text (byte 0xe9 at offset 15)"
    if case == "empty response":
        rows[3]["response"] = "  "
        return instruction_config(write_rows(tmp_path / "x.jsonl", rows)), plain_tokenizer, \
            "row 4: column 'response' is empty"
    if case == "chat template missing":
        return instruction_config(write_rows(tmp_path / "x.jsonl", rows), template="chat"), plain_tokenizer, \
            "task.data.template: 'chat', but the tokenizer has no chat template"
    if case == "too long without truncation":
        rows[5]["prompt"] = "the cat sat on the mat " * 4
        return instruction_config(write_rows(tmp_path / "x.jsonl", rows), max_length=12, truncation=False), \
            plain_tokenizer, "more than task.data.max_length=12 (set task.data.truncation: true"
    if case == "chat without an answer":
        chats = [{"messages": [{"role": "user", "content": "five"}, {"role": "user", "content": "blue"}]}] * 4
        return instruction_config(write_rows(tmp_path / "x.jsonl", chats), messages_column="messages"), \
            chat_tokenizer, "the last turn must be the assistant's answer"
    if case == "unknown suffix":
        (tmp_path / "x.txt").write_text("hello")
        return instruction_config(tmp_path / "x.txt"), plain_tokenizer, "cannot tell the format of x.txt"
    if case == "malformed json":
        (tmp_path / "x.jsonl").write_text('{"prompt": "five", "response": \n')
        return instruction_config(tmp_path / "x.jsonl"), plain_tokenizer, "not a readable jsonl dataset"
    raise AssertionError(case)


BAD_INPUTS = ["missing file", "missing column", "empty dataset", "label outside the label set", "non-UTF-8 text",
              "empty response", "chat template missing", "too long without truncation", "chat without an answer",
              "unknown suffix", "malformed json"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path, plain_tokenizer, chat_tokenizer, case):
    config, tokenizer, expected = _bad(tmp_path, case, plain_tokenizer, chat_tokenizer)
    with pytest.raises(DatasetError) as error:
        load_file_task(config, tokenizer, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "cache").exists()


def test_schema_is_strict_bounded_and_loads_no_torch():
    with pytest.raises(ValidationError, match="extra"):
        data_config(shape="instruction", train="a.jsonl", colums="x")
    with pytest.raises(ValidationError, match="less than or equal to 32768"):
        data_config(shape="instruction", train="a.jsonl", max_length=10 ** 6)
    with pytest.raises(ValidationError, match="valid integer"):
        data_config(shape="instruction", train="a.jsonl", max_length="512")
    with pytest.raises(ValidationError, match="one word per label"):
        data_config(shape="classification", train="a.jsonl", labels=["a", "b", "c"], label_words=[" a", " b"])
    with pytest.raises(ValidationError, match=r"\{prompt\} exactly once"):
        data_config(shape="instruction", train="a.jsonl", plain_template="{question}")
    with pytest.raises(ValidationError, match="needs a chat template"):
        data_config(shape="instruction", train="a.jsonl", messages_column="m", template="plain")
    with pytest.raises(ValidationError):
        data_config(shape="regression", train="a.jsonl")
    code = "import sys, smartfed.config.data; assert 'torch' not in sys.modules and 'datasets' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": ":".join(sys.path)}).returncode == 0


# --- partitions ---------------------------------------------------------------------------------

from smartfed.federated.partition import partition_examples  # noqa: E402


@pytest.mark.parametrize("method", ["iid", "dirichlet", "natural"])
def test_every_partitioner_covers_each_example_once_deterministically(method):
    labels = np.arange(60) % 3
    groups = np.array(["north", "south", "east", "west"])[np.arange(60) % 4]
    split = lambda seed: partition_examples(labels, 4, method=method, seed=seed, alpha=0.5,  # noqa: E731
                                            groups=groups, min_per_client=2)
    parts = split(7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    assert all(len(part) >= 2 for part in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, split(7)))
    if method == "natural":
        assert [set(groups[part]) for part in parts] == [{"east"}, {"north"}, {"south"}, {"west"}]
    if method == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_by_label_skews_small_alpha():
    labels = np.arange(300) % 3
    skewed = partition_examples(labels, 3, method="dirichlet", seed=0, alpha=0.05)
    even = partition_examples(labels, 3, method="dirichlet", seed=0, alpha=1000.0)
    spread = lambda parts: np.mean([np.bincount(labels[p], minlength=3).max() / len(p) for p in parts])  # noqa: E731
    assert spread(skewed) > 0.8 > 0.5 > spread(even)


@pytest.mark.parametrize("case, message", [
    (dict(method="dirichlet", alpha=0.01, min_per_client=3, num_clients=10), "left a client with fewer than 3"),
    (dict(method="natural", groups=["a"] * 9 + ["b"], num_clients=3), "has 2 distinct values ['a', 'b'], but "
                                                                       "federation.num_clients is 3"),
    (dict(method="natural", num_clients=2), "needs task.data.partition_column"),
    (dict(method="iid", num_clients=11), "cannot give each of 11 clients one"),
    (dict(method="shards", num_clients=2), "must be 'iid', 'dirichlet' or 'natural'"),
])
def test_a_client_without_examples_is_a_clear_error(case, message):
    labels = np.arange(10) % 2
    num_clients = case.pop("num_clients")
    with pytest.raises(DatasetError) as error:
        partition_examples(labels, num_clients, seed=0, **case)
    assert message in str(error.value) and "\n" not in str(error.value)


# --- the worked example's data -----------------------------------------------------------------

def test_headline_files_are_disjoint_real_text_partitioned_by_client(tmp_path, chat_tokenizer):
    import json

    from smartfed.experiments.file_data import file_federated_data
    from smartfed.tasks.headlines import write_headline_files

    files = write_headline_files(tmp_path / "headlines", clients=3, per_client=6, eval_examples=5, seed=1)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in files.items()}
    assert [len(rows[f"client_{i}.jsonl"]) for i in range(3)] == [6, 6, 6] and len(rows["eval.jsonl"]) == 5
    sources = [r["source"] for name in ("client_0.jsonl", "client_1.jsonl", "client_2.jsonl", "eval.jsonl")
               for r in rows[name]]
    assert len(set(sources)) == len(sources)
    assert all(r["prompt"] and r["response"] and r["client"] == "1" for r in rows["client_1.jsonl"])
    data = data_config(shape="instruction", train=str(files["all_clients.jsonl"]), eval=str(files["eval.jsonl"]),
                       partition_column="client")
    task = load_file_task(data, chat_tokenizer, cache_dir=tmp_path / "cache")

    class Federation:
        num_clients, partition, alpha, min_examples_per_client = 3, "natural", 0.5, 1

    split = file_federated_data(task, Federation, seed=0)
    assert [sorted(client.references) for client in split.clients] == \
        [sorted(r["response"] for r in rows[f"client_{i}.jsonl"]) for i in range(3)]


def test_headline_files_go_only_to_a_new_folder_outside_the_repository(tmp_path):
    from smartfed.tasks.headlines import write_headline_files

    files = write_headline_files(tmp_path / "again", per_client=2, eval_examples=2)
    written = {name: (path.read_bytes(), path.stat().st_mtime_ns) for name, path in files.items()}
    # The same settings again (a second run of the worked example's command): nothing is written.
    assert write_headline_files(tmp_path / "again", per_client=2, eval_examples=2) == files
    assert {name: (path.read_bytes(), path.stat().st_mtime_ns) for name, path in files.items()} == written
    with pytest.raises(DatasetError, match="nor one these files were written to with the same settings"):
        write_headline_files(tmp_path / "again", per_client=3, eval_examples=2)
    files["client_0.jsonl"].write_text("changed")
    with pytest.raises(DatasetError, match="exists and is not an empty folder"):
        write_headline_files(tmp_path / "again", per_client=2, eval_examples=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="exists and is not an empty folder"):
        write_headline_files(tmp_path / "full", per_client=2, eval_examples=2)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    repository = Path(__file__).resolve().parents[1]
    with pytest.raises(DatasetError, match="inside the smartfed repository"):
        write_headline_files(repository / "build" / "headlines-test", per_client=2, eval_examples=2)
    assert not (repository / "build" / "headlines-test").exists()


def test_partition_summary_table_and_plot(tmp_path, plain_tokenizer):
    from smartfed.experiments.file_data import file_federated_data, format_partition, partition_summary, plot_partition

    config = classification_config(write_rows(tmp_path / "c.jsonl", classification_rows(24)), partition_column="source")
    task = load_file_task(config, plain_tokenizer, cache_dir=tmp_path / "cache")

    class Federation:
        num_clients, partition, alpha, min_examples_per_client = 2, "natural", 0.5, 1

    data = file_federated_data(task, Federation, seed=0)
    summary = partition_summary(data, LABELS)
    train_sources = [task.train.groups[i] for i in range(len(task.train))]
    assert [c["examples"] for c in summary["clients"]] == [train_sources.count("s0"), train_sources.count("s1")]
    for client, part in zip(summary["clients"], data.partitions):
        labels = [task.train.labels[i] for i in part]
        assert client["labels"] == {name: labels.count(k) for k, name in enumerate(LABELS)}
    assert summary["total"] == len(task.train) and 0 <= summary["label_skew"] <= 1
    assert len(format_partition(summary).splitlines()) == 2 + 2 and "sports" in format_partition(summary)
    png = plot_partition(summary, tmp_path / "plots" / "partition.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
