"""From text files to training blocks: load, clean, deduplicate, split, tokenize, pack (or pad), report.

The path is one way only::

    texts = load_texts("reviews.jsonl")                 # or .csv/.tsv/.txt, a folder of .txt, a datasets.Dataset
    texts, cleaning = clean_texts(texts)                # HTML entities, whitespace, empty rows, exact duplicates
    splits = split_texts(texts, validation=0.1, seed=0)
    train, report = prepare_dataset(tokenizer, splits["train"], block_size=128)   # packed blocks + statistics

Nothing is dropped silently: every removed row or token is counted in a report.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import html
import json
import logging
import os
import random
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 5_000_000
COURSE_DATASETS = ("drug_reviews", "chat_logs", "python_docs")
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------------------------- loading
def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise DataError(f"Data file '{path}' does not exist. Check the path (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        raise DataError(f"'{path}' is a folder: pass a .jsonl, .csv, .tsv or .txt file, or a folder of .txt files.")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"Data file '{path}' is empty. Put at least one text in it.")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # e.g. Excel's "Unicode text" export
        return _decode_utf16(path, raw)
    if b"\x00" in raw[:65536]:
        raise DataError(
            f"Data file '{path}' contains NUL bytes: it looks like a binary file, not text. "
            "Export your data as UTF-8 .jsonl, .csv or .txt."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"Data file '{path}' is not valid UTF-8: byte {raw[error.start]:#04x} at line {line}, byte offset "
            f"{error.start}. Re-save it as UTF-8 (for example: iconv -f latin1 -t utf-8 in > out)."
        ) from None


def _decode_utf16(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-16")
    except UnicodeDecodeError as error:
        raise DataError(
            f"Data file '{path}' starts like UTF-16 text but byte offset {error.start} cannot be decoded. "
            "Re-save it as UTF-8 (for example: iconv -f utf-16 -t utf-8 in > out)."
        ) from None


def _check_text(value: Any, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{text_field}' is {type(value).__name__}, not a string. Store the text as a string."
        )
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(
            f"{where}: the text has {len(value):,} characters (limit {MAX_TEXT_CHARS:,}). Split such documents "
            "into smaller rows (one paragraph or section per row)."
        )
    return value


def _load_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {number}: invalid JSON ({error.msg} at column {error.colno}). Each line of a .jsonl "
                f'file must be one complete JSON object, like {{"{text_field}": "…"}}. Was the file cut short?'
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object with a '{text_field}' field, got {type(row).__name__}."
            )
        if text_field not in row:
            raise DataError(
                f"{path}, line {number}: no '{text_field}' field (fields: {', '.join(map(str, row)) or 'none'}). "
                f"Pass text_field=… (--text-field on the command line) naming the field that holds the text."
            )
        texts.append(_check_text(row[text_field], f"{path}, line {number}", text_field))
    return texts


def _load_json(path: Path, text_field: str) -> list[str]:
    try:
        rows = json.loads(_read_utf8(path))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {error.lineno}: invalid JSON ({error.msg}). Fix the file or save it as .jsonl."
        ) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects (or of strings) at the top level.")
    texts = []
    for index, row in enumerate(rows):
        if isinstance(row, str):
            texts.append(_check_text(row, f"{path}, item {index}", text_field))
        elif isinstance(row, dict) and text_field in row:
            texts.append(_check_text(row[text_field], f"{path}, item {index}", text_field))
        else:
            raise DataError(f"{path}, item {index}: expected a string or an object with a '{text_field}' field.")
    return texts


def _load_csv(path: Path, text_field: str, delimiter: str) -> list[str]:
    content = _read_utf8(path)
    # The csv module refuses fields over 128 KiB by default; long texts are refused by MAX_TEXT_CHARS instead.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(content.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"Data file '{path}' is empty. Put a header row and at least one text in it.") from None
    if text_field not in header:
        raise DataError(
            f"{path}: no '{text_field}' column (columns: {', '.join(header)}). Pass text_field=… "
            "(--text-field on the command line) naming the column that holds the text."
        )
    column = header.index(text_field)
    texts = []
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(row)} fields but the header has {len(header)}. "
                    "A field with the delimiter or a line break inside must be quoted; fix that row."
                )
            texts.append(_check_text(row[column], f"{path}, line {reader.line_num}", text_field))
    except csv.Error as error:
        raise DataError(
            f"{path}, line {reader.line_num}: malformed CSV ({error}). Check the quoting on that line."
        ) from None
    return texts


def _load_txt(path: Path) -> list[str]:
    """A plain-text file: one document per blank-line-separated paragraph block."""
    content = _read_utf8(path)
    texts = [block.strip("\n") for block in re.split(r"\n\s*\n", content) if block.strip()]
    for number, text in enumerate(texts, start=1):
        _check_text(text, f"{path}, paragraph {number}", "text")
    return texts


def load_texts(source: Any, *, text_field: str = "text") -> list[str]:
    """Load raw texts from a file, a folder of ``.txt`` files, a ``datasets.Dataset`` or a list of strings.

    Files: ``.jsonl`` (one JSON object per line), ``.json`` (a list), ``.csv`` / ``.tsv`` (a header row), ``.txt``
    (documents separated by blank lines). Bad input raises :class:`DataError` naming the file and line.

    >>> load_texts(["a review", "another"])
    ['a review', 'another']
    """
    if isinstance(source, (list, tuple)):
        return [_check_text(text, f"item {index}", text_field) for index, text in enumerate(source)]
    if hasattr(source, "column_names") and hasattr(source, "select"):  # a datasets.Dataset
        if text_field not in source.column_names:
            raise DataError(f"The dataset has no '{text_field}' column (columns: {', '.join(source.column_names)}).")
        return [_check_text(text, f"row {index}", text_field) for index, text in enumerate(source[text_field])]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"The folder '{path}' has no .txt files. Put one document per .txt file in it.")
        return [_check_text(_read_utf8(file), str(file), "text") for file in files]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = _load_jsonl(path, text_field)
    elif suffix == ".json":
        texts = _load_json(path, text_field)
    elif suffix in (".csv", ".tsv"):
        texts = _load_csv(path, text_field, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".txt", ".md", ""):
        texts = _load_txt(path)
    else:
        raise DataError(f"'{path}': unsupported file type '{suffix}'. Use .jsonl, .json, .csv, .tsv or .txt.")
    if not texts:
        raise DataError(f"Data file '{path}' holds no texts. Check that it is the file you meant.")
    return texts


def _records_of(rows, where: str, fields: Sequence[str], row_name: str = "line") -> list[dict[str, Any]]:
    records = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(
                f"{where}, {row_name} {number}: expected an object with the fields {', '.join(fields)}, "
                f"got {type(row).__name__}."
            )
        missing = [name for name in fields if name not in row]
        if missing:
            raise DataError(
                f"{where}, {row_name} {number}: no '{missing[0]}' field (fields: {', '.join(map(str, row)) or 'none'}). "
                "Name the fields that hold the text and the label (--text-field, --label-field on the command line)."
            )
        records.append({name: row[name] for name in fields} | {"_where": f"{where}, {row_name} {number}"})
    return records


def load_records(source: Any, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file, a ``datasets.Dataset`` or a list of dicts, with
    the named ``fields`` each (and ``"_where"``: the file and line, for error messages). Texts and their labels, say.

    >>> load_records([{"text": "fine", "label": "good"}], ["text", "label"])[0]["label"]
    'good'
    """
    if isinstance(source, (list, tuple)):
        return _records_of(enumerate(source), "the list", fields, "item")
    if hasattr(source, "column_names") and hasattr(source, "select"):
        return _records_of(enumerate(source), "the dataset", fields, "row")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}, line {number}: invalid JSON ({error.msg} at column {error.colno}). Each "
                        "line of a .jsonl file must be one complete JSON object. Was the file cut short?"
                    ) from None
        return _records_of(rows, str(path), fields)
    if suffix == ".json":
        try:
            rows = json.loads(_read_utf8(path))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}).") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects at the top level.")
        return _records_of(enumerate(rows), str(path), fields, "item")
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        reader = csv.DictReader(_read_utf8(path).splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            return _records_of(((reader.line_num, row) for row in reader), str(path), fields)
        except csv.Error as error:
            raise DataError(
                f"{path}, line {reader.line_num}: malformed CSV ({error}). Check the quoting on that line."
            ) from None
    raise DataError(f"'{path}': labelled data must be .jsonl, .json, .csv or .tsv, not '{suffix or 'no suffix'}'.")


def course_data_dir() -> Path:
    """The folder holding the course datasets (``data/`` at the project's root, or ``$GPT_HELPERS_DATA``)."""
    candidates = []
    if os.environ.get("GPT_HELPERS_DATA"):
        candidates.append(Path(os.environ["GPT_HELPERS_DATA"]))
    candidates.append(Path(__file__).resolve().parent.parent / "data")
    here = Path.cwd()
    candidates += [folder / "data" for folder in (here, *here.parents)]
    for folder in candidates:
        if (folder / "drug_reviews").is_dir():
            return folder
    raise DataError(
        "Could not find the course datasets (a 'data' folder with drug_reviews/, chat_logs/, python_docs/). "
        "Run from the course's folder, install it with pip install -e ., or set GPT_HELPERS_DATA to the data folder."
    )


def load_course_dataset(name: str, split: str = "train", *, field: str = "text") -> list[Any]:
    """One split of a course dataset: ``drug_reviews`` (customer feedback), ``chat_logs``, ``python_docs``.

    >>> len(load_course_dataset("drug_reviews", "validation")) > 0
    True
    """
    if name not in COURSE_DATASETS:
        raise DataError(f"Unknown course dataset '{name}'. Choose one of: {', '.join(COURSE_DATASETS)}.")
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}'. Choose one of: {', '.join(SPLITS)}.")
    path = course_data_dir() / name / f"{split}.jsonl"
    if field == "text":
        return _load_jsonl(path, "text")
    rows = [json.loads(line) for line in _read_utf8(path).splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if field not in row:
            raise DataError(f"{path}, row {number}: no '{field}' field. Choose one of: {', '.join(row)}.")
    return [row[field] for row in rows]


# ----------------------------------------------------------------------------------------------- cleaning
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str, *, keep_layout: bool = False) -> str:
    """Unescape HTML entities (twice, for double-escaped text), normalise line ends and spaces, strip.

    ``keep_layout=True`` keeps indentation and inner spacing (code, tables, chat logs with code): only
    entities, line ends, trailing spaces and runs of blank lines are normalised.

    >>> clean_text('  &quot;Great&quot;   drug &amp;amp; fast  ')
    '"Great" drug & fast'
    >>> clean_text("    x = [1,  2]   ", keep_layout=True)
    '    x = [1,  2]'
    """
    text = html.unescape(html.unescape(text))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if keep_layout:
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        return _MANY_NEWLINES.sub("\n\n", text).strip("\n")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


@dataclass
class CleaningReport:
    """What cleaning kept and removed, row by row counted."""

    rows_in: int = 0
    rows_empty: int = 0
    rows_duplicate: int = 0
    rows_kept: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.rows_in:,} rows in: {self.rows_kept:,} kept, {self.rows_empty:,} empty and "
            f"{self.rows_duplicate:,} exact duplicates removed"
        )


def clean_texts(
    texts: Iterable[str], *, deduplicate: bool = True, keep_layout: bool = False
) -> tuple[list[str], CleaningReport]:
    """Clean each text, drop empty ones and exact duplicates (first occurrence kept); count each removal.

    ``keep_layout=True`` preserves indentation and spacing (see :func:`clean_text`); use it for code.

    >>> clean_texts(["a", "a", "  ", "b"])[1].rows_kept
    2
    """
    report = CleaningReport()
    seen: set[str] = set()
    kept = []
    for text in texts:
        report.rows_in += 1
        cleaned = clean_text(text, keep_layout=keep_layout)
        if not cleaned:
            report.rows_empty += 1
            continue
        if deduplicate:
            if cleaned in seen:
                report.rows_duplicate += 1
                continue
            seen.add(cleaned)
        kept.append(cleaned)
    report.rows_kept = len(kept)
    return kept, report


def split_texts(
    texts: Sequence[str], *, validation: float = 0.1, test: float = 0.0, seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle with ``seed`` and cut into train / validation (/ test). Same seed, same split, on any machine.

    >>> sorted(split_texts([str(i) for i in range(10)], validation=0.2))
    ['train', 'validation']
    """
    if not 0 <= validation < 1 or not 0 <= test < 1 or validation + test >= 1:
        raise DataError(
            f"validation ({validation}) and test ({test}) must be fractions in [0, 1) that add up to less than 1."
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(texts) * validation), round(len(texts) * test)
    if validation and n_val == 0 or test and n_test == 0:
        raise DataError(
            f"{len(texts)} texts are too few to split off validation={validation}, test={test} (that rounds to 0 texts). "
            "Add data, raise the fraction, or pass separate validation texts (--eval-data on the command line)."
        )
    splits = {"train": [texts[i] for i in order[n_val + n_test :]], "validation": [texts[i] for i in order[:n_val]]}
    if test:
        splits["test"] = [texts[i] for i in order[n_val : n_val + n_test]]
    return splits


# ----------------------------------------------------------------------------------------------- tokenizing
def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    *,
    add_eos: bool = True,
    batch_size: int = 1000,
    cache_dir: str | os.PathLike | None = None,
) -> list[list[int]]:
    """Tokenize in batches with the (fast) tokenizer; append EOS so the model learns where a text ends.

    With ``cache_dir`` the result is stored under a hash of the tokenizer and the texts and reused next time.

    >>> from gpt_helpers.models import load_tokenizer
    >>> ids = tokenize_texts(load_tokenizer(), ["Hello world"])
    >>> ids[0][-1] == load_tokenizer().eos_token_id
    True
    """
    cache_file = None
    if cache_dir is not None:
        key = _tokenization_key(tokenizer, texts, add_eos)
        cache_file = Path(cache_dir) / f"tokens-{key}.pt"
        if cache_file.exists():
            loaded = torch.load(cache_file, weights_only=True)
            return [row.tolist() for row in torch.split(loaded["ids"], loaded["lengths"].tolist())]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        ids.extend(row + eos for row in encoded)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        flat = torch.tensor([t for row in ids for t in row], dtype=torch.int32)
        lengths = torch.tensor([len(row) for row in ids], dtype=torch.int64)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"ids": flat, "lengths": lengths}, temporary)
        os.replace(temporary, cache_file)
    return ids


def _tokenization_key(tokenizer, texts: Sequence[str], add_eos: bool) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id, add_eos]).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    for text in texts:
        digest.update(len(text).to_bytes(8, "little"))
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:24]


def pack_blocks(token_lists: Sequence[Sequence[int]], block_size: int) -> tuple[torch.Tensor, int]:
    """Concatenate all token lists and cut them into ``block_size`` blocks; return blocks and tokens left over.

    Packing wastes no compute on padding; only the final partial block (fewer than ``block_size`` tokens) is
    left over, and it is counted.

    >>> blocks, left = pack_blocks([[1, 2, 3], [4, 5]], 2)
    >>> blocks.tolist(), left
    ([[1, 2], [3, 4]], 1)
    """
    flat = torch.tensor([t for row in token_lists for t in row], dtype=torch.long)
    n_blocks = flat.numel() // block_size
    return flat[: n_blocks * block_size].view(n_blocks, block_size), int(flat.numel() - n_blocks * block_size)


def pad_sequences(
    token_lists: Sequence[Sequence[int]], max_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-pad (and truncate) to ``max_length``; return ids, attention mask and the number of truncated texts.

    >>> ids, mask, cut = pad_sequences([[5, 6, 7], [8]], 2, pad_id=0)
    >>> ids.tolist(), mask.tolist(), cut
    ([[5, 6], [8, 0]], [[1, 1], [1, 0]], 1)
    """
    ids = torch.full((len(token_lists), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), max_length), dtype=torch.long)
    truncated = 0
    for row, tokens in enumerate(token_lists):
        if len(tokens) > max_length:
            truncated += 1
        tokens = list(tokens)[:max_length]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask, truncated


def labels_from_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for causal LM training: the inputs, with *padding positions* set to -100.

    Masking by the attention mask rather than by ``pad_token_id`` matters for GPT-2, whose pad token is
    its EOS token: masking by id would hide every real EOS and the model would never learn to stop.

    >>> labels_from_attention_mask(torch.tensor([[7, 0, 0]]), torch.tensor([[1, 1, 0]])).tolist()
    [[7, 0, -100]]
    """
    return input_ids.masked_fill(attention_mask == 0, -100)


def document_attention(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document attention for packed blocks: a ``(batch, 1, seq, seq)`` additive mask that lets each token see
    only the earlier tokens of its own document (documents end at ``eos_id``), and position ids that restart at 0
    with every document. With both, each document in a block is computed exactly as if it stood alone.

    >>> mask, positions = document_attention(torch.tensor([[5, 6, 0, 7, 8]]), eos_id=0)
    >>> positions.tolist(), (mask[0, 0] == 0).int().tolist()[3]
    ([[0, 1, 2, 0, 1]], [0, 0, 0, 1, 0])
    """
    batch, length = input_ids.shape
    starts = torch.cat(
        [torch.ones(batch, 1, dtype=torch.bool, device=input_ids.device), input_ids[:, :-1] == eos_id], dim=1
    )  # a document starts after each EOS
    document = starts.long().cumsum(1)
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    mask = torch.zeros(batch, 1, length, length, device=input_ids.device)
    mask.masked_fill_(~(same & causal)[:, None], torch.finfo(mask.dtype).min)
    position = torch.arange(length, device=input_ids.device).expand(batch, length)
    first = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=1).values
    return mask, position - first


class LMDataset(torch.utils.data.Dataset):
    """Fixed-length examples for causal LM training: ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise DataError(
                "No training examples: the texts are too short for one block. Add data or lower block_size."
            )
        self.input_ids = input_ids
        self.attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.labels = labels_from_attention_mask(self.input_ids, self.attention_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())


@dataclass
class DataReport:
    """Statistics of a prepared dataset: rows, tokens, lengths and what packing or padding cost."""

    mode: str
    rows: int
    tokens: int
    block_size: int
    examples: int
    length_min: int
    length_median: float
    length_p95: float
    length_max: int
    tokens_left_over: int = 0
    rows_truncated: int = 0
    tokens_truncated: int = 0
    padding_fraction: float = 0.0
    padding_fraction_if_padded: float = 0.0
    lengths: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report without the per-row lengths (for tables and JSON)."""
        data = asdict(self)
        data.pop("lengths")
        return data

    def __str__(self) -> str:
        text = (
            f"{self.rows:,} texts, {self.tokens:,} tokens (median {self.length_median:.0f}, p95 {self.length_p95:.0f}, "
            f"max {self.length_max}) -> {self.examples:,} {'packed' if self.mode == 'pack' else 'padded'} examples of {self.block_size} tokens"
        )
        if self.mode == "pack":
            text += (
                f"; {self.tokens_left_over} tokens left over ({100 * self.tokens_left_over / max(self.tokens, 1):.2f}%); "
                f"padding would have wasted {100 * self.padding_fraction_if_padded:.1f}% of computed tokens"
            )
        else:
            text += (
                f"; {100 * self.padding_fraction:.1f}% of computed tokens are padding; "
                f"{self.rows_truncated} texts truncated ({self.tokens_truncated:,} tokens)"
            )
        return text


def _padding_waste(lengths: Sequence[int], block_size: int) -> float:
    kept = [min(n, block_size) for n in lengths]
    return 1 - sum(kept) / max(len(kept) * block_size, 1)


def check_block_settings(mode: str, block_size: int, max_context: int | None) -> None:
    """Refuse an unknown layout, a block too small to predict anything, or one longer than the model's context.

    >>> check_block_settings("pack", 128, 256)
    """
    if mode not in ("pack", "pad"):
        raise DataError(f"mode must be 'pack' or 'pad', not {mode!r}.")
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an integer of at least 2, not {block_size!r}.")
    if max_context is not None and block_size > max_context:
        raise DataError(
            f"block_size {block_size} is larger than the model's context of {max_context} tokens. "
            f"Use block_size <= {max_context}."
        )


def prepare_dataset(
    tokenizer,
    texts: Sequence[str],
    *,
    block_size: int = 128,
    mode: str = "pack",
    max_context: int | None = None,
    add_eos: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[LMDataset, DataReport]:
    """Tokenize texts and turn them into fixed-length training examples, with a statistics report.

    ``mode="pack"`` (default) concatenates texts, separated by EOS, into blocks; ``mode="pad"`` keeps one
    text per example, padded (and truncated) to ``block_size`` with an attention mask.
    ``max_context`` (the model's context length) refuses a ``block_size`` the model cannot handle.

    >>> from gpt_helpers.models import load_tokenizer
    >>> dataset, report = prepare_dataset(load_tokenizer(), ["one text", "another text"] * 20, block_size=16)
    >>> dataset[0]["input_ids"].shape
    torch.Size([16])
    """
    check_block_settings(mode, block_size, max_context)
    if not texts:
        raise DataError("No texts to prepare: the list is empty. Check the data file and the cleaning report.")
    token_lists = tokenize_texts(tokenizer, texts, add_eos=add_eos, cache_dir=cache_dir)
    lengths = [len(row) for row in token_lists]
    total = sum(lengths)
    common = dict(
        rows=len(texts),
        tokens=total,
        block_size=block_size,
        length_min=min(lengths),
        length_median=statistics.median(lengths),
        length_p95=float(np.percentile(lengths, 95)),
        length_max=max(lengths),
        padding_fraction_if_padded=_padding_waste(lengths, block_size),
        lengths=lengths,
    )
    if mode == "pack":
        blocks, left_over = pack_blocks(token_lists, block_size)
        if blocks.shape[0] == 0:
            raise DataError(
                f"The {len(texts)} texts hold {total} tokens, fewer than one block of {block_size}. "
                "Add more text or lower block_size."
            )
        dataset = LMDataset(blocks)
        report = DataReport(mode="pack", examples=len(dataset), tokens_left_over=left_over, **common)
    else:
        # Any id can fill padding (labels and attention ignore it); a raw GPT-2 tokenizer has no pad token.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        ids, mask, truncated = pad_sequences(token_lists, block_size, pad_id)
        dataset = LMDataset(ids, mask)
        report = DataReport(
            mode="pad",
            examples=len(dataset),
            rows_truncated=truncated,
            tokens_truncated=sum(max(0, n - block_size) for n in lengths),
            padding_fraction=1 - dataset.num_tokens / ids.numel(),
            **common,
        )
    logger.info("Prepared data: %s", report)
    return dataset, report
