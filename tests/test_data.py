"""gpt_helpers.data: loading, cleaning, splitting, tokenizing, packing, padding, reports and every refusal."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gpt_helpers import data as data_module
from gpt_helpers.data import (
    LMDataset,
    clean_text,
    clean_texts,
    load_course_dataset,
    load_texts,
    pack_blocks,
    pad_sequences,
    prepare_dataset,
    split_texts,
    tokenize_texts,
)
from gpt_helpers.errors import DataError

# ------------------------------------------------------------------------------------------------ loading


def test_load_jsonl_skips_blank_lines_and_reads_the_named_field(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "second"}\n', encoding="utf-8")
    assert load_texts(path) == ["first", "second"]
    path.write_text('{"review": "a"}\n{"review": "b"}\n', encoding="utf-8")
    assert load_texts(path, text_field="review") == ["a", "b"]


def test_load_json_list_of_objects_and_strings(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "one"}, "two"]), encoding="utf-8")
    assert load_texts(path) == ["one", "two"]


def test_load_csv_and_tsv_with_quoted_fields(tmp_path):
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n', encoding="utf-8")
    assert load_texts(csv_path) == ["hello, world", "two\nlines"]
    tsv_path = tmp_path / "rows.tsv"
    tsv_path.write_text("text\tlabel\nalpha, beta\t1\ngamma\t0\n", encoding="utf-8")
    assert load_texts(tsv_path) == ["alpha, beta", "gamma"]


def test_load_txt_splits_paragraphs_on_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael.\nSome years ago.\n\n  \nIt was the best of times.\n", encoding="utf-8")
    assert load_texts(path) == ["Call me Ishmael.\nSome years ago.", "It was the best of times."]


def test_load_txt_with_trailing_blank_lines_adds_no_empty_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\nfirst\n\nsecond\n\n\n\n", encoding="utf-8")
    assert load_texts(path) == ["first", "second"]


def test_load_folder_of_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a txt", encoding="utf-8")
    assert load_texts(tmp_path) == ["ay", "bee"]


def test_load_datasets_dataset_and_list():
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})
    assert load_texts(dataset) == ["x", "y"]
    assert load_texts(("p", "q")) == ["p", "q"]
    with pytest.raises(DataError, match="no 'body' column"):
        load_texts(dataset, text_field="body")
    with pytest.raises(DataError, match="item 1"):
        load_texts(["fine", 7])


def test_course_dataset_loads_each_split_with_other_fields():
    train = load_course_dataset("drug_reviews", "train")
    validation = load_course_dataset("drug_reviews", "validation")
    assert len(train) > 700 and len(validation) > 50
    assert all(isinstance(text, str) and text for text in train)
    sentiments = load_course_dataset("drug_reviews", "train", field="sentiment")
    assert len(sentiments) == len(train) and "positive" in sentiments
    with pytest.raises(DataError, match="train.jsonl, row 1: no 'rating' field.*sentiment"):
        load_course_dataset("drug_reviews", "train", field="rating")


# ------------------------------------------------------------------------------------------------ refusals


def _error(source, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_texts(source, **kwargs)
    return str(caught.value)


def test_missing_file_is_named(tmp_path):
    message = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "does not exist" in message


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("  \n\n", encoding="utf-8")
    message = _error(path)
    assert "empty.jsonl" in message and "empty" in message


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": "cut sho\n', encoding="utf-8")
    message = _error(path)
    assert "cut.jsonl" in message and "line 3" in message


def test_non_object_json_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["not", "an", "object"]\n', encoding="utf-8")
    message = _error(path)
    assert "list.jsonl, line 2" in message and "list" in message


def test_missing_text_field_lists_the_fields(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "ok"}\n{"review": "x", "rating": 3}\n', encoding="utf-8")
    message = _error(path)
    assert "line 2" in message and "'text'" in message and "review, rating" in message


def test_non_string_text(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 42}\n', encoding="utf-8")
    message = _error(path)
    assert "numbers.jsonl, line 2" in message and "int" in message


def test_latin1_file_names_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "fine"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    message = _error(path)
    assert "latin1.jsonl" in message and "UTF-8" in message and "line 2" in message and "0xe9" in message


def test_binary_junk_is_refused(tmp_path):
    path = tmp_path / "model.txt"
    path.write_bytes(b"PK\x03\x04\x00\x00binary\x00junk")
    message = _error(path)
    assert "model.txt" in message and "NUL" in message


def test_ragged_csv_names_the_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("id,text\n1,fine\n2,unquoted, comma\n", encoding="utf-8")
    message = _error(path)
    assert "ragged.csv, line 3" in message and "3 fields" in message


def test_csv_missing_column_lists_columns(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("id,review\n1,x\n", encoding="utf-8")
    message = _error(path)
    assert "cols.csv" in message and "'text'" in message and "id, review" in message


def test_enormous_text_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_TEXT_CHARS", 100)
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 101}) + "\n", encoding="utf-8")
    message = _error(path)
    assert "huge.jsonl, line 2" in message and "101" in message and "limit 100" in message


def test_unsupported_suffix_and_folder_without_txt(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"x")
    assert ".parquet" in _error(tmp_path / "data.parquet")
    (tmp_path / "empty_folder").mkdir()
    assert "no .txt files" in _error(tmp_path / "empty_folder")


def test_unknown_course_dataset_and_split():
    with pytest.raises(DataError, match="Unknown course dataset 'tweets'.*drug_reviews"):
        load_course_dataset("tweets")
    with pytest.raises(DataError, match="Unknown split 'dev'.*validation"):
        load_course_dataset("drug_reviews", "dev")


# ------------------------------------------------------------------------------------------------ cleaning, split


def test_clean_text_unescapes_html_and_normalises_whitespace():
    assert clean_text("  &quot;Great&quot;\t drug &amp;amp; fast&#039;  ") == '"Great" drug & fast\''
    assert clean_text("a\r\nb\rc\n\n\n\n\nd  \u00a0 e") == "a\nb\nc\n\nd e"


def test_clean_texts_counts_empties_and_duplicates():
    texts = ["Good", " Good ", "&nbsp;", "", "Bad", "Good", "bad"]
    kept, report = clean_texts(texts)
    assert kept == ["Good", "Bad", "bad"]
    assert (report.rows_in, report.rows_empty, report.rows_duplicate, report.rows_kept) == (7, 2, 2, 3)
    kept_all, report_all = clean_texts(texts, deduplicate=False)
    assert len(kept_all) == 5 and report_all.rows_duplicate == 0


def test_split_is_deterministic_by_seed_and_a_partition():
    texts = [f"text {i}" for i in range(100)]
    first = split_texts(texts, validation=0.1, test=0.2, seed=3)
    again = split_texts(texts, validation=0.1, test=0.2, seed=3)
    other = split_texts(texts, validation=0.1, test=0.2, seed=4)
    assert first == again and first["validation"] != other["validation"]
    assert [len(first[k]) for k in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(first["train"] + first["validation"] + first["test"]) == sorted(texts)
    # Pinned: the same seed gives the same split on any machine (random.Random is specified).
    assert first["validation"][:3] == ["text 35", "text 41", "text 45"]
    with pytest.raises(DataError, match="too few"):
        split_texts(["a", "b"], validation=0.1)
    with pytest.raises(DataError, match="fractions"):
        split_texts(texts, validation=0.6, test=0.4)


# ------------------------------------------------------------------------------------------------ tokenizing


def test_batched_tokenization_equals_one_by_one_and_appends_eos(tokenizer):
    texts = ["Hello world", "This drug made me dizzy.", "é ü 中文 emoji 🙂", "x" * 300, ""]
    batched = tokenize_texts(tokenizer, texts, batch_size=2)
    single = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert batched == single
    assert all(row[-1] == tokenizer.eos_token_id for row in batched)
    assert batched[-1] == [tokenizer.eos_token_id]
    assert tokenize_texts(tokenizer, texts, add_eos=False)[0] == single[0][:-1]
    assert tokenizer.decode(batched[2][:-1]) == texts[2]  # byte-level BPE round-trips any text


def test_tokenization_cache_hit_returns_identical_ids(tokenizer, tmp_path, monkeypatch):
    texts = ["one review", "another, longer review with more words", ""]
    first = tokenize_texts(tokenizer, texts, cache_dir=tmp_path)
    files = list(tmp_path.glob("tokens-*.pt"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(1))  # a hit must not tokenize
    second = tokenize_texts(tokenizer, texts, cache_dir=tmp_path)
    assert second == first and calls == []
    assert all(isinstance(t, int) for row in second for t in row)
    monkeypatch.undo()
    tokenize_texts(tokenizer, texts + ["new"], cache_dir=tmp_path)  # other texts, other key
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 2


def test_pack_blocks_boundaries_and_left_over():
    blocks, left = pack_blocks([[1, 2, 3], [4, 5, 6, 7], [8, 9]], 4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and left == 1
    blocks, left = pack_blocks([[1, 2], [3, 4]], 2)
    assert blocks.tolist() == [[1, 2], [3, 4]] and left == 0
    blocks, left = pack_blocks([[1, 2, 3]], 4)
    assert blocks.shape == (0, 4) and left == 3


def test_pad_mode_masks_padding_but_keeps_real_eos_label(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # the classic GPT-2 set-up: pad = EOS
    dataset, report = prepare_dataset(
        tokenizer, ["Good drug.", "It worked well for my pain."], block_size=16, mode="pad"
    )
    lengths = [len(row) for row in tokenize_texts(tokenizer, ["Good drug.", "It worked well for my pain."])]
    for row, length in enumerate(lengths):
        item = dataset[row]
        assert item["attention_mask"].tolist() == [1] * length + [0] * (16 - length)
        assert item["input_ids"][length - 1] == eos
        assert item["labels"][length - 1] == eos  # the real EOS stays a label: the model learns to stop
        assert item["labels"][length:].tolist() == [-100] * (16 - length)
        assert item["labels"][:length].tolist() == item["input_ids"][:length].tolist()
    assert report.mode == "pad" and report.padding_fraction == pytest.approx(1 - sum(lengths) / 32)


def test_pad_mode_with_a_tokenizer_without_pad_token(tokenizer):
    raw = copy.deepcopy(tokenizer)
    raw.pad_token = None  # like AutoTokenizer.from_pretrained("gpt2")
    assert raw.pad_token_id is None
    dataset, _ = prepare_dataset(raw, ["Good drug.", "It worked."], block_size=8, mode="pad")
    length = len(tokenize_texts(raw, ["Good drug."])[0])
    assert dataset.attention_mask[0].tolist() == [1] * length + [0] * (8 - length)
    assert dataset.labels[0, length:].tolist() == [-100] * (8 - length)


def test_pad_sequences_truncates_and_counts():
    ids, mask, cut = pad_sequences([[5, 6, 7, 8], [9]], 3, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]] and cut == 1


def test_packed_dataset_has_full_masks_and_labels_equal_inputs(tokenizer):
    texts = ["A review of a medicine that helped."] * 20
    dataset, report = prepare_dataset(tokenizer, texts, block_size=8)
    total = sum(len(row) for row in tokenize_texts(tokenizer, texts))
    assert len(dataset) == total // 8 and report.tokens_left_over == total % 8
    assert torch.equal(dataset.labels, dataset.input_ids) and int(dataset.attention_mask.min()) == 1
    assert dataset.num_tokens == len(dataset) * 8


def test_data_report_statistics_padding_waste_versus_packing(tokenizer):
    long = "a somewhat longer review text about the side effects, the dosage and how long it took to work"
    texts = ["short", long, "medium length text here"] * 4
    lengths = [len(row) for row in tokenize_texts(tokenizer, texts)]
    block = 16
    _, pack_report = prepare_dataset(tokenizer, texts, block_size=block)
    _, pad_report = prepare_dataset(tokenizer, texts, block_size=block, mode="pad")
    assert pack_report.rows == pad_report.rows == 12
    assert pack_report.tokens == sum(lengths)
    assert (pack_report.length_min, pack_report.length_max) == (min(lengths), max(lengths))
    assert pack_report.length_median == sorted(lengths)[5] / 2 + sorted(lengths)[6] / 2
    expected_waste = 1 - sum(min(n, block) for n in lengths) / (len(lengths) * block)
    assert pack_report.padding_fraction_if_padded == pytest.approx(expected_waste)
    assert pad_report.padding_fraction == pytest.approx(expected_waste)
    assert pack_report.padding_fraction == 0.0 and expected_waste > 0.3
    assert pack_report.examples == sum(lengths) // block and pack_report.tokens_left_over == sum(lengths) % block
    assert pad_report.examples == 12
    assert pad_report.rows_truncated == sum(n > block for n in lengths) > 0
    assert pad_report.tokens_truncated == sum(max(0, n - block) for n in lengths)
    assert "left over" in str(pack_report) and "padding" in str(pad_report)
    assert "lengths" not in pack_report.to_dict()


def test_block_size_larger_than_context_is_refused(tokenizer, tiny_model):
    from gpt_helpers.models import model_context_length

    assert model_context_length(tiny_model) == 64
    with pytest.raises(DataError, match="block_size 128 is larger than the model's context of 64"):
        prepare_dataset(tokenizer, ["text"] * 100, block_size=128, max_context=model_context_length(tiny_model))


def test_texts_too_short_for_one_block(tokenizer):
    with pytest.raises(DataError, match="fewer than one block of 64"):
        prepare_dataset(tokenizer, ["tiny", "texts"], block_size=64)
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(tokenizer, [], block_size=8)
    with pytest.raises(DataError, match="mode"):
        prepare_dataset(tokenizer, ["x"], mode="stack")
    with pytest.raises(DataError, match="No training examples"):
        LMDataset(torch.zeros((0, 8), dtype=torch.long))


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_document_attention_computes_each_packed_document_as_if_alone(make, tokenizer):
    from gpt_helpers.data import document_attention

    from conftest import make_tiny_gpt2, make_tiny_llama

    model = (make_tiny_gpt2 if make == "gpt2" else make_tiny_llama)(tokenizer).eval()
    eos = tokenizer.eos_token_id
    first, second = [5, 6, 7, 8, eos], [9, 10, 11, 12, 13, 14]
    packed = torch.tensor([first + second])
    mask, positions = document_attention(packed, eos)
    with torch.no_grad():
        together = model(input_ids=packed, attention_mask=mask, position_ids=positions).logits[0, len(first) :]
        alone = model(input_ids=torch.tensor([second])).logits[0]
        plain = model(input_ids=packed).logits[0, len(first) :]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)  # fp32: the same sums, in one order or another
    assert (plain - alone).abs().max() > 1e-3, "without it the second document sees the first"
