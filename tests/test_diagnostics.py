"""diagnose() on histories of short real runs that really show each problem, plus a few hand-made edge cases.

Every run trains a tiny GPT-2 (2 blocks, 32 wide) from scratch on the course's drug reviews, in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

import gpt_helpers as gh
from gpt_helpers import TrainingConfig, build_model_from_config, train
from gpt_helpers.diagnostics import Diagnosis, diagnose, format_diagnosis
from gpt_helpers.experiments import subset
from gpt_helpers.history import History
from gpt_helpers.models import tiny_gpt2_config


@pytest.fixture(scope="module")
def setup():
    tokenizer = gh.load_tokenizer("tiny-gpt2-base")
    train_data, _ = gh.prepare_dataset(tokenizer, gh.load_course_dataset("drug_reviews", "train"), block_size=32)
    eval_data, _ = gh.prepare_dataset(tokenizer, gh.load_course_dataset("drug_reviews", "validation"), block_size=32)
    return tokenizer, train_data, eval_data


def run(setup, tmp_path, *, n_embd: int = 32, data=None, callbacks=(), **settings) -> History:
    tokenizer, train_data, eval_data = setup
    model = build_model_from_config(tiny_gpt2_config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=2, n_head=2))
    config = dict(
        output_dir=str(tmp_path / "run"),
        batch_size=8,
        eval_every=10,
        eval_batches=4,
        log_every=5,
        warmup_steps=0,
        save_best=False,
        save_final=False,
        plot=False,
        progress=False,
    )
    config.update(settings)
    return train(
        model,
        tokenizer,
        train_data if data is None else data,
        eval_data,
        TrainingConfig(**config),
        callbacks=list(callbacks),
    ).history


def problems(findings: list[Diagnosis]) -> list[str]:
    return [finding.problem for finding in findings]


def test_overfitting_on_thirty_examples(setup, tmp_path):
    tiny_set = subset(setup[1], 30 / len(setup[1]))
    history = run(setup, tmp_path, data=tiny_set, learning_rate=1e-2, lr_schedule="constant", max_steps=40)
    findings = diagnose(history)
    assert problems(findings)[0] == "overfitting"
    best = history.best
    assert findings[0].step == best.step < history.final.step
    assert f"step {best.step}" in findings[0].evidence and "weight_decay" in findings[0].advice


def test_underfitting_with_a_tiny_learning_rate(setup, tmp_path):
    history = run(setup, tmp_path, learning_rate=1e-6, max_steps=20)
    findings = diagnose(history)
    assert problems(findings) == ["underfitting"]
    assert "learning_rate=1.0e-05" in findings[0].advice  # 10× the rate it used


def test_divergence_with_a_huge_learning_rate(setup, tmp_path):
    history = run(
        setup, tmp_path, learning_rate=0.9, max_grad_norm=None, lr_schedule="constant", max_steps=12, log_every=1
    )
    findings = diagnose(history)
    assert problems(findings) == ["divergence"] and findings[0].severity == "error"
    assert findings[0].step <= 3 and "learning_rate=9.0e-02" in findings[0].advice


def test_divergence_caught_by_the_uniform_guess_bound_when_logging_is_coarse(setup, tmp_path):
    history = run(
        setup, tmp_path, learning_rate=0.9, max_grad_norm=None, lr_schedule="constant", max_steps=10, log_every=5
    )
    findings = diagnose(history, vocab_size=len(setup[0]))
    assert problems(findings) == ["divergence"] and "worse than guessing" in findings[0].evidence


def test_nan_is_reported_with_its_step_and_the_skipped_updates(setup, tmp_path):
    class Poison:  # a corrupted weight: every loss from step 7 on is NaN
        def on_step_end(self, state):
            if state.step == 6:
                with torch.no_grad():
                    state.model.transformer.h[0].ln_1.weight.fill_(math.nan)

    history = run(setup, tmp_path, learning_rate=1e-3, max_steps=10, nonfinite="skip", callbacks=[Poison()])
    findings = diagnose(history)
    assert problems(findings) == ["divergence"]
    assert findings[0].step == 10 and "4 optimizer steps were skipped" in findings[0].evidence


def test_noisy_loss_with_one_example_per_step(setup, tmp_path):
    history = run(setup, tmp_path, learning_rate=1e-2, batch_size=1, log_every=1, eval_every=30, max_steps=60)
    findings = diagnose(history)
    assert "noisy loss" in problems(findings) and "divergence" not in problems(findings)
    noisy = findings[problems(findings).index("noisy loss")]
    assert "gradient_accumulation_steps=4" in noisy.advice


def test_plateau_of_a_model_too_small_to_improve(setup, tmp_path):
    history = run(setup, tmp_path, n_embd=8, learning_rate=1e-2, lr_schedule="constant", max_steps=80, eval_every=20)
    findings = diagnose(history)
    assert problems(findings) == ["plateau"]
    assert 0 < findings[0].step < 80 and "1.0e-02" in findings[0].advice  # constant lr: advice to decay it


def test_healthy_run(setup, tmp_path):
    history = run(setup, tmp_path, learning_rate=3e-3, max_steps=30)
    findings = diagnose(history)
    assert problems(findings) == ["healthy"] and "Still improving" in findings[0].advice


# ------------------------------------------------------------------------------------------ hand-made edge cases
def history_of(train_losses, eval_losses=None, **info) -> History:
    history = History(info={"config": {"learning_rate": 1e-3, "batch_size": 8}, **info})
    for index, loss in enumerate(train_losses):
        history.log(step=index + 1, epoch=0, tokens_seen=index, learning_rate=1e-3, train_loss=loss)
        if eval_losses and index < len(eval_losses) and eval_losses[index] is not None:
            history.log(step=index + 1, epoch=0, tokens_seen=index, learning_rate=1e-3, eval_loss=eval_losses[index])
    return history


def test_empty_history_and_rising_validation_without_training_progress():
    assert problems(diagnose(History())) == ["no data"]
    # validation rises but training does not fall either: not overfitting (it is underfitting)
    flat = history_of([5.0] * 10, [5.0, 5.01, 5.2, 5.3, 5.4])
    assert "overfitting" not in problems(diagnose(flat))


def test_single_bad_batch_is_not_divergence():
    losses = [5.0 - 0.1 * i for i in range(20)]
    losses[8] = 9.0  # one spike that does not last
    assert problems(diagnose(history_of(losses))) == ["healthy"]


def test_format_diagnosis_prints_every_finding():
    findings = [
        Diagnosis("overfitting", "warning", 40, "validation rose", "stop at 40"),
        Diagnosis("noisy loss", "info", None, "swings", "larger batch"),
    ]
    text = format_diagnosis(findings)
    assert text.splitlines()[0] == "[warning] overfitting (from step 40): validation rose"
    assert "→ larger batch" in text and text.count("[") == 2


def _history(losses, *, evals=(), lr=None, **info) -> History:
    """A history logged as the loop logs it: each step's training loss, and at some steps the validation loss."""
    history = History(info={"config": {"learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 0}, **info})
    validation = dict(evals)
    for step, loss in enumerate(losses, start=1):
        rate = lr[step - 1] if lr else 1e-3
        history.log(step=step, epoch=0, tokens_seen=step * 100, learning_rate=rate, train_loss=loss)
        if step in validation:
            history.log(
                step=step,
                epoch=0,
                tokens_seen=step * 100,
                learning_rate=rate,
                eval_loss=validation[step],
                eval_perplexity=math.exp(validation[step]),
            )
    return history


def test_a_short_run_that_is_learning_is_not_called_underfitting():
    # 8 steps at a fine learning rate: the loss falls steadily, 2.2% in all (under the 3% underfitting threshold)
    losses = [5.95, 5.94, 5.92, 5.90, 5.88, 5.86, 5.84, 5.82]
    findings = diagnose(_history(losses, evals=[(4, 6.0), (8, 5.9)]))
    assert problems(findings) == ["too short to judge"] and findings[0].severity == "info"
    assert "fell by" in findings[0].evidence and "Raise the learning rate" not in findings[0].advice
    assert "max_steps=32" in findings[0].advice


def test_a_steady_but_far_too_slow_fall_is_underfitting_not_too_short():
    # lesson 06's learning rate 100x too low: 30 steps, the loss falls steadily but 0.5% in all; even 4x the steps
    # at that pace would stay under the 3% threshold, so the advice must be the learning rate, not patience
    losses = [6.046 - 0.001 * step for step in range(30)]
    findings = diagnose(_history(losses, evals=[(15, 5.975), (30, 5.961)]))
    assert problems(findings) == ["underfitting"]
    assert "Raise the learning rate" in findings[0].advice and "fell by" in findings[0].evidence


def test_underfitting_says_whether_the_loss_fell_or_rose():
    flat = [5.97, 6.05, 5.99, 6.10, 6.02, 6.08, 6.01, 6.10]  # noise around a level: no learning
    findings = diagnose(_history(flat, evals=[(4, 6.05), (8, 6.06)]))
    assert problems(findings) == ["underfitting"]
    assert "rose by" in findings[0].evidence or "fell by" in findings[0].evidence
    assert "+" not in findings[0].evidence.split("(")[0]


def test_a_finished_schedule_with_validation_still_improving_is_not_a_plateau():
    losses = [6.0, 5.2, 4.8, 4.6, 4.5, 4.45, 4.43, 4.42, 4.415, 4.41, 4.408, 4.407]
    decayed = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 11))) for i in range(12)]
    findings = diagnose(_history(losses, evals=[(4, 4.9), (8, 4.7), (12, 4.65)], lr=decayed))
    assert "plateau" not in problems(findings)
    assert problems(findings) == ["healthy"] and "Still improving" in findings[0].advice


def test_overfitting_advice_does_not_repeat_settings_the_run_already_has():
    losses = [5.0, 4.5, 4.0, 3.6, 3.2, 2.9, 2.6, 2.3, 2.0, 1.8]
    evals = [(2, 4.8), (4, 4.5), (6, 4.6), (8, 4.9), (10, 5.3)]
    findings = diagnose(_history(losses, evals=evals, dropout=0.1))
    assert problems(findings)[0] == "overfitting"
    advice = findings[0].advice
    assert "weight_decay=1" not in advice and "already 0.1" in advice and "dropout is already 0.1" in advice
    fresh = diagnose(_history(losses, evals=evals, dropout=0.0))[0].advice
    assert "dropout 0.1 (now 0.0" in fresh


def test_a_capped_perplexity_is_called_what_it_is():
    findings = diagnose(_history([3.0, 3.1, 2.9, 3.0], evals=[(2, 40.0), (4, 35.0)]))
    assert problems(findings) == ["divergence"] and "shows only as the cap" in findings[0].evidence
