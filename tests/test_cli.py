"""The command line end to end: help, and a real fine-tune that resumes (bad input: test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "gpt_helpers", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=300,
    )


def test_help_explains_finetune():
    result = run_cli("finetune", "--help")
    assert result.returncode == 0
    for flag in ("--data", "--model", "--out", "--steps", "--lr", "--resume"):
        assert flag in result.stdout


def test_finetune_end_to_end_on_a_jsonl_file(tmp_path):
    data = tmp_path / "notes.jsonl"
    rows = [
        {"body": f"Customer note {i}: the delivery was {'late' if i % 3 else 'on time'} and the box was fine."}
        for i in range(120)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    result = run_cli(
        "finetune",
        "--data",
        str(data),
        "--text-field",
        "body",
        "--out",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--eval-every",
        "3",
        "--save-every",
        "3",
    )
    assert result.returncode == 0, result.stderr
    for path in (
        "model/config.json",
        "model/model.safetensors",
        "best/model.safetensors",
        "history.json",
        "history.png",
    ):
        assert (out / path).exists(), path
    assert str(out / "history.png") in result.stdout
    history = json.loads((out / "history.json").read_text())
    evals = [r["eval_loss"] for r in history["records"] if r["eval_loss"] is not None]
    assert len(evals) == 2 and evals[-1] < evals[0]

    resumed = run_cli(
        "finetune",
        "--data",
        str(data),
        "--text-field",
        "body",
        "--out",
        str(out),
        "--steps",
        "9",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--resume",
        "--allow-config-change",
    )  # 9 steps instead of 6: a change the user must confirm
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stderr
    assert json.loads((out / "history.json").read_text())["records"][-1]["step"] == 9


def test_a_setting_given_only_in_the_config_file_survives(tmp_path):
    from gpt_helpers.cli import _training_config, build_parser

    config_file = tmp_path / "run.json"
    config_file.write_text(
        json.dumps(
            {
                "batch_size": 3,
                "learning_rate": 2e-4,
                "eval_every": 7,
                "seed": 5,
                "save_every": 4,
                "early_stopping_patience": 2,
                "max_steps": 11,
            }
        )
    )
    args = build_parser().parse_args(
        [
            "finetune",
            "--data",
            "drug_reviews",
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config_file),
            "--lr",
            "3e-4",
        ]
    )
    config = _training_config(args)
    # only --lr and --out were given: every other value is the file's, none is an argparse default
    assert (
        config.batch_size,
        config.eval_every,
        config.seed,
        config.save_every,
        config.early_stopping_patience,
        config.max_steps,
    ) == (3, 7, 5, 4, 2, 11)
    assert config.learning_rate == 3e-4 and config.output_dir == str(tmp_path / "out")
    steps_only = build_parser().parse_args(
        ["finetune", "--data", "x", "--out", "o", "--config", str(config_file), "--epochs", "2"]
    )
    assert (_training_config(steps_only).max_steps, _training_config(steps_only).epochs) == (None, 2.0)


def test_every_training_setting_is_a_flag_named_after_its_field():
    from dataclasses import fields

    from gpt_helpers import TrainingConfig

    help_text = run_cli("finetune", "--help").stdout
    for spec in fields(TrainingConfig):
        assert f"--{spec.name.replace('_', '-')}" in help_text, spec.name
    for alias in ("--out", "--steps", "--lr", "--grad-accum", "--patience", "--lora", "--lora-r", "--lora-targets"):
        assert alias in help_text
