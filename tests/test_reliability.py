"""Interrupted runs lose nothing: SIGKILL mid-run or mid-checkpoint, then resume to the very same result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt_helpers as gh
from gpt_helpers import checkpoints
from gpt_helpers.errors import CheckpointError, ModelLoadError

STEPS = 10

# One training run, driven by environment variables so the same code runs uninterrupted, killed and resumed.
RUN = textwrap.dedent(f"""
    import logging, os, signal, time, torch
    import gpt_helpers as gh
    from gpt_helpers import checkpoints
    from gpt_helpers.models import build_model_from_config, tiny_gpt2_config

    logging.basicConfig(level=logging.INFO)
    tokenizer = gh.load_tokenizer("tiny-gpt2-base")
    texts = gh.load_course_dataset("drug_reviews", "validation")[:40]
    data, _ = gh.prepare_dataset(tokenizer, texts, block_size=32)
    model = build_model_from_config(tiny_gpt2_config(vocab_size=len(tokenizer), n_positions=32), seed=5)
    config = gh.TrainingConfig(output_dir=os.environ["OUT"], max_steps={STEPS}, batch_size=4, learning_rate=3e-3,
                               warmup_steps=2, eval_every=3, save_every=2, keep_last=2, progress=False, plot=False,
                               resume=os.environ.get("RESUME") == "1", seed=7, device="cpu")
    pause_at = int(os.environ.get("PAUSE_AT", "0"))
    kill_in_write = int(os.environ.get("KILL_IN_CHECKPOINT", "0"))

    class Pause:
        def on_step_end(self, state):
            if state.step == pause_at:
                open(os.path.join(os.environ["OUT"], "paused"), "w").close()
                time.sleep(120)  # the test kills the process here

    if kill_in_write:
        real_save, calls = torch.save, []
        def dying_save(obj, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == kill_in_write:
                with open(path, "wb") as handle:
                    handle.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *args, **kwargs)
        checkpoints.torch.save = dying_save

    gh.train(model, tokenizer, data, data, config, callbacks=[Pause()])
""")


def run(out: Path, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "OUT": str(out),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-c", RUN], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


def comparable(history_file: Path) -> list[dict]:
    records = json.loads(history_file.read_text())["records"]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "elapsed_seconds")} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(run(out))
    return out


def test_sigkill_mid_epoch_then_resume_gives_bitwise_identical_weights_and_history(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = run(out, PAUSE_AT="5")
    deadline = time.time() + 240
    while not (out / "paused").exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, "the run never reached step 5"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints.latest_checkpoint(out).name == "step-000004"

    stderr = finish(run(out, RESUME="1"))
    assert "Resumed from" in stderr and "step-000004" in stderr
    expected, resumed = (
        load_file(uninterrupted / "model" / "model.safetensors"),
        load_file(out / "model" / "model.safetensors"),
    )
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert comparable(out / "history.json") == comparable(uninterrupted / "history.json")


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(uninterrupted, tmp_path):
    out = tmp_path / "torn"
    process = run(out, KILL_IN_CHECKPOINT="2")  # dies half-way through writing the step-4 checkpoint
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert list((out / "checkpoints").glob(".tmp-step-000004-*")), "the torn write stays in its temporary folder"
    assert checkpoints.latest_checkpoint(out).name == "step-000002"

    stderr = finish(run(out, RESUME="1"))
    assert "step-000002" in stderr
    assert not list((out / "checkpoints").glob(".tmp-*")), "leftovers of the torn write are cleaned up"
    expected, resumed = (
        load_file(uninterrupted / "model" / "model.safetensors"),
        load_file(out / "model" / "model.safetensors"),
    )
    assert all(torch.equal(resumed[name], value) for name, value in expected.items())


def test_rotation_keeps_the_newest_checkpoints_and_never_the_best_model_away(uninterrupted):
    assert [p.name for p in checkpoints.list_checkpoints(uninterrupted)] == ["step-000008", "step-000010"]
    history = json.loads((uninterrupted / "history.json").read_text())
    best_step = history["info"]["best_step"]
    assert (uninterrupted / "best" / "model.safetensors").exists() and best_step is not None


def test_a_pickle_bearing_checkpoint_is_refused(uninterrupted, tmp_path):
    folder = tmp_path / "checkpoints" / "step-000010"
    folder.parent.mkdir(parents=True)
    shutil.copytree(checkpoints.latest_checkpoint(uninterrupted), folder)
    torch.save({"optimizer": {}, "rng": {}, "payload": Path("anything")}, folder / checkpoints.TENSOR_STATE_FILE)
    model, _ = gh.load_model("tiny-gpt2-base")
    with pytest.raises(CheckpointError, match="pickled objects can run code"):
        checkpoints.load_checkpoint(folder, model)


def test_remote_code_is_not_run_unless_asked(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "modeling_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilModel",
                },
            }
        )
    )
    (folder / "model.safetensors").write_bytes(b"")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gh.BUNDLED["tiny-gpt2-base"] / name, folder / name)
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        gh.load_model(str(folder))
    assert not marker.exists()
