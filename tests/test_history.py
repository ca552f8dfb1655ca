"""gpt_helpers.history and plotting: logging, JSON/CSV round trips, PNG output (headless)."""

from __future__ import annotations

import math

import pytest

from gpt_helpers import History, plot_history
from gpt_helpers.errors import GPTHelpersError


def _history() -> History:
    history = History(info={"device": "cpu", "parameters": 1234})
    for step in range(1, 7):
        history.log(
            step=step,
            epoch=step / 6,
            tokens_seen=128 * step,
            learning_rate=1e-3 / step,
            train_loss=5.0 - 0.3 * step + 1e-9 * step,
            tokens_per_second=1000.0 + step,
            elapsed_seconds=0.1 * step,
        )
        if step % 3 == 0:
            history.log(
                step=step,
                epoch=step / 6,
                tokens_seen=128 * step,
                learning_rate=1e-3 / step,
                eval_loss=4.5 - 0.1 * step,
                eval_perplexity=math.exp(4.5 - 0.1 * step),
                elapsed_seconds=0.1 * step,
            )
    return history


def test_log_merges_rows_of_the_same_step_and_finds_best():
    history = _history()
    assert len(history) == 6
    assert [r.step for r in history.eval_records] == [3, 6]
    row = history.records[2]
    assert row.train_loss == pytest.approx(4.1) and row.eval_loss == pytest.approx(4.2)  # merged, not replaced
    assert history.best.step == 6 and history.final.step == 6
    steps, values = history.column("eval_loss")
    assert steps == [3, 6] and values == pytest.approx([4.2, 3.9])


def test_json_round_trip_is_exact(tmp_path):
    history = _history()
    loaded = History.load(history.save(tmp_path / "history.json"))
    assert loaded.records == history.records and loaded.info == history.info


def test_csv_round_trip_is_exact_with_types(tmp_path):
    history = _history()
    loaded = History.load(history.save(tmp_path / "sub" / "history.csv"))
    assert loaded.records == history.records
    assert isinstance(loaded.records[0].step, int) and isinstance(loaded.records[0].tokens_seen, int)
    assert loaded.records[0].eval_loss is None and loaded.records[2].eval_loss == history.records[2].eval_loss
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # written atomically, no temporary left


def test_load_errors(tmp_path):
    with pytest.raises(GPTHelpersError, match="does not exist"):
        History.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GPTHelpersError, match="not a valid history"):
        History.load(tmp_path / "bad.json")


def test_plot_history_writes_a_png_headless(tmp_path):
    import matplotlib

    path = tmp_path / "plots" / "history.png"
    figure = plot_history(_history(), save_to=path, show=False, title="run")
    assert matplotlib.get_backend().lower() == "agg"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    loss_axis, ppl_axis = figure.axes
    assert len(loss_axis.lines) == 2 and len(ppl_axis.lines) == 1  # train + validation; validation perplexity
    assert list(loss_axis.lines[1].get_xdata()) == [3, 6]
    compare = tmp_path / "compare.png"
    plot_history({"a": _history(), "b": History()}, x="tokens_seen", save_to=compare, show=False)
    assert compare.stat().st_size > 10_000
    with pytest.raises(ValueError):
        plot_history(_history(), x="epoch", show=False)
