"""The v2 suite (smartfed.tasks.suite): sizes, disjoint splits, templates seen and unseen, and the
leakage checks: no target test item in any training row, no test article with a near-duplicate
(8-word shingle Jaccard >= 0.8) among the training articles."""

import json
from collections import Counter

import pytest

from smartfed.tasks import bbc_corpus, bbc_news, near_duplicates, spelled_sums, suite, suite_files
from smartfed.tasks.templates import ROLES, TEXTS, all_templates, fields, templates


@pytest.fixture(scope="module")
def tasks():
    return suite.suite_tasks()


# --------------------------------------------------------------------------- near-duplicates


def test_shingles_and_jaccard_on_known_texts():
    text = "one two three four five six seven eight nine ten"
    assert len(near_duplicates.shingles(text)) == 3
    assert near_duplicates.shingles("Hello, world!") == {"hello world"}
    retitled = "A new title: " + text
    assert near_duplicates.jaccard(near_duplicates.shingles(text), near_duplicates.shingles(text)) == 1.0
    assert near_duplicates.cross_pairs([retitled], [text, "something else entirely"], threshold=0.4) == [
        (0, 0, pytest.approx(3 / 6))]
    assert near_duplicates.cross_pairs([retitled], [text]) == []


def test_groups_link_chains_and_extra_pairs():
    base = " ".join(f"w{i}" for i in range(40))
    texts = [base, base + " w40", "unrelated words here", base + " w40 w41", "other"]
    assert near_duplicates.groups(texts) == [0, 0, 2, 0, 4]
    assert near_duplicates.groups(texts, same=[(2, 4)]) == [0, 0, 2, 0, 2]


def test_the_detector_finds_the_v1_leak_the_audit_reported():
    # Issue 22: 6 of the 150 test articles v1 scored have a near-duplicate in its public or federated share.
    texts, _ = bbc_news.read_articles()
    splits = bbc_news.split_indices(len(texts), split_seed=0, public_fraction=0.3, test_fraction=0.2)
    trained = [texts[i] for i in list(splits["public"]) + list(splits["train"])]
    pairs = near_duplicates.cross_pairs([texts[i] for i in splits["test"][:150]], trained)
    assert len({query for query, _, _ in pairs}) == 6


# --------------------------------------------------------------------------- BBC


def test_kept_articles_hold_no_near_duplicate_pair():
    kept, stats = bbc_corpus.deduplicated()
    assert stats["articles"] == 2225 and stats["kept"] == len(kept) == 2056
    assert near_duplicates.groups([article.text for article in kept]) == list(range(len(kept)))
    assert len({article.title.lower() for article in kept}) == len(kept)


def test_bbc_shares_are_disjoint_cover_every_kept_article_and_are_fixed():
    first, again = bbc_corpus.shares(), bbc_corpus.shares()
    keys = {name: {article.key for article in share} for name, share in first.items()}
    assert all(keys[name] == {a.key for a in again[name]} for name in first)
    assert not (keys["public"] & keys["federated"]) and not (keys["public"] & keys["test"])
    assert not (keys["federated"] & keys["test"])
    assert sum(map(len, keys.values())) == len(bbc_corpus.deduplicated()[0])
    assert {a.key for a in bbc_corpus.shares(split_seed=1)["test"]} != keys["test"]


def test_bbc_targets_score_every_test_article(tasks):
    test_keys = {f"bbc:{article.key}" for article in bbc_corpus.shares()["test"]}
    topic, headlines = tasks["bbc_topic"], tasks["headlines"]
    assert len(test_keys) == 411
    assert Counter(row["item"] for row in topic.held) == {key: 2 for key in test_keys}
    assert {row["item"] for row in headlines.held} == test_keys and len(headlines.held) == 411
    assert topic.labels == bbc_news.TOPICS and {row["label"] for row in topic.held} == set(bbc_news.TOPICS)
    first = topic.held[0]
    assert first["text"].count("\n") >= 1 and first["label"] in bbc_news.TOPICS


# --------------------------------------------------------------------------- spelled sums


@pytest.mark.parametrize("n, words", [(0, "zero"), (13, "thirteen"), (40, "forty"), (85, "eighty-five"),
                                      (100, "one hundred"), (105, "one hundred five"), (198, "one hundred ninety-eight"),
                                      (999, "nine hundred ninety-nine")])
def test_number_words(n, words):
    assert spelled_sums.number_words(n) == words


def test_number_words_refuses_what_it_cannot_spell():
    for bad in (-1, 1000, 2.0, True):
        with pytest.raises(ValueError, match="n must be an int in 0..999"):
            spelled_sums.number_words(bad)


def test_the_problem_space_holds_thousands_of_multi_digit_problems():
    problems = spelled_sums.problems()
    assert len(problems) == 8100 + 4095 and len({p.key for p in problems}) == len(problems)
    assert {p.result for p in problems} == set(range(0, 199))
    assert spelled_sums.Problem(47, "+", 38).group == spelled_sums.Problem(38, "+", 47).group == "38+47"
    assert spelled_sums.Problem(47, "-", 38).group == "47-38"


def test_skill_splits_share_no_problem_group_and_hold_500_test_problems(tasks):
    shares = spelled_sums.split_groups(split_seed=0, **suite.SKILL_SIZES)
    groups = {name: {p.group for p in share} for name, share in shares.items()}
    assert len(shares["test"]) == len(groups["test"]) == 600 >= 500
    assert not (groups["test"] & groups["federated"]) and not (groups["test"] & groups["public"])
    assert not (groups["federated"] & groups["public"])
    target = tasks["spelled_sums"]
    assert len(target.train) == 1500 and len(target.held) == 600
    row = target.held[0]
    problem = next(p for p in shares["test"] if f"sum:{p.group}" == row["item"])
    assert row["response"] == " " + spelled_sums.number_words(problem.result)
    assert max(len(r["response"].split()) for r in target.held) >= 2  # answers of several words (and tokens)


def test_the_sources_never_train_on_a_target_test_problem(tasks):
    test_groups = {row["item"] for row in tasks["spelled_sums"].held}
    for name in ("arithmetic", "number_words", "next_letter"):
        assert not test_groups & {row["item"] for row in tasks[name].train}, name
    # The arithmetic source answers in digits, number words spell numbers: neither holds a composed problem.
    assert all(row["response"].strip().isdigit() for row in tasks["arithmetic"].train)
    assert all("+" not in row["prompt"] and "minus" not in row["prompt"] for row in tasks["number_words"].train)


# --------------------------------------------------------------------------- templates


def test_template_roles_never_share_a_template_and_name_their_fields():
    texts = [template.text for template in all_templates()]
    assert len(texts) == len(set(texts))
    allowed = {"bbc_topic": {"text"}, "headline": {"lead"}, "arithmetic": {"a", "b", "op", "opword"},
               "spelled_sum": {"a", "b", "op", "opword"}, "number_words": {"n"}, "next_letter": {"x"}}
    assert set(TEXTS) == set(allowed)
    for family, roles in TEXTS.items():
        assert set(roles) <= set(ROLES)
        for text in (text for listed in roles.values() for text in listed):
            assert fields(text) and set(fields(text)) <= allowed[family], text
    with pytest.raises(KeyError, match="has no 'unseen' templates"):
        templates("arithmetic", "unseen")


def test_targets_train_on_their_own_templates_and_test_on_seen_and_unseen_ones(tasks):
    pool_templates = {row["template"] for name, rows in tasks.items() if name not in suite.TARGETS
                      for row in rows.train}
    for name in suite.TARGETS:
        target = tasks[name]
        train_templates = {row["template"] for row in target.train}
        assert all("/federated-" in template for template in train_templates)
        assert not train_templates & pool_templates
        seen = {row["template"] for row in target.held if row["seen"]}
        unseen = {row["template"] for row in target.held if not row["seen"]}
        assert seen <= train_templates and unseen and not unseen & (train_templates | pool_templates)
        counts = Counter(row["seen"] for row in target.held)
        assert abs(counts[True] - counts[False]) <= 1, name


def test_sources_train_on_several_paraphrases_and_check_an_unseen_one(tasks):
    for name, rows in tasks.items():
        if name in suite.TARGETS:
            continue
        assert len({row["template"] for row in rows.train}) >= 3, name
        assert {row["seen"] for row in rows.held} == {True, False}, name
        assert all("/check-" in row["template"] for row in rows.held if not row["seen"])
    checked = {row["item"] for row in tasks["arithmetic"].held}
    assert not checked & {row["item"] for row in tasks["arithmetic"].train}


# --------------------------------------------------------------------------- leakage and files


def test_no_target_test_item_or_near_duplicate_is_in_any_training_row(tasks):
    report = suite.leakage(tasks)
    assert set(report) == set(suite.TARGETS)
    for name, entry in report.items():
        assert entry["test_items_in_training"] == 0, name
        assert entry.get("test_articles_with_near_duplicate_in_training", 0) == 0, name
    assert report["bbc_topic"]["test_items"] == 411 and report["spelled_sums"]["test_items"] == 600


def test_leakage_is_found_when_a_test_item_is_trained_on(tasks):
    leaky = dict(tasks)
    arithmetic = tasks["arithmetic"]
    leaked = dict(tasks["spelled_sums"].held[0])
    leaky["arithmetic"] = suite.TaskRows(name="arithmetic", shape="instruction", train=arithmetic.train + [leaked],
                                         held=arithmetic.held)
    headline = tasks["headlines"]
    retitled = dict(headline.held[0])
    leaky["headlines_bpt"] = suite.TaskRows(name="headlines_bpt", shape="instruction",
                                            train=tasks["headlines_bpt"].train + [retitled], held=[])
    report = suite.leakage(leaky)
    assert report["spelled_sums"]["test_items_in_training"] == 1
    assert report["headlines"]["test_items_in_training"] == 1
    assert report["headlines"]["test_articles_with_near_duplicate_in_training"] == 1


def test_the_suite_files_are_written_once_and_hashed(tmp_path):
    folder = tmp_path / "suite"
    manifest = suite_files.write_suite(folder)
    assert (folder / "targets" / "spelled_sums" / "test.jsonl").is_file()
    for path, entry in manifest["files"].items():
        lines = (folder / path).read_text(encoding="utf-8").splitlines()
        assert len(lines) == entry["rows"]
    row = json.loads((folder / "targets" / "bbc_topic" / "test.jsonl").read_text().splitlines()[0])
    assert set(row) == {"text", "label", "template", "seen", "item"}
    assert manifest["leakage"]["headlines"]["test_items_in_training"] == 0
    before = (folder / suite_files.MANIFEST).stat().st_mtime_ns
    assert suite_files.write_suite(folder) == manifest  # kept, not rewritten
    assert (folder / suite_files.MANIFEST).stat().st_mtime_ns == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="holds something other than this suite"):
        suite_files.write_suite(other)
