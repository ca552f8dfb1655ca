"""The training panel's logic, without a browser: settings → config, a run, Stop, errors shown in the panel."""

from __future__ import annotations

import logging
import sys
import time

import pytest
import torch

pytest.importorskip("ipywidgets")

from gpt_helpers import GPTHelpersError, TrainingConfig, load_model  # noqa: E402
from gpt_helpers.widgets import TrainingPanel, round_learning_rate  # noqa: E402

TEXTS = [f"Review {i}: the medicine helped with my sleep, the side effects were mild and went away." for i in range(40)]


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-gpt2-base")


@pytest.fixture
def panel(base, tmp_path):
    model, tokenizer = base
    config = TrainingConfig(
        max_steps=4,
        batch_size=2,
        eval_every=2,
        eval_batches=2,
        log_every=1,
        warmup_steps=1,
        output_dir=str(tmp_path / "panel"),
    )
    return TrainingPanel(
        model_name="tiny-gpt2-base",
        dataset={"train": TEXTS, "validation": TEXTS[:8]},
        config=config,
        model=model,
        tokenizer=tokenizer,
        block_size=32,
        plot_interval_seconds=0.0,
    )


def _classes(widget):
    return set(widget._dom_classes)


def test_controls_are_labelled_with_ranges_and_css_classes(panel):
    expected = {
        "learning_rate": "learning rate",
        "max_steps": "steps",
        "batch_size": "batch size",
        "block_size": "block size",
        "warmup_steps": "warmup",
        "weight_decay": "weight decay",
        "eval_every": "eval every",
        "seed": "seed",
    }
    assert {name: c.description for name, c in panel.controls.items()} == expected
    lr = panel.controls["learning_rate"]
    assert (lr.base, lr.min, lr.max) == (10, -5, -2)
    assert max(panel.controls["block_size"].options) <= 256  # the bundled model's context
    assert "gh-lr" in _classes(lr) and "gh-steps" in _classes(panel.controls["max_steps"])
    for widget, css in [
        (panel.run_button, "gh-run"),
        (panel.stop_button, "gh-stop"),
        (panel.status, "gh-status"),
        (panel.plot, "gh-plot"),
        (panel.progress, "gh-progress"),
        (panel.summary, "gh-summary"),
    ]:
        assert css in _classes(widget)
    assert not panel.run_button.disabled and panel.stop_button.disabled
    assert panel.config.max_steps == 4 and panel.history is None


def test_a_run_uses_the_values_set_in_the_controls(panel, base, tmp_path):
    before = base[0].transformer.wte.weight.detach().clone()
    panel.set(learning_rate=1e-3, max_steps=5, batch_size=4, warmup_steps=2, weight_decay=0.05, eval_every=5, seed=3)
    result = panel.run()
    assert panel.last_error is None, panel.last_error
    used = panel.config
    assert (
        used.learning_rate,
        used.max_steps,
        used.batch_size,
        used.warmup_steps,
        used.weight_decay,
        used.eval_every,
        used.seed,
    ) == (1e-3, 5, 4, 2, 0.05, 5, 3)
    assert used.progress is False and used.output_dir == str(tmp_path / "panel" / "run-01")
    assert result is panel.last_result and panel.history.final.step == 5
    assert panel.history.info["config"]["learning_rate"] == 1e-3
    assert panel.progress.value == 5 and panel.progress.bar_style == "success"
    assert "image/png" in panel.plot.outputs[0]["data"]
    assert "1.0e-03" in panel.summary.value and "final validation" in panel.summary.value
    assert list(panel.histories) == ["run-01"]
    assert (tmp_path / "panel" / "run-01" / "model" / "config.json").exists()
    assert torch.equal(base[0].transformer.wte.weight, before), (
        "the pre-trained model given to the panel must not change"
    )
    assert not panel.run_button.disabled and panel.stop_button.disabled
    assert not any(c.disabled for c in panel.controls.values())
    panel.set(max_steps=2)
    panel.run()
    assert list(panel.histories) == ["run-01", "run-02"] and panel.config.max_steps == 2


def test_the_log_slider_value_is_read_with_two_significant_digits(panel):
    panel.controls["learning_rate"].value = 10**-3.3
    assert panel.current_config().learning_rate == 5e-4
    assert round_learning_rate(3.1622776e-4) == 3.2e-4


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("max_steps", 0, "steps must be a whole number from 1"),
        ("warmup_steps", -1, "warmup must be"),
        ("eval_every", 0, "eval every must be"),
    ],
)
def test_an_impossible_value_is_shown_in_the_panel_not_raised(panel, name, value, words):
    panel.controls[name].value = value
    assert panel.run() is None
    assert words in panel.last_error
    assert "gh-error" in panel.status.value and words in panel.status.value
    assert panel.last_result is None and panel.runs == 0
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_a_refused_start_leaves_the_last_run_shown_as_it_was(panel):
    panel.run()
    summary = panel.summary.value
    panel.set(max_steps=0)
    assert panel.run() is None and "Cannot start: steps must be" in panel.last_error
    assert "gh-error" in panel.status.value
    assert panel.progress.bar_style == "success" and panel.progress.value == 4, "the last run did not fail"
    assert panel.summary.value == summary and panel.plot.outputs


def test_a_failure_inside_training_is_shown_in_the_panel(panel):
    panel.set(batch_size=64)  # more examples per step than the tiny training set holds
    assert panel.run() is None
    assert "fewer than one step's batch" in panel.last_error and "gh-error" in panel.status.value
    assert panel.progress.bar_style == "danger"
    assert not panel.run_button.disabled and not panel.running


def test_set_refuses_values_the_controls_cannot_show(panel):
    with pytest.raises(GPTHelpersError, match="batch size must be one of"):
        panel.set(batch_size=3)
    with pytest.raises(GPTHelpersError, match="between 1e-05 and 1e-02"):
        panel.set(learning_rate=0.5)
    with pytest.raises(GPTHelpersError, match="no control for"):
        panel.set(dropout=0.1)


def test_stop_ends_the_run_cleanly_and_keeps_the_history(panel, tmp_path):
    panel.set(max_steps=2000, eval_every=1000)
    panel.run(block=False)
    assert panel.run_button.disabled and not panel.stop_button.disabled
    assert panel.controls["learning_rate"].disabled
    deadline = time.time() + 60
    while panel.progress.value < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert panel.run(block=False) is None and "already in progress" in panel.status.value  # one run at a time
    panel.stop_button.click()
    result = panel.wait(timeout=120)
    assert not panel.running and panel.last_error is None
    assert result.stop_reason.startswith("stopped from the panel")
    done = result.history.final.step
    assert 2 <= done < 2000
    assert result.history.eval_records, "the final evaluation still happens after Stop"
    assert (tmp_path / "panel" / "run-01" / "history.json").exists()
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_worker_thread_logs_go_to_the_panel_not_the_notebook(panel, caplog):
    caplog.set_level(logging.INFO, logger="gpt_helpers")
    panel.run(block=False)
    panel.wait(timeout=120)
    assert panel.last_error is None
    assert not [r for r in caplog.records if r.name == "gpt_helpers.training"]
    assert any("Training stopped" in line for line in panel.log_lines)
    assert "Training stopped" in panel.log_box.value


def test_a_clear_error_without_ipywidgets(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(GPTHelpersError, match="pip install ipywidgets"):
        TrainingPanel(dataset={"train": TEXTS})
