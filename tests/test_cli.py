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
    return subprocess.run([sys.executable, "-m", "gpt_helpers", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=300)


def test_help_explains_finetune():
    result = run_cli("finetune", "--help")
    assert result.returncode == 0
    for flag in ("--data", "--model", "--out", "--steps", "--lr", "--resume"):
        assert flag in result.stdout


def test_finetune_end_to_end_on_a_jsonl_file(tmp_path):
    data = tmp_path / "notes.jsonl"
    rows = [{"body": f"Customer note {i}: the delivery was {'late' if i % 3 else 'on time'} and the box was fine."}
            for i in range(120)]
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    result = run_cli("finetune", "--data", str(data), "--text-field", "body", "--out", str(out), "--steps", "6",
                     "--batch-size", "4", "--block-size", "32", "--eval-every", "3", "--save-every", "3")
    assert result.returncode == 0, result.stderr
    for path in ("model/config.json", "model/model.safetensors", "best/model.safetensors", "history.json", "history.png"):
        assert (out / path).exists(), path
    assert str(out / "history.png") in result.stdout
    history = json.loads((out / "history.json").read_text())
    evals = [r["eval_loss"] for r in history["records"] if r["eval_loss"] is not None]
    assert len(evals) == 2 and evals[-1] < evals[0]

    resumed = run_cli("finetune", "--data", str(data), "--text-field", "body", "--out", str(out), "--steps", "9",
                      "--batch-size", "4", "--block-size", "32", "--eval-every", "3", "--save-every", "3", "--resume",
                      "--allow-config-change")  # 9 steps instead of 6: a change the user must confirm
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stderr
    assert json.loads((out / "history.json").read_text())["records"][-1]["step"] == 9
