"""Tests of gpt_helpers.model_card: the card's metadata and numbers come from the run's history."""

import math

import pytest

from gpt_helpers.errors import GPTHelpersError
from gpt_helpers.history import History
from gpt_helpers.model_card import (
    model_card,
    parse_model_card,
    read_model_card,
    training_summary,
    write_model_card,
)
from gpt_helpers.models import tiny_gpt2_config


@pytest.fixture
def history():
    h = History(
        info={
            "device": "cpu",
            "precision": "fp32",
            "parameters": 1_874_688,
            "global_batch_size": 16,
            "stop_reason": "reached 40 steps",
            "config": {"learning_rate": 1e-3, "lr_schedule": "cosine", "warmup_steps": 10, "seed": 0},
        }
    )
    h.log(
        step=20,
        epoch=1.2,
        tokens_seen=9_000,
        learning_rate=1e-3,
        train_loss=4.0,
        eval_loss=4.5,
        eval_perplexity=math.exp(4.5),
        elapsed_seconds=10.0,
    )
    h.log(
        step=40,
        epoch=2.4,
        tokens_seen=18_000,
        learning_rate=1e-4,
        train_loss=3.5,
        eval_loss=4.7,
        eval_perplexity=math.exp(4.7),
        elapsed_seconds=20.5,
    )
    return h


def card(history=None, **changes):
    options = dict(
        model_name="tiny-chatbot",
        base_model="tiny-gpt2-base",
        dataset="chat_logs",
        history=history,
        license="bsd-3-clause",
        dataset_license="BSD 3-Clause",
        dataset_attribution="Copyright (c) 2017, Gunther Cox",
    )
    return model_card(**{**options, **changes})


def test_summary_takes_the_best_step_not_the_last(history):
    summary = training_summary(history)
    assert summary["steps"] == 40 and summary["tokens_seen"] == 18_000 and summary["training_seconds"] == 20.5
    assert summary["best_step"] == 20 and summary["best_validation_loss"] == 4.5
    assert summary["learning_rate"] == 1e-3 and summary["batch_size"] == 16


def test_summary_refuses_empty_or_wrong_history():
    with pytest.raises(GPTHelpersError, match="no records"):
        training_summary(History())
    with pytest.raises(GPTHelpersError, match="History"):
        training_summary({"records": []})


def test_card_metadata_is_valid_yaml_for_a_hub(history):
    metadata, body = parse_model_card(card(history))
    assert metadata["license"] == "bsd-3-clause"
    assert metadata["pipeline_tag"] == "text-generation" and metadata["library_name"] == "transformers"
    assert metadata["language"] == ["en"] and "causal-lm" in metadata["tags"]
    assert "base_model" not in metadata  # a bundled name is not a hub id
    assert body.startswith("# tiny-chatbot")


def test_card_body_holds_the_run_numbers_and_licences(history):
    _, body = parse_model_card(
        card(history, evaluation={"test perplexity (bot replies)": 77.25}, model_config=tiny_gpt2_config())
    )
    for expected in (
        "## Intended use",
        "## Limitations",
        "## Training data",
        "## Training procedure",
        "## Evaluation",
        "## How to use",
        "## Licence",
        "| Optimizer steps | 40 |",
        "| … at step | 20 |",
        f"| Best validation perplexity during training | {math.exp(4.5):.4g} |",
        "| test perplexity (bot replies) | 77.25 |",
        "| Context length (tokens) | 64 |",
        "BSD 3-Clause",
        "Gunther Cox",
        "`tiny-gpt2-base`",
        'pipeline("text-generation", model="tiny-chatbot")',
    ):
        assert expected in body, expected


def test_card_without_history_has_no_made_up_numbers():
    _, body = parse_model_card(card(None))
    assert "## Training procedure" not in body and "## Evaluation" not in body and "## Limitations" in body


def test_card_hub_base_model_and_extra_sections():
    metadata, body = parse_model_card(
        card(
            None,
            base_model="openai-community/gpt2",
            tags=["chatbot"],
            extra_sections={"Bias and risks": "Learns the corpus' jokes."},
            limitations="Only one.",
        )
    )
    assert metadata["base_model"] == "openai-community/gpt2" and "chatbot" in metadata["tags"]
    assert "## Bias and risks\n\nLearns the corpus' jokes." in body and "- Only one." in body


def test_card_refuses_missing_fields():
    with pytest.raises(GPTHelpersError, match="model_name"):
        card(None, model_name=" ")
    with pytest.raises(GPTHelpersError, match="license"):
        card(None, license="")


def test_write_and_read_round_trip(tmp_path, history):
    path = write_model_card(
        tmp_path / "model", **{"model_name": "m", "base_model": "b", "dataset": "d", "history": history}
    )
    assert path == tmp_path / "model" / "README.md"
    metadata, body = read_model_card(tmp_path / "model")
    assert (metadata, body) == parse_model_card(path.read_text(encoding="utf-8"))
    assert metadata["license"] == "other"
    with pytest.raises(GPTHelpersError, match="No model card"):
        read_model_card(tmp_path)


def test_parse_card_errors():
    assert parse_model_card("# no metadata\n") == ({}, "# no metadata\n")
    with pytest.raises(GPTHelpersError, match="never ends"):
        parse_model_card("---\nlicense: mit\n# body")
    with pytest.raises(GPTHelpersError, match="mapping"):
        parse_model_card("---\n- a\n- b\n---\nbody")
