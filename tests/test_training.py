"""gpt_helpers.config and gpt_helpers.training: validation, learning, accumulation, exact resume, early stopping,
checkpoints, history files, the non-finite guard and a second architecture. Tiny models, CPU, fp32."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt_helpers import History, TrainingConfig, evaluate, prepare_dataset, train
from gpt_helpers.errors import ConfigError, DataError, TrainingError
from gpt_helpers.training import _Loop, lr_factor

from conftest import make_tiny_gpt2, make_tiny_llama, quick_config

# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"max_steps": -5}, "max_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": 3.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"precision": "fp8"}, "precision"),
        ({"batch_size": 4.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"keep_last": 0}, "keep_last"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"progress": "yes"}, "progress"),
        ({"max_steps": None, "epochs": None}, "max_steps"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(changes, field):
    with pytest.raises(ConfigError) as caught:
        TrainingConfig(**changes)
    assert field in str(caught.value)


def test_config_from_dict_load_and_replace(tmp_path):
    with pytest.raises(ConfigError, match="Unknown setting.*\\blr\\b"):
        TrainingConfig.from_dict({"lr": 1e-3, "max_steps": 10})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"max_steps": 7, "batch_size": 2, "gradient_accumulation_steps": 3}), encoding="utf-8")
    config = TrainingConfig.load(path)
    assert (config.max_steps, config.effective_batch_size) == (7, 6)
    assert config.replace(learning_rate=1e-4).learning_rate == 1e-4 and config.learning_rate == 5e-4
    with pytest.raises(ConfigError, match="batch_size"):
        config.replace(batch_size=-1)
    with pytest.raises(ConfigError, match="Unknown setting.*batchsize"):
        config.replace(batchsize=3)
    path.write_text('{"max_steps": 7,\n "batch_size": }', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2"):
        TrainingConfig.load(path)
    assert TrainingConfig.from_dict(config.to_dict()) == config


def test_lr_schedule_warmup_cosine_and_floor():
    config = TrainingConfig(warmup_steps=4, learning_rate=1e-3, min_lr_ratio=0.1)
    assert [lr_factor(0.0, step, config) for step in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_factor(0.0, 4, config) == pytest.approx(1.0)
    assert lr_factor(0.5, 50, config) == pytest.approx(0.55)
    assert lr_factor(1.0, 100, config) == pytest.approx(0.1)
    assert lr_factor(0.5, 50, config.replace(lr_schedule="linear")) == pytest.approx(0.55)
    assert lr_factor(0.9, 90, config.replace(lr_schedule="constant")) == 1.0


# ------------------------------------------------------------------------------------------------ data helpers


def _packed(tokenizer, texts, block_size=32):
    return prepare_dataset(tokenizer, texts, block_size=block_size)[0]


def _short_padded(tokenizer, reviews, count=24, block_size=16):
    """Pad-mode examples with very different numbers of real tokens (2 to 15 words each)."""
    texts = [" ".join(text.split()[: 2 + index % 14]) for index, text in enumerate(reviews[:count])]
    return prepare_dataset(tokenizer, texts, block_size=block_size, mode="pad")[0]


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _max_difference(first: dict, second: dict) -> float:
    return max(float((first[name] - second[name]).abs().max()) for name in first)


class StopAt:
    """A callback that asks the loop to stop after a given step (like a kill, but clean)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state):
        if state.step >= self.step:
            state.stop_requested = True


# ------------------------------------------------------------------------------------------------ training


def test_short_run_on_drug_reviews_lowers_validation_loss(tokenizer, drug_reviews, tmp_path):
    train_data = _packed(tokenizer, drug_reviews["train"][:150])
    eval_data = _packed(tokenizer, drug_reviews["validation"][:12])
    model = make_tiny_gpt2(tokenizer)
    before = evaluate(model, eval_data).loss
    assert before == pytest.approx(math.log(len(tokenizer)), abs=0.3)
    config = quick_config(
        tmp_path, max_steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=3, eval_every=15, log_every=5
    )
    result = train(model, tokenizer, train_data, eval_data, config)
    after = evaluate(result.model, eval_data).loss
    assert after < before - 1.5, (before, after)
    assert [r.step for r in result.history.eval_records] == [15, 30]
    assert result.history.eval_records[-1].eval_loss == pytest.approx(after, rel=1e-6)
    train_losses = result.history.column("train_loss")[1]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0] - 1.0
    assert result.history.final.tokens_seen == 30 * 8 * 31  # real target tokens, not inputs
    assert result.history.info["device"] == "cpu" and result.history.info["precision"] == "fp32"
    assert result.stop_reason == "reached 30 steps"


def _run_accumulated(tokenizer, data, tmp_path, name, batch_size, accumulation):
    model = make_tiny_gpt2(tokenizer, seed=1)
    config = quick_config(
        tmp_path / name,
        max_steps=3,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        log_every=3,
    )
    return _weights(train(model, tokenizer, data, None, config).model)


def test_gradient_accumulation_matches_one_big_batch_with_unequal_padding(
    tokenizer, drug_reviews, tmp_path, monkeypatch
):
    data = _short_padded(tokenizer, drug_reviews["train"])
    real_tokens = (data.labels[:, 1:] != -100).sum(dim=1)
    assert real_tokens.min() <= 3 and real_tokens.max() >= 14  # micro-batches hold very different token counts
    one_batch = _run_accumulated(tokenizer, data, tmp_path, "8x1", 8, 1)
    accumulated = _run_accumulated(tokenizer, data, tmp_path, "4x2", 4, 2)
    assert _max_difference(one_batch, accumulated) < 1e-5  # the updates themselves are about 3 steps × lr = 1e-2

    # The same check catches the classic bug: averaging each micro-batch's mean loss.
    def naive(self, micro_batches):
        from gpt_helpers.evaluation import token_losses

        total = torch.zeros(())
        for batch in micro_batches:
            losses, mask = token_losses(
                self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
            loss = losses.sum() / mask.sum() / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return total, sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)

    monkeypatch.setattr(_Loop, "_forward_backward", naive)
    naive_weights = _run_accumulated(tokenizer, data, tmp_path, "naive", 4, 2)
    assert _max_difference(one_batch, naive_weights) > 1e-3


def test_resume_from_checkpoint_is_bit_identical(tokenizer, drug_reviews, tmp_path):
    train_data = _packed(tokenizer, drug_reviews["train"][:40])
    eval_data = _packed(tokenizer, drug_reviews["validation"][:4])
    common = dict(max_steps=12, save_every=4, keep_last=2, log_every=2, eval_every=4, eval_batches=1)

    full = train(
        make_tiny_gpt2(tokenizer, dropout=0.1),
        tokenizer,
        train_data,
        eval_data,
        quick_config(tmp_path / "full", **common),
    )
    checkpoints = sorted(p.name for p in (tmp_path / "full" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000008", "step-000012"]  # rotation keeps the newest keep_last=2

    stopped = train(
        make_tiny_gpt2(tokenizer, dropout=0.1),
        tokenizer,
        train_data,
        eval_data,
        quick_config(tmp_path / "split", **common),
        callbacks=[StopAt(8)],
    )
    assert stopped.stop_reason == "stopped on request" and stopped.history.final.step == 8
    # A differently initialised model: resuming must overwrite every weight, the optimizer and the random state.
    resumed = train(
        make_tiny_gpt2(tokenizer, dropout=0.1, seed=9),
        tokenizer,
        train_data,
        eval_data,
        quick_config(tmp_path / "split", resume=True, **common),
    )
    assert resumed.history.info["resumed_from"].endswith("step-000008")

    full_weights, resumed_weights = _weights(full.model), _weights(resumed.model)
    for name in full_weights:
        assert torch.equal(full_weights[name], resumed_weights[name]), name

    def comparable(history):
        return [
            (r.step, r.epoch, r.tokens_seen, r.learning_rate, r.train_loss, r.eval_loss, r.eval_perplexity)
            for r in history.records
        ]

    assert comparable(resumed.history) == comparable(full.history)
    assert [r.step for r in full.history.records] == [2, 4, 6, 8, 10, 12]


def test_resume_without_checkpoint_starts_fresh(tokenizer, drug_reviews, tmp_path):
    data = _packed(tokenizer, drug_reviews["train"][:10])
    result = train(make_tiny_gpt2(tokenizer), tokenizer, data, None, quick_config(tmp_path, max_steps=2, resume=True))
    assert result.history.info["resumed_from"] is None and result.history.final.step == 2
    assert result.last_checkpoint.name == "step-000002"


def test_early_stopping_keeps_the_best_model(tokenizer, drug_reviews, tmp_path):
    from transformers import AutoModelForCausalLM

    # Memorising one sentence with a high learning rate makes the loss on real reviews worse: overfitting.
    train_data = _packed(tokenizer, ["The pill is blue and round."] * 100, block_size=16)
    eval_data = _packed(tokenizer, drug_reviews["validation"][:6])
    config = quick_config(
        tmp_path,
        max_steps=40,
        learning_rate=1e-2,
        eval_every=2,
        log_every=2,
        early_stopping_patience=2,
        save_best=True,
        save_final=True,
    )
    result = train(make_tiny_gpt2(tokenizer), tokenizer, train_data, eval_data, config)
    evals = result.history.eval_records
    assert result.stop_reason.startswith("early stopping") and evals[-1].step < 40
    best = result.history.best
    assert result.history.info["best_step"] == best.step
    assert all(r.eval_loss >= best.eval_loss for r in evals[-2:]) and evals[-3] is best  # patience 2
    best_model = AutoModelForCausalLM.from_pretrained(result.best_dir)
    assert evaluate(best_model, eval_data).loss == pytest.approx(best.eval_loss, rel=1e-6)
    final_model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert evaluate(final_model, eval_data).loss == pytest.approx(evals[-1].eval_loss, rel=1e-6)
    assert evals[-1].eval_loss > best.eval_loss


def test_history_written_as_json_and_csv(tokenizer, drug_reviews, tmp_path):
    data = _packed(tokenizer, drug_reviews["train"][:10])
    result = train(
        make_tiny_gpt2(tokenizer),
        tokenizer,
        data,
        data,
        quick_config(tmp_path, max_steps=4, eval_every=2, eval_batches=1, plot=True),
    )
    out = tmp_path / "run"
    from_json, from_csv = History.load(out / "history.json"), History.load(out / "history.csv")
    assert from_json.records == result.history.records == from_csv.records
    assert len(from_json.records) == 4 and from_json.info["stop_reason"] == "reached 4 steps"
    assert from_json.info["parameters"] > 0
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"


def _nan_on_call(model, call: int):
    """A forward hook that makes the logits NaN on the given forward call (1-based), once."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == call:
            output.logits = output.logits * float("nan")
        return output

    return model.register_forward_hook(hook)


def test_nonfinite_loss_stops_naming_the_step(tokenizer, drug_reviews, tmp_path):
    data = _packed(tokenizer, drug_reviews["train"][:10])
    model = make_tiny_gpt2(tokenizer)
    _nan_on_call(model, 3)
    with pytest.raises(TrainingError) as caught:
        train(model, tokenizer, data, None, quick_config(tmp_path, max_steps=6))
    message = str(caught.value)
    assert "step 3" in message and "nan" in message and "nonfinite='skip'" in message
    saved = History.load(tmp_path / "run" / "history.json")
    assert [r.step for r in saved.records] == [1, 2]


def test_nonfinite_loss_skipped_and_counted(tokenizer, drug_reviews, tmp_path):
    data = _packed(tokenizer, drug_reviews["train"][:10])
    model = make_tiny_gpt2(tokenizer)
    handle = _nan_on_call(model, 3)
    result = train(model, tokenizer, data, None, quick_config(tmp_path, max_steps=6, log_every=2, nonfinite="skip"))
    handle.remove()
    assert result.history.info["skipped_nonfinite_steps"] == 1 and result.history.final.step == 6
    assert result.history.final.tokens_seen == 5 * 4 * 31  # the skipped step trained on nothing
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    losses = result.history.column("train_loss")[1]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # the skipped step is not averaged in


def test_llama_trains_a_few_steps(tokenizer, drug_reviews, tmp_path):
    data = _packed(tokenizer, drug_reviews["train"][:30])
    model = make_tiny_llama(tokenizer)
    before = _weights(model)
    config = quick_config(tmp_path, max_steps=8, batch_size=4, learning_rate=1e-2, save_final=True, log_every=4)
    result = train(model, tokenizer, data, None, config)
    losses = result.history.column("train_loss")[1]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.3
    assert _max_difference(before, _weights(result.model)) > 1e-3
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert reloaded.config.model_type == "llama"


def test_too_little_data_for_one_step_is_refused(tokenizer, tmp_path):
    data = prepare_dataset(tokenizer, ["a few words only, really not much"] * 3, block_size=8)[0]
    with pytest.raises(DataError, match="fewer than one step's batch of 32"):
        train(
            make_tiny_gpt2(tokenizer),
            tokenizer,
            data,
            None,
            quick_config(tmp_path, batch_size=16, gradient_accumulation_steps=2),
        )


def test_tensorboard_tracking_writes_event_files_and_is_off_by_default(tokenizer, drug_reviews, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="report_to='tensorboard' needs the tensorboard package (pip install tensorboard)"
    )
    data = _packed(tokenizer, drug_reviews["train"][:20])
    plain = train(
        make_tiny_gpt2(tokenizer), tokenizer, data, data, quick_config(tmp_path / "plain", max_steps=2, eval_every=2)
    )
    assert not (plain.output_dir / "tensorboard").exists()
    tracked = train(
        make_tiny_gpt2(tokenizer),
        tokenizer,
        data,
        data,
        quick_config(tmp_path / "tracked", max_steps=4, eval_every=2, report_to="tensorboard"),
    )
    events = list((tracked.output_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train_loss", "eval_loss"} <= set(accumulator.Tags()["scalars"])
    assert [event.step for event in accumulator.Scalars("train_loss")] == [1, 2, 3, 4]


def test_epochs_count_the_examples_an_epoch_trains_on(tokenizer, drug_reviews, tmp_path):
    """175 examples, batch 16: an epoch is 10 steps (160 examples; the last 15 are left out of each epoch), so 40
    steps are exactly 4 epochs (and 640 examples seen, 3.66 × the data): not 3.91, as a counter that divides by all
    175 examples reported."""
    data = _packed(tokenizer, drug_reviews["train"])
    data = type(data)(data.input_ids[:175])
    result = train(
        make_tiny_gpt2(tokenizer),
        tokenizer,
        data,
        None,
        quick_config(tmp_path, max_steps=40, batch_size=16, log_every=10),
    )
    assert [round(r.epoch, 4) for r in result.history.records] == [1.0, 2.0, 3.0, 4.0]
    summary = result.history.summary()
    assert summary["epochs"] == 4.0 and summary["examples_seen"] == 640 and summary["train_examples"] == 175


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_the_fused_loss_trains_exactly_like_the_logits_path(make, tokenizer, drug_reviews, tmp_path):
    """In float64 the chunked output layer + loss and the usual logits path differ only by summation order
    (~1e-16 relative), so after a few AdamW steps every weight agrees to 1e-9; the loss is the same too."""
    from gpt_helpers import fused_loss

    data = _packed(tokenizer, drug_reviews["train"][:40])
    runs = {}
    for fused in (False, True):
        model = make(tokenizer).double()
        config = quick_config(tmp_path / str(fused), max_steps=3, fused_loss=fused, log_every=1)
        runs[fused] = train(model, tokenizer, data, None, config)
    assert runs[True].history.info["fused_loss"] and not runs[False].history.info["fused_loss"]
    for (name, a), b in zip(runs[False].model.state_dict().items(), runs[True].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    for a, b in zip(runs[False].history.column("train_loss")[1], runs[True].history.column("train_loss")[1]):
        assert a == pytest.approx(b, rel=1e-12)
    hidden, weight = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, 3] = -100
    expected = (hidden @ weight.T).log_softmax(-1)
    fused_loss.CHUNK_BYTES, saved = 4 * 50 * 4, fused_loss.CHUNK_BYTES  # 4 rows a chunk: several chunks
    try:
        assert float(fused_loss.linear_cross_entropy(hidden, weight, labels)) == pytest.approx(
            float(-sum(expected[b, t, labels[b, t + 1]] for b in range(3) for t in range(6) if labels[b, t + 1] >= 0))
        )
    finally:
        fused_loss.CHUNK_BYTES = saved


def test_the_fused_loss_is_chosen_for_a_large_frozen_output_layer_on_cpu(tokenizer, drug_reviews, tmp_path):
    from gpt_helpers.strategies import apply_lora

    data = _packed(tokenizer, drug_reviews["train"][:20])
    full = train(make_tiny_gpt2(tokenizer), tokenizer, data, None, quick_config(tmp_path / "full", max_steps=1))
    assert not full.history.info["fused_loss"] and "off by default" in full.history.info["fused_loss_reason"]
    big = make_tiny_gpt2(tokenizer, vocab_size=20_000)
    lora = train(apply_lora(big), tokenizer, data, None, quick_config(tmp_path / "lora", max_steps=1))
    assert lora.history.info["fused_loss"] and "35% less memory" in lora.history.info["fused_loss_reason"]
