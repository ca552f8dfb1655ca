"""Faults a learner actually meets: a killed LoRA run, Ctrl-C, a full disk, a damaged newest checkpoint, a changed
config on resume, a NaN mid-run. Each ends with nothing lost and a message that says what to do."""

from __future__ import annotations

import errno
import json
import os
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
from gpt_helpers.errors import CheckpointError, ConfigError, TrainingError
from gpt_helpers.strategies import apply_lora

from conftest import make_tiny_gpt2, quick_config

# One run of a strategy, driven by environment variables: uninterrupted, killed at a step, or resumed.
RUN = textwrap.dedent("""
    import logging, os, time, torch
    import gpt_helpers as gh
    from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    from gpt_helpers.strategies import apply_lora, discriminative_param_groups, save_merged

    logging.basicConfig(level=logging.INFO)
    strategy, real = os.environ["STRATEGY"], os.environ.get("MODEL") == "real"
    if real:
        model, tokenizer = gh.load_model("smollm2-135m-instruct")
    else:
        tokenizer = gh.load_tokenizer("tiny-gpt2-base")
        config = tiny_gpt2_config(vocab_size=len(tokenizer), n_positions=32)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1  # dropout: the random state must resume too
        model = build_model_from_config(config, seed=5)
    texts = gh.load_course_dataset("drug_reviews", "validation")[:40]
    data, _ = gh.prepare_dataset(tokenizer, texts, block_size=32)
    groups = None
    if strategy == "lora":
        model = apply_lora(model, r=4, alpha=8, dropout=0.1)
    elif strategy == "discriminative":
        groups = discriminative_param_groups(model, 3e-3)
    steps = int(os.environ["STEPS"])
    config = gh.TrainingConfig(output_dir=os.environ["OUT"], max_steps=steps, batch_size=2 if real else 4,
                               learning_rate=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, save_every=2,
                               keep_last=2, log_every=2, progress=False, plot=False, seed=7, device="cpu",
                               precision="fp32", resume=os.environ.get("RESUME") == "1")
    pause_at = int(os.environ.get("PAUSE_AT", "0"))

    class Pause:
        def on_step_end(self, state):
            if state.step == pause_at:
                open(os.path.join(os.environ["OUT"], "paused"), "w").close()
                deadline = time.time() + 120
                while not state.stop_requested and time.time() < deadline:  # a long step; the test kills or interrupts it
                    time.sleep(0.05)

    result = gh.train(model, tokenizer, data, data, config, param_groups=groups, callbacks=[Pause()])
    print("STOP:", result.stop_reason)
    if strategy == "lora" and not result.stop_reason.startswith("interrupted"):
        save_merged(result.model, tokenizer, os.path.join(os.environ["OUT"], "merged"))
""")


def start(out: Path, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "OUT": str(out),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "STEPS": "8",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-c", RUN], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def wait_for_pause(process: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 300
    while not (out / "paused").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached the pause"
        time.sleep(0.1)


def final_states(out: Path) -> tuple[dict, dict]:
    """The weights the run saved last (adapters or the whole model) and its optimizer state."""
    folder = checkpoints.latest_checkpoint(out)
    weights = load_file(folder / checkpoints.WEIGHTS_FILE)
    optimizer = torch.load(folder / checkpoints.TENSOR_STATE_FILE, weights_only=True)["optimizer"]
    return weights, optimizer


def assert_same_tensors(first, second, where: str = "") -> None:
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), where
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_same_tensors(first[key], second[key], f"{where}/{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert first == second, where


def records(out: Path) -> list[dict]:
    rows = json.loads((out / "history.json").read_text())["records"]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "elapsed_seconds")} for r in rows]


# ------------------------------------------------------------------------------------------ 1. killed and resumed
@pytest.mark.parametrize("strategy, model", [("lora", "tiny"), ("discriminative", "tiny"), ("lora", "real")])
def test_a_killed_run_resumes_to_the_same_weights_optimizer_and_history(strategy, model, tmp_path, real_model):
    env = {"STRATEGY": strategy, "MODEL": model, **({"STEPS": "4"} if model == "real" else {})}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(start(whole, **env))

    process = start(killed, PAUSE_AT="3", **env)  # mid-epoch, between the checkpoints of steps 2 and 4
    wait_for_pause(process, killed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints.latest_checkpoint(killed).name == "step-000002"
    _, stderr = finish(start(killed, RESUME="1", **env))
    assert "Resumed from" in stderr and "step-000002" in stderr

    expected_weights, expected_optimizer = final_states(whole)
    resumed_weights, resumed_optimizer = final_states(killed)
    assert_same_tensors(expected_weights, resumed_weights, "weights")
    assert_same_tensors(expected_optimizer, resumed_optimizer, "optimizer")
    assert records(killed) == records(whole)
    if strategy == "lora":
        assert all("lora_" in name for name in expected_weights), "a LoRA checkpoint holds the adapters only"
        assert_same_tensors(
            load_file(whole / "merged" / "model.safetensors"),
            load_file(killed / "merged" / "model.safetensors"),
            "merged",
        )


def test_resuming_lora_on_another_base_model_is_refused(tmp_path, tokenizer, drug_reviews):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)
    config = quick_config(tmp_path, max_steps=4, save_every=2)
    gh.train(apply_lora(make_tiny_gpt2(tokenizer, seed=1), r=4), tokenizer, data, None, config.replace(max_steps=2))
    other_base = apply_lora(make_tiny_gpt2(tokenizer, seed=2), r=4)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="another setup.*frozen_weights"):
        gh.train(other_base, tokenizer, data, None, config.replace(resume=True, allow_config_change=True))


# ------------------------------------------------------------------------------------------ 2. Ctrl-C and Stop
def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_to_the_same_weights(tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    finish(start(whole, STRATEGY="full"))
    process = start(interrupted, STRATEGY="full", PAUSE_AT="5")
    wait_for_pause(process, interrupted)
    process.send_signal(signal.SIGINT)  # what a notebook's "interrupt kernel" sends
    stdout, stderr = finish(process)
    assert "STOP: interrupted (Ctrl-C) after step 5" in stdout and "resume=True" in stdout
    assert checkpoints.latest_checkpoint(interrupted).name == "step-000005"
    saved = json.loads((interrupted / "history.json").read_text())
    assert saved["records"][-1]["step"] == 5 and saved["info"]["stop_reason"].startswith("interrupted")

    finish(start(interrupted, STRATEGY="full", RESUME="1"))
    expected, resumed = final_states(whole), final_states(interrupted)
    assert_same_tensors(expected[0], resumed[0], "weights")
    kept = {r["step"] for r in records(interrupted)}
    assert {r["step"] for r in records(whole) if r["eval_loss"] is not None} <= kept  # nothing written is lost


def test_an_interrupt_inside_a_notebook_returns_the_partial_result(tokenizer, drug_reviews, tmp_path):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)

    class CtrlC:
        def on_step_end(self, state):
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    result = gh.train(
        make_tiny_gpt2(tokenizer), tokenizer, data, None, quick_config(tmp_path, max_steps=10), callbacks=[CtrlC()]
    )
    assert result.stop_reason.startswith("interrupted (Ctrl-C) after step 3") and result.history.final.step == 3
    assert result.last_checkpoint.name == "step-000003" and "resume=True" in str(result)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_stopped_run_without_save_every_still_leaves_a_resumable_checkpoint(tokenizer, drug_reviews, tmp_path):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)

    class StopAt5:
        def on_step_end(self, state):
            state.stop_requested = state.stop_requested or state.step == 5

    whole = gh.train(
        make_tiny_gpt2(tokenizer, dropout=0.1), tokenizer, data, None, quick_config(tmp_path / "a", max_steps=8)
    )
    stopped = gh.train(
        make_tiny_gpt2(tokenizer, dropout=0.1),
        tokenizer,
        data,
        None,
        quick_config(tmp_path / "b", max_steps=8),
        callbacks=[StopAt5()],
    )
    assert stopped.last_checkpoint.name == "step-000005"
    resumed = gh.train(
        make_tiny_gpt2(tokenizer, dropout=0.1, seed=4),
        tokenizer,
        data,
        None,
        quick_config(tmp_path / "b", max_steps=8, resume=True),
    )
    assert_same_tensors(whole.model.state_dict(), resumed.model.state_dict())


# ------------------------------------------------------------------------------------------ 3. a full disk
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_what_to_free(
    tokenizer, drug_reviews, tmp_path, monkeypatch
):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)
    real_save, calls = torch.save, []

    def disk_fills_up(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then no space left
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", disk_fills_up)
    config = quick_config(tmp_path, max_steps=8, save_every=2, eval_every=1, save_best=True)
    with pytest.raises(CheckpointError) as caught:
        gh.train(make_tiny_gpt2(tokenizer), tokenizer, data, data, config)
    message = str(caught.value)
    out = tmp_path / "run"
    assert "step-000004" in message and str(out / "checkpoints") in message and "No space left" in message
    assert "MiB are free" in message and "needs about" in message and "resume=True" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"], "no partial files are left"
    assert checkpoints.verify_checkpoint(out / "checkpoints" / "step-000002") is None
    checkpoints.load_checkpoint(out / "checkpoints" / "step-000002", make_tiny_gpt2(tokenizer))
    gh.load_model(str(out / "best"))  # the best model is intact and loadable


def test_a_full_disk_while_saving_the_best_model_keeps_the_earlier_one(tokenizer, drug_reviews, tmp_path, monkeypatch):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)
    config = quick_config(tmp_path, max_steps=6, eval_every=2, save_best=True, learning_rate=3e-3)
    first = gh.train(make_tiny_gpt2(tokenizer), tokenizer, data, data, config.replace(max_steps=2))
    best_before = load_file(first.best_dir / "model.safetensors")

    def full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(first.model), "save_pretrained", full)
    with pytest.raises(
        CheckpointError, match="Could not write the model folder.*best.*No space left.*earlier best/ is intact"
    ):
        gh.train(make_tiny_gpt2(tokenizer), tokenizer, data, data, config.replace(output_dir=str(tmp_path / "run")))
    assert_same_tensors(best_before, load_file(first.best_dir / "model.safetensors"))
    assert not list((tmp_path / "run").glob(".tmp-*"))


# ------------------------------------------------------------------------------------------ 4. a damaged checkpoint
@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, tokenizer, drug_reviews, tmp_path, caplog):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)
    common = dict(max_steps=12, save_every=4, keep_last=3, log_every=2)
    whole = gh.train(
        make_tiny_gpt2(tokenizer, dropout=0.1), tokenizer, data, None, quick_config(tmp_path / "whole", **common)
    )

    class StopAt8:
        def on_step_end(self, state):
            state.stop_requested = state.stop_requested or state.step == 8

    gh.train(
        make_tiny_gpt2(tokenizer, dropout=0.1),
        tokenizer,
        data,
        None,
        quick_config(tmp_path / "run", **common),
        callbacks=[StopAt8()],
    )
    newest = tmp_path / "run" / "run" / "checkpoints" / "step-000008"
    target = newest / (checkpoints.WEIGHTS_FILE if damage == "truncated" else checkpoints.TENSOR_STATE_FILE)
    data_bytes = bytearray(target.read_bytes())
    if damage == "truncated":
        target.write_bytes(bytes(data_bytes[: len(data_bytes) // 2]))
    else:
        data_bytes[len(data_bytes) // 2] ^= 0x01
        target.write_bytes(bytes(data_bytes))
    with caplog.at_level("WARNING", logger="gpt_helpers"):
        resumed = gh.train(
            make_tiny_gpt2(tokenizer, dropout=0.1, seed=3),
            tokenizer,
            data,
            None,
            quick_config(tmp_path / "run", resume=True, **common),
        )
    warnings = caplog.text
    assert "step-000008" in warnings and ("cut short" in warnings if damage == "truncated" else "checksum" in warnings)
    assert "Resuming from step-000004 instead" in warnings
    assert resumed.history.info["resumed_from"].endswith("step-000004")
    assert_same_tensors(whole.model.state_dict(), resumed.model.state_dict())


# ------------------------------------------------------------------------------------------ 5. a changed config
@pytest.fixture
def checkpointed(tokenizer, drug_reviews, tmp_path):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:60], block_size=32)
    config = quick_config(tmp_path, max_steps=4, save_every=2)
    gh.train(make_tiny_gpt2(tokenizer), tokenizer, data, None, config)
    return data, config.replace(resume=True)


@pytest.mark.parametrize(
    "change, fields",
    [
        ({"batch_size": 2}, "batch_size=4 (now 2)"),
        ({"learning_rate": 5e-4}, "learning_rate=0.001 (now 0.0005)"),
        ({"seed": 1}, "seed=0 (now 1)"),
    ],
)
def test_resuming_with_other_optimisation_settings_is_refused_naming_them(change, fields, checkpointed, tokenizer):
    data, config = checkpointed
    with pytest.raises(ConfigError, match="other training settings") as caught:
        gh.train(make_tiny_gpt2(tokenizer), tokenizer, data, None, config.replace(allow_config_change=True, **change))
    assert fields in str(caught.value)


def test_resuming_with_other_data_or_model_is_refused(checkpointed, tokenizer, drug_reviews):
    data, config = checkpointed
    other_blocks, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:60], block_size=16)
    with pytest.raises(CheckpointError, match="block_size=32 \\(now 16\\)"):
        gh.train(make_tiny_gpt2(tokenizer), tokenizer, other_blocks, None, config)
    other_texts, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][60:120], block_size=32)
    with pytest.raises(CheckpointError, match="train_data"):
        gh.train(make_tiny_gpt2(tokenizer), tokenizer, other_texts, None, config)
    bigger = make_tiny_gpt2(tokenizer, n_embd=64)
    with pytest.raises(CheckpointError, match="parameters="):
        gh.train(bigger, tokenizer, data, None, config)


def test_more_steps_on_resume_need_the_users_word(checkpointed, tokenizer):
    data, config = checkpointed
    with pytest.raises(ConfigError, match="max_steps=4 \\(now 8\\).*allow_config_change=True"):
        gh.train(make_tiny_gpt2(tokenizer), tokenizer, data, None, config.replace(max_steps=8))
    result = gh.train(
        make_tiny_gpt2(tokenizer),
        tokenizer,
        data,
        None,
        config.replace(max_steps=8, eval_every=3, allow_config_change=True),
    )
    assert result.history.final.step == 8 and result.history.info["resume_changes"] == [
        "eval_every: 1000 -> 3",
        "max_steps: 4 -> 8",
    ]


def test_the_cli_refuses_a_resume_with_another_batch_size(tmp_path):
    from test_cli import run_cli

    data = tmp_path / "notes.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"Note {i}: the parcel came late and the box was fine."}) for i in range(80)),
        encoding="utf-8",
    )
    args = [
        "finetune",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--block-size",
        "16",
        "--save-every",
        "1",
        "--no-progress",
    ]
    assert run_cli(*args, "--batch-size", "4").returncode == 0
    refused = run_cli(*args, "--batch-size", "8", "--resume")
    assert refused.returncode == 2 and "batch_size=4 (now 8)" in refused.stderr and "Traceback" not in refused.stderr


# ------------------------------------------------------------------------------------------ 6. NaN mid-run
def test_a_nan_mid_run_stops_at_once_and_keeps_the_checkpoint_and_best_model(tokenizer, drug_reviews, tmp_path):
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)
    model = make_tiny_gpt2(tokenizer)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 7:  # the 5th training step's forward (after 4 steps and 2 evaluations of 1 batch)
            output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(poison)
    config = quick_config(tmp_path, max_steps=10, save_every=2, eval_every=2, eval_batches=1, save_best=True)
    with pytest.raises(TrainingError) as caught:
        gh.train(model, tokenizer, data, data, config)
    message = str(caught.value)
    assert "loss became nan at step 5" in message and "not applied" in message and "10× lower" in message
    assert "step-000004" in message and "best" in message
    out = tmp_path / "run"
    last = checkpoints.latest_checkpoint(out)
    assert last.name == "step-000004" and checkpoints.verify_checkpoint(last) is None
    assert all(torch.isfinite(t).all() for t in load_file(last / checkpoints.WEIGHTS_FILE).values())
    assert all(torch.isfinite(t).all() for t in load_file(out / "best" / "model.safetensors").values())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the bad update never reached the weights"
