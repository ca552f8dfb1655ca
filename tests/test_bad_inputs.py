"""Bad input of every kind, driven through the real command line: one table, one contract.

Each row builds a malformed input (data file, setting, model folder) in an empty folder and runs
``python -m gpt_helpers`` on it, in process (a few rows also as a real subprocess). For every row: exit
status 2, a one-paragraph error that names the input and says what to do, no traceback, and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_helpers import BUNDLED, load_texts
from gpt_helpers.cli import EXIT_USER_ERROR, main
from gpt_helpers.data import MAX_TEXT_CHARS
from gpt_helpers.errors import DataError

Builder = Callable[[Path], None]
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
GOOD_ROWS = [
    {"text": f"Customer note {i}: the parcel came {'late' if i % 3 else 'early'} and the box was fine."}
    for i in range(60)
]


# ------------------------------------------------------------------------------------------- input builders
def write(name: str, content: str | bytes) -> Builder:
    """A file with exactly this content (text is written as UTF-8)."""

    def build(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    return build


def jsonl(name: str, rows: list, tail: str = "") -> Builder:
    """One JSON value per line, then ``tail`` (e.g. a line cut short)."""
    return write(name, "".join(json.dumps(row) + "\n" for row in rows) + tail)


def model_folder(name: str, change: Callable[[Path], None]) -> Builder:
    """A copy of the bundled base model, then ``change`` applied to the copy."""

    def build(folder: Path) -> None:
        target = folder / name
        target.mkdir()
        for file in MODEL_FILES:
            shutil.copy(BUNDLED["tiny-gpt2-base"] / file, target / file)
        change(target)

    return build


def delete(file: str) -> Callable[[Path], None]:
    return lambda folder: (folder / file).unlink()


def pickle_weights_only(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def gpt2_tokenizer(folder: Path) -> None:
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED["gpt2-tokenizer"] / file, folder / file)


def cut_in_half(file: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        data = (folder / file).read_bytes()
        (folder / file).write_bytes(data[: len(data) // 2])

    return change


def nothing(folder: Path) -> None:
    """No extra input: the row's arguments alone are bad."""


# ------------------------------------------------------------------------------------------------ the table
def finetune(*args: str) -> tuple[str, ...]:
    """A quick, valid fine-tune of good.jsonl into out/; the row's arguments (later flags win) make it bad."""
    return (
        "finetune",
        "--data",
        "good.jsonl",
        "--out",
        "out",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--eval-every",
        "100",
        *args,
    )


@dataclass(frozen=True)
class Row:
    id: str
    args: tuple[str, ...]
    expected: tuple[str, ...]  # phrases of the one-paragraph error: the input by name, the problem, the fix
    build: Builder = nothing


ROWS = [
    # data files
    Row("missing-file", finetune("--data", "nope.jsonl"), ("'nope.jsonl'", "does not exist", "Check the path")),
    Row(
        "empty-file",
        finetune("--data", "empty.jsonl"),
        ("'empty.jsonl'", "is empty", "Put at least one text"),
        write("empty.jsonl", " \n\n"),
    ),
    Row(
        "truncated-jsonl",
        finetune("--data", "cut.jsonl"),
        ("cut.jsonl, line 3", "invalid JSON", "cut short"),
        jsonl("cut.jsonl", GOOD_ROWS[:2], tail='{"text": "the parcel was'),
    ),
    Row(
        "jsonl-wrong-field",
        finetune("--data", "reviews.jsonl"),
        ("reviews.jsonl, line 1", "no 'text' field", "fields: review, stars", "--text-field"),
        jsonl("reviews.jsonl", [{"review": "fine", "stars": 4}]),
    ),
    Row(
        "jsonl-text-not-a-string",
        finetune("--data", "numbers.jsonl"),
        ("numbers.jsonl, line 2", "is int", "Store the text as a string"),
        jsonl("numbers.jsonl", [{"text": "fine"}, {"text": 42}]),
    ),
    Row(
        "jsonl-lines-not-objects",
        finetune("--data", "lists.jsonl"),
        ("lists.jsonl, line 1", "expected a JSON object with a 'text' field"),
        jsonl("lists.jsonl", [["a", "b"]]),
    ),
    Row(
        "binary-junk",
        finetune("--data", "notes.txt"),
        ("'notes.txt'", "binary file", "Export your data as UTF-8"),
        write("notes.txt", b"PK\x03\x04\x14\x00\x00\x00\x08\x00junk" * 50),
    ),
    Row(
        "latin-1-text",
        finetune("--data", "latin1.csv"),
        ("'latin1.csv'", "not valid UTF-8", "byte 0xe9 at line 2", "iconv -f latin1"),
        write("latin1.csv", "id,text\n1,caf\u00e9 au lait\n".encode("latin-1")),
    ),
    Row(
        "one-enormous-line",
        finetune("--data", "huge.jsonl"),
        ("huge.jsonl, line 2", f"limit {MAX_TEXT_CHARS:,}", "Split such documents into smaller rows"),
        jsonl("huge.jsonl", [{"text": "short"}, {"text": "word " * (MAX_TEXT_CHARS // 5 + 1)}]),
    ),
    Row(
        "one-enormous-csv-field",
        finetune("--data", "huge.csv"),
        ("huge.csv, line 3", f"limit {MAX_TEXT_CHARS:,}", "Split such documents into smaller rows"),
        write("huge.csv", "id,text\n1,short\n2," + "word " * (MAX_TEXT_CHARS // 5 + 1) + "\n"),
    ),
    Row(
        "ragged-csv",
        finetune("--data", "ragged.csv"),
        ("ragged.csv, line 3", "3 fields but the header has 2", "must be quoted"),
        write("ragged.csv", "id,text\n1,fine\n2,late, but fine\n"),
    ),
    Row(
        "csv-without-text-column",
        finetune("--data", "cols.csv"),
        ("cols.csv", "no 'text' column", "columns: id, review", "--text-field"),
        write("cols.csv", "id,review\n1,fine\n"),
    ),
    Row(
        "unknown-text-field",
        finetune("--text-field", "body"),
        ("good.jsonl, line 1", "no 'body' field", "--text-field"),
    ),
    Row(
        "folder-without-txt-files",
        finetune("--data", "docs"),
        ("'docs'", "no .txt files", "one document per .txt file"),
        write("docs/notes.md", "# notes\n"),
    ),
    Row(
        "unsupported-file-type",
        finetune("--data", "sheet.xlsx"),
        ("'sheet.xlsx'", "unsupported file type", "Use .jsonl"),
        write("sheet.xlsx", b"PK\x03\x04"),
    ),
    Row(
        "empty-after-cleaning",
        finetune("--data", "blank.jsonl"),
        ("'blank.jsonl'", "all 4 rows are empty after cleaning", "--text-field"),
        jsonl("blank.jsonl", [{"text": t} for t in ("   ", "&nbsp;", "\n\n", "&amp;nbsp; ")]),
    ),
    Row(
        "too-few-texts-to-split",
        finetune("--data", "three.jsonl"),
        ("3 texts are too few", "validation=0.1", "--eval-data"),
        jsonl("three.jsonl", GOOD_ROWS[:3]),
    ),
    Row(
        "too-little-text-for-one-block",
        finetune("--data", "hi.txt", "--validation", "0"),
        ("fewer than one block of 16", "lower block_size"),
        write("hi.txt", "hi"),
    ),
    Row(
        "misspelt-course-dataset",
        finetune("--data", "drug_review"),
        ("'drug_review'", "neither a file nor a course dataset", "Did you mean 'drug_reviews'?"),
    ),
    Row(
        "bad-validation-file",
        finetune("--eval-data", "val.jsonl"),
        ("val.jsonl, line 2", "invalid JSON"),
        jsonl("val.jsonl", GOOD_ROWS[:1], tail='{"text": '),
    ),
    # settings: command-line flags and config files
    Row("steps-zero", finetune("--steps", "0"), ("--steps", "must be at least 1, got 0")),
    Row("steps-negative", finetune("--steps", "-3"), ("--steps", "must be at least 1, got -3")),
    Row("lr-a-string", finetune("--lr", "fast"), ("--lr", "expected a number such as 5e-4, got 'fast'")),
    Row("lr-negative", finetune("--lr", "-1e-3"), ("--lr", "must be positive, got -0.001")),
    Row("lr-zero", finetune("--lr", "0"), ("--lr", "must be positive, got 0.0")),
    Row("lr-above-one", finetune("--lr", "5"), ("learning_rate", "between 0 and 1", "1e-5 to 1e-3")),
    Row("batch-size-zero", finetune("--batch-size", "0"), ("--batch-size", "must be at least 1, got 0")),
    Row("batch-larger-than-data", finetune("--batch-size", "500"), ("one step's batch of 500", "Lower batch_size")),
    Row("epochs-negative", finetune("--epochs", "-1"), ("--epochs", "must be positive, got -1.0")),
    Row("validation-fraction-above-one", finetune("--validation", "1.5"), ("--validation", "fraction below 1")),
    Row(
        "block-size-above-context",
        finetune("--block-size", "100000"),
        ("block_size 100000", "context of 256 tokens", "Use block_size <= 256"),
    ),
    Row("block-size-one", finetune("--block-size", "1"), ("block_size", "at least 2, not 1")),
    Row(
        "config-lr-a-string",
        finetune("--config", "run.json"),
        ("run.json", "learning_rate must be a number", "'fast'"),
        write("run.json", '{"learning_rate": "fast"}'),
    ),
    Row(
        "config-unknown-key",
        finetune("--config", "run.json"),
        ("run.json", "Unknown setting(s): learnin_rate"),
        write("run.json", '{"learnin_rate": 0.001}'),
    ),
    Row(
        "config-invalid-json",
        finetune("--config", "run.json"),
        ("run.json, line 1", "invalid JSON"),
        write("run.json", '{"max_steps": 5,'),
    ),
    Row("config-missing", finetune("--config", "nope.json"), ("'nope.json'", "does not exist")),
    Row(
        "out-is-a-file",
        finetune("--out", "notes.txt"),
        ("'notes.txt' is a file, not a folder", "Choose another --out"),
        write("notes.txt", "my notes\n"),
    ),
    Row(
        "resume-without-checkpoint",
        finetune("--resume"),
        ("--resume", "no checkpoint in 'out/checkpoints'", "drop --resume"),
    ),
    # model folders and names
    Row(
        "model-without-config-json",
        finetune("--model", "no_config"),
        ("'no_config'", "no config.json", "save_pretrained"),
        model_folder("no_config", delete("config.json")),
    ),
    Row(
        "model-with-only-a-pickle",
        finetune("--model", "pickled"),
        ("'pickled'", "only pickle-based weights", "safe_serialization=True"),
        model_folder("pickled", pickle_weights_only),
    ),
    Row(
        "tokenizer-of-another-model",
        finetune("--model", "mixed"),
        ("'mixed'", "50257 tokens", "8192 rows", "Load the tokenizer saved with this model"),
        model_folder("mixed", gpt2_tokenizer),
    ),
    Row(
        "config-json-cut-short",
        finetune("--model", "cut_config"),
        ("config.json' is not valid JSON", "copy or save the model again"),
        model_folder("cut_config", cut_in_half("config.json")),
    ),
    Row(
        "weights-cut-short",
        finetune("--model", "cut_weights"),
        ("'cut_weights' could not be loaded", "copy or save the model again"),
        model_folder("cut_weights", cut_in_half("model.safetensors")),
    ),
    Row("model-folder-missing", finetune("--model", "./no_such_model"), ("'./no_such_model'", "does not exist")),
    Row("hub-name-offline", finetune("--model", "gpt2"), ("'gpt2'", "unreachable", "--model tiny-gpt2-base")),
    # the other commands
    Row(
        "evaluate-missing-model",
        ("evaluate", "--model", "./gone", "--data", "good.jsonl"),
        ("'./gone'", "does not exist"),
    ),
    Row("evaluate-missing-data", ("evaluate", "--data", "nope.jsonl"), ("'nope.jsonl'", "does not exist")),
    Row(
        "evaluate-unknown-split",
        ("evaluate", "--data", "drug_reviews", "--split", "valid"),
        ("Unknown split 'valid'", "train, validation, test"),
    ),
    Row(
        "generate-missing-model", ("generate", "--model", "./gone", "--prompt", "Hello"), ("'./gone'", "does not exist")
    ),
    Row(
        "generate-beyond-context",
        ("generate", "--prompt", "Hello", "--max-new-tokens", "1000"),
        ("max_new_tokens=1000", "context of 256 tokens", "--max-new-tokens"),
    ),
    Row(
        "generate-temperature-zero",
        ("generate", "--prompt", "Hello", "--temperature", "0"),
        ("--temperature", "must be positive"),
    ),
]
SUBPROCESS_ROWS = ("truncated-jsonl", "lr-negative", "weights-cut-short")


def test_the_table_covers_at_least_24_distinct_inputs():
    assert len(ROWS) >= 24 and len({row.id for row in ROWS}) == len(ROWS)


# ------------------------------------------------------------------------------------------------ the contract
def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder holding only good.jsonl, where relative paths in the rows resolve."""
    jsonl("good.jsonl", GOOD_ROWS)(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(args: tuple[str, ...]) -> int:
    try:
        return main(list(args))
    except SystemExit as stop:  # argparse refuses bad flags by exiting
        return stop.code


def check_refusal(row: Row, status: int, stdout: str, stderr: str) -> None:
    assert status == EXIT_USER_ERROR, f"exit status {status}\n{stderr}"
    assert "Traceback" not in stdout + stderr and "unexpected error" not in stderr and "usage:" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr  # one paragraph, no usage block
    for phrase in row.expected:
        assert phrase in errors[0], f"{phrase!r} not in: {errors[0]}"


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_refused_by_name_with_the_fix_and_writes_nothing(row: Row, workdir: Path, capsys):
    row.build(workdir)
    before = tree(workdir)
    status = run_main(row.args)
    captured = capsys.readouterr()
    check_refusal(row, status, captured.out, captured.err)
    assert tree(workdir) == before, "the command wrote or changed files"


@pytest.mark.parametrize("row_id", SUBPROCESS_ROWS)
def test_a_real_process_exits_non_zero_without_a_traceback(row_id: str, workdir: Path):
    row = next(row for row in ROWS if row.id == row_id)
    row.build(workdir)
    before = tree(workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", "gpt_helpers", *row.args],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=300,
    )
    check_refusal(row, result.returncode, result.stdout, result.stderr)
    assert tree(workdir) == before


def test_debug_shows_the_full_error(workdir: Path):
    row = next(row for row in ROWS if row.id == "truncated-jsonl")
    row.build(workdir)
    with pytest.raises(DataError, match="cut.jsonl, line 3"):
        main(["--debug", *row.args])


# ------------------------------------------------------------------------------------- edge inputs that are fine
def test_one_long_line_under_the_limit_is_packed_into_many_blocks(workdir: Path, capsys):
    write("book.txt", "The parcel came late again. " * 10_000)(workdir)  # one 280,000-character line
    args = finetune("--data", "book.txt", "--validation", "0", "--steps", "1")
    assert main(list(args)) == 0, capsys.readouterr().err
    report = json.loads((workdir / "out" / "data_report.json").read_text())["train"]
    assert report["rows"] == 1 and report["examples"] == report["tokens"] // 16 > 1000


def test_a_csv_field_longer_than_the_csv_modules_default_limit_loads(tmp_path: Path):
    path = tmp_path / "long.csv"
    path.write_text("id,text\n1,short\n2," + "word " * 40_000 + "\n", encoding="utf-8")
    assert [len(text) for text in load_texts(path)] == [5, 200_000]


def test_utf16_text_with_a_byte_order_mark_loads(tmp_path: Path):
    path = tmp_path / "export.tsv"  # what Excel's "Unicode text" export writes
    path.write_bytes("id\ttext\n1\tcaf\u00e9 au lait\n".encode("utf-16"))
    assert load_texts(path) == ["caf\u00e9 au lait"]
