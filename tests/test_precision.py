"""Precision chosen by capability and measurement, and bf16 training that tracks fp32."""

from __future__ import annotations

import pytest
import torch

from gpt_helpers import precision as precision_module
from gpt_helpers import prepare_dataset, train
from gpt_helpers.errors import ConfigError
from gpt_helpers.precision import choose_precision

from conftest import make_tiny_gpt2, quick_config


def timings(fp32: float, bf16: float):
    return lambda: fp32 / bf16


def test_auto_on_a_cpu_follows_its_instructions_and_the_probe(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: [])
    choice = choose_precision("auto", "cpu", speedup=timings(2.0, 1.0))
    assert choice.precision == "fp32" and "no bf16" in choice.reason

    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: ["avx512_bf16"])
    faster = choose_precision("auto", "cpu", speedup=timings(2.0, 1.0))
    assert faster.precision == "bf16" and "2.00×" in faster.reason and "avx512_bf16" in faster.reason
    barely = choose_precision("auto", "cpu", speedup=timings(1.05, 1.0))
    assert barely.precision == "fp32" and "1.05×" in barely.reason
    several = choose_precision("auto", "cpu", processes=2, speedup=timings(2.0, 1.0))
    assert several.precision == "fp32" and "several processes" in several.reason


def test_explicit_and_gpu_choices():
    assert choose_precision("bf16", "cpu").precision == "bf16"
    assert choose_precision("fp32", "cuda").reason == "set in the config"
    assert choose_precision("auto", "mps").precision == "fp32"
    with pytest.raises(ConfigError, match="fp16.*needs a GPU"):
        choose_precision("fp16", "cpu")


def test_a_run_reports_its_precision_and_why(tokenizer, drug_reviews, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: ["avx512_bf16"])
    monkeypatch.setattr("gpt_helpers.training.measured_bf16_speedup", lambda model, batch: 3.0)
    data, _ = prepare_dataset(tokenizer, drug_reviews["train"][:20], block_size=32)
    result = train(
        make_tiny_gpt2(tokenizer), tokenizer, data, None, quick_config(tmp_path, max_steps=1, precision="auto")
    )
    assert result.history.info["precision"] == "bf16" and "3.00×" in result.history.info["precision_reason"]


def test_the_probe_leaves_weights_random_state_and_gradients_alone(tokenizer, drug_reviews):
    model = make_tiny_gpt2(tokenizer, dropout=0.1)
    data, _ = prepare_dataset(tokenizer, drug_reviews["train"][:20], block_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = precision_module.probe_step_seconds(model, data[:2], "bf16")
    assert seconds > 0 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_measured_speedup_is_remembered_for_the_same_model_and_machine(
    tokenizer, drug_reviews, tmp_path, monkeypatch
):
    monkeypatch.setenv("GPT_HELPERS_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(
        precision_module,
        "probe_step_seconds",
        lambda model, batch, p, warm_up=True: calls.append(p) or {"fp32": 2.0, "bf16": 1.0}[p],
    )
    data, _ = prepare_dataset(tokenizer, drug_reviews["train"][:20], block_size=32)
    model = make_tiny_gpt2(tokenizer)
    assert precision_module.measured_bf16_speedup(model, data[:1]) == 2.0 and len(calls) == 6
    assert precision_module.measured_bf16_speedup(make_tiny_gpt2(tokenizer, seed=1), data[:1]) == 2.0
    assert len(calls) == 6, "the same architecture and batch shape on this machine are not measured again"
    assert (tmp_path / "precision.json").exists()


def test_a_few_bf16_steps_track_fp32(tokenizer, drug_reviews, tmp_path):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.2% per value). With fp32 master weights and the
    loss computed in fp32, the roundings of the matmuls average out over thousands of terms instead of adding up,
    so over a short run the two loss curves stay within 1% of each other (measured: 3e-5 on this CPU), while the
    loss itself falls by 20%."""
    data, _ = prepare_dataset(tokenizer, drug_reviews["train"][:120], block_size=64)
    runs = {}
    for precision in ("fp32", "bf16"):
        config = quick_config(tmp_path / precision, max_steps=12, batch_size=8, learning_rate=1e-2, precision=precision)
        runs[precision] = train(make_tiny_gpt2(tokenizer, seed=3), tokenizer, data, None, config).history.column(
            "train_loss"
        )[1]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32[-1] < fp32[0] - 0.5  # the run learns much more than the differences below
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 0.01, (fp32, bf16)
