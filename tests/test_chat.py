"""Tests of gpt_helpers.chat: transcript format, prompts, reply extraction and bot-only label masks."""

import pytest
import torch

from gpt_helpers.chat import (
    ChatDataset,
    bot_reply_spans,
    build_prompt,
    extract_reply,
    format_conversation,
    prepare_chat_dataset,
    render_labels,
    tokenize_conversation,
)
from gpt_helpers.data import load_course_dataset
from gpt_helpers.errors import DataError
from gpt_helpers.evaluation import evaluate
from gpt_helpers.models import build_model_from_config, load_tokenizer, tiny_gpt2_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-gpt2-base")


CONVERSATION = "User: Hi there\nBot: Hello! How are you?\nUser: Fine.\nBot: Good to hear."


def test_format_conversation_matches_the_dataset_format():
    rows = [line for line in (load_course_dataset("chat_logs", "validation", field=f) for f in ("text", "turns"))]
    for text, turns in zip(*rows):
        assert format_conversation(turns) == text


def test_build_prompt_ends_with_the_bot_tag_without_space():
    prompt = build_prompt(["Hi", "Hello"], "How are you?")
    assert prompt == "User: Hi\nBot: Hello\nUser: How are you?\nBot:"


def test_build_prompt_refuses_a_history_ending_with_a_user_turn():
    with pytest.raises(DataError, match="alternate"):
        build_prompt(["Hi"], "Hello?")


def test_build_prompt_drops_oldest_exchanges_to_fit(tokenizer):
    history = [f"question number {i} with some words" if i % 2 == 0 else f"answer {i}" for i in range(20)]
    full = build_prompt(history, "last?")
    budget = len(tokenizer(full)["input_ids"]) // 2
    fitted = build_prompt(history, "last?", tokenizer=tokenizer, max_tokens=budget)
    assert len(tokenizer(fitted)["input_ids"]) <= budget
    assert fitted.startswith("User: ") and fitted.endswith("User: last?\nBot:")
    assert "question number 0 " not in fitted and "answer 19" in fitted
    with pytest.raises(DataError, match="longer than"):
        build_prompt([], "a long message " * 50, tokenizer=tokenizer, max_tokens=5)


@pytest.mark.parametrize(
    "generated, reply",
    [
        (" Fine, thanks.\nUser: Good.", "Fine, thanks."),
        (" Fine.\nBot: Another bot turn", "Fine."),
        (" Two\nlines", "Two\nlines"),
        ("   ", ""),
        (" No tag at all", "No tag at all"),
    ],
)
def test_extract_reply_stops_at_the_next_speaker_line(generated, reply):
    assert extract_reply(generated) == reply


def test_bot_reply_spans_cover_replies_and_the_turn_handover():
    spans = bot_reply_spans(CONVERSATION)
    assert [CONVERSATION[a:b] for a, b in spans] == [" Hello! How are you?\nUser:", " Good to hear."]
    text = "User: a\nBot: b\nBot: c"  # two bot turns in a row: the first ends before the second's tag
    assert [text[x:y] for x, y in bot_reply_spans(text)] == [" b\n", " c"]


def test_bot_only_labels_are_exactly_the_bot_replies_and_eos(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, train_on="bot")
    assert len(ids) == len(labels)
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained == " Hello! How are you?\nUser: Good to hear.<|endoftext|>"
    assert all(label in (-100, token) for token, label in zip(ids, labels))


def test_all_labels_train_every_token(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, train_on="all", add_eos=False)
    assert ids == labels and tokenizer.eos_token_id not in ids
    with pytest.raises(DataError, match="train_on"):
        tokenize_conversation(tokenizer, CONVERSATION, train_on="user")


def test_masks_match_reply_spans_on_the_whole_training_split(tokenizer):
    for text in load_course_dataset("chat_logs", "train"):
        ids, labels = tokenize_conversation(tokenizer, text, add_eos=False)
        expected = "".join(text[a:b] for a, b in bot_reply_spans(text))
        assert tokenizer.decode([i for i, label in zip(ids, labels) if label != -100]) == expected


def test_render_labels_marks_untrained_text(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, "User: Hi\nBot: Hello!")
    assert render_labels(tokenizer, ids, labels) == "«User: Hi\nBot:» Hello!<|endoftext|>"


def test_packed_dataset_keeps_labels_aligned_with_ids(tokenizer):
    texts = [CONVERSATION, "User: Bye\nBot: See you."] * 10
    data, report = prepare_chat_dataset(tokenizer, texts, block_size=16, train_on="bot")
    assert isinstance(data, ChatDataset) and data.input_ids.shape == (report.examples, 16)
    trained = data.labels != -100
    assert torch.equal(data.labels[trained], data.input_ids[trained])
    assert report.tokens == report.examples * 16 + report.tokens_left_over
    assert 0.3 < report.trained_fraction < 0.8
    everything, all_report = prepare_chat_dataset(tokenizer, texts, block_size=16, train_on="all")
    assert torch.equal(everything.input_ids, data.input_ids) and all_report.trained_fraction == 1.0
    assert data.num_trained_tokens < everything.num_trained_tokens


def test_padded_dataset_masks_padding_but_keeps_eos(tokenizer):
    data, report = prepare_chat_dataset(
        tokenizer, ["User: Hi\nBot: Hello!", CONVERSATION * 3], block_size=24, mode="pad"
    )
    assert report.rows_truncated == 1 and len(data) == 2
    row = data[0]
    real = int(row["attention_mask"].sum())
    assert (
        row["input_ids"][real - 1] == tokenizer.eos_token_id == row["labels"][real - 1]
    )  # pad = eos, EOS still trained
    assert (row["labels"][real:] == -100).all()


def test_prepare_chat_dataset_refuses_bad_input(tokenizer):
    with pytest.raises(DataError):
        prepare_chat_dataset(tokenizer, [], block_size=16)
    with pytest.raises(DataError, match="mode"):
        prepare_chat_dataset(tokenizer, [CONVERSATION], mode="stack")
    with pytest.raises(DataError, match="context"):
        prepare_chat_dataset(tokenizer, [CONVERSATION], block_size=64, max_context=32)
    with pytest.raises(DataError, match="fewer than one block"):
        prepare_chat_dataset(tokenizer, ["User: a\nBot: b"], block_size=128)


def test_evaluate_scores_only_the_trained_tokens(tokenizer):
    data, _ = prepare_chat_dataset(tokenizer, [CONVERSATION] * 6, block_size=32, train_on="bot")
    model = build_model_from_config(tiny_gpt2_config(vocab_size=len(tokenizer), n_positions=32))
    result = evaluate(model, data)
    assert result.tokens == int((data.labels[:, 1:] != -100).sum())  # position 0 of a block is never predicted
