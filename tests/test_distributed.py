"""The same ``train(...)`` under HF Accelerate with two processes (DDP over gloo on CPU) equals one process.

Two processes with micro-batch 4 see the same 8 examples per step as one process with batch 8, and the loss is
normalised by the *global* token count, so the weights must agree up to floating-point summation order.
Only the main process writes checkpoints, history and model folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import PartialState, debug_launcher
from safetensors.torch import load_file

import gpt_helpers as gh
from gpt_helpers import checkpoints
from gpt_helpers.models import build_model_from_config, tiny_gpt2_config

STEPS = 4


def _setup(block_size: int = 32):
    tokenizer = gh.load_tokenizer("tiny-gpt2-base")
    texts = gh.load_course_dataset("drug_reviews", "validation")[:40]
    data, _ = gh.prepare_dataset(tokenizer, texts, block_size=block_size)
    config = tiny_gpt2_config(vocab_size=len(tokenizer), n_positions=block_size)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # dropout masks depend on each process's RNG
    model = build_model_from_config(config, seed=3)
    return model, tokenizer, data


def _config(out: str, batch_size: int) -> gh.TrainingConfig:
    return gh.TrainingConfig(
        output_dir=out,
        max_steps=STEPS,
        batch_size=batch_size,
        learning_rate=3e-3,
        warmup_steps=0,
        eval_every=2,
        save_every=2,
        progress=False,
        plot=False,
        save_best=True,
        seed=11,
        device="cpu",
    )


def _two_process_worker():
    out = os.environ["GH_TEST_OUT"]
    writes = []
    for name in ("save_checkpoint", "save_model_folder"):
        original = getattr(checkpoints, name)
        setattr(
            checkpoints,
            name,
            lambda *a, _original=original, _name=name, **k: writes.append(_name) or _original(*a, **k),
        )
    model, tokenizer, data = _setup()
    result = gh.train(model, tokenizer, data, data, _config(out, batch_size=4))
    rank = PartialState().process_index
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "processes": result.history.info["processes"],
                "writes": writes,
                "final_loss": result.history.final.train_loss,
            }
        )
    )


def test_two_processes_match_one_process(tmp_path):
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    model, tokenizer, data = _setup()
    single = gh.train(model, tokenizer, data, data, _config(str(single_out), batch_size=8))

    os.environ["GH_TEST_OUT"] = str(multi_out)
    try:
        debug_launcher(_two_process_worker, num_processes=2)
    finally:
        os.environ.pop("GH_TEST_OUT", None)

    ranks = [json.loads((multi_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    single_weights = load_file(single_out / "model" / "model.safetensors")
    multi_weights = load_file(multi_out / "model" / "model.safetensors")
    assert single_weights.keys() == multi_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(multi_weights[name], value, atol=2e-5, rtol=1e-4, msg=name)
    initial = build_model_from_config(model.config, seed=3).state_dict()
    moved = max(float((single_weights[name] - initial[name]).abs().max()) for name in single_weights if name in initial)
    assert moved > 1e-3, "training must actually change the weights for the comparison to mean anything"
    assert abs(ranks[0]["final_loss"] - single.history.final.train_loss) < 1e-4
    assert ranks[0]["final_loss"] == ranks[1]["final_loss"], "every process logs the globally reduced loss"
    single_history = json.loads((single_out / "history.json").read_text())["records"]
    multi_history = json.loads((multi_out / "history.json").read_text())["records"]
    assert [r["step"] for r in multi_history] == [r["step"] for r in single_history]
    assert ranks[1]["writes"] == [], "only the main process writes checkpoints and model folders"
    assert "save_checkpoint" in ranks[0]["writes"] and "save_model_folder" in ranks[0]["writes"]
    assert sorted(p.name for p in (multi_out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
