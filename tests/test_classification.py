"""Classification: labelled data and its refusals, metrics equal to scikit-learn's, a head on the pre-trained LM that
pools the last real token, training through the same loop, and the command line's classify command."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gpt_helpers import load_model
from gpt_helpers.classification import (
    LabelledData,
    classification_metrics,
    evaluate_classifier,
    last_token_features,
    load_classifier,
    load_labelled,
    majority_baseline,
    predict,
    prepare_classification,
    train_classifier,
)
from gpt_helpers.cli import EXIT_USER_ERROR, main
from gpt_helpers.errors import DataError

from conftest import make_tiny_gpt2, make_tiny_llama, quick_config

sklearn_metrics = pytest.importorskip(
    "sklearn.metrics", reason="scikit-learn is a dev dependency (pip install -e .[dev])"
)


# ------------------------------------------------------------------------------------------ metrics
CASES = [
    ([0, 0, 1, 1], [0, 1, 1, 1], 2),
    ([0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 2, 1, 1, 0], 3),
    ([2, 2, 2, 2], [2, 2, 2, 2], 3),  # classes absent from both: F1 0, as scikit-learn with zero_division=0
    ([0, 1, 2, 0], [1, 1, 1, 1], 3),  # a class never predicted: precision 0
]


@pytest.mark.parametrize(("true", "predicted", "count"), CASES)
def test_metrics_equal_scikit_learns(true, predicted, count):
    classes = [f"c{i}" for i in range(count)]
    metrics = classification_metrics(true, predicted, classes, bootstrap=0)
    labels = list(range(count))
    assert metrics.accuracy == pytest.approx(sklearn_metrics.accuracy_score(true, predicted), abs=1e-12)
    macro = sklearn_metrics.f1_score(true, predicted, labels=labels, average="macro", zero_division=0)
    assert metrics.macro_f1 == pytest.approx(macro, abs=1e-12)
    assert metrics.confusion == sklearn_metrics.confusion_matrix(true, predicted, labels=labels).tolist()
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        true, predicted, labels=labels, zero_division=0
    )
    for c, name in enumerate(classes):
        scores = metrics.per_class[name]
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx(
            (precision[c], recall[c], f1[c]), abs=1e-12
        )
        assert scores["support"] == support[c]


def test_bootstrap_interval_brackets_the_score_and_narrows_with_more_examples():
    generator = random.Random(1)
    true = [generator.randrange(3) for _ in range(2000)]
    predicted = [t if generator.random() < 0.7 else generator.randrange(3) for t in true]
    small = classification_metrics(true[:100], predicted[:100], ["a", "b", "c"], bootstrap=500)
    large = classification_metrics(true, predicted, ["a", "b", "c"], bootstrap=500)
    for metrics in (small, large):
        assert metrics.accuracy_interval[0] <= metrics.accuracy <= metrics.accuracy_interval[1]
        assert metrics.macro_f1_interval[0] <= metrics.macro_f1 <= metrics.macro_f1_interval[1]
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    # the width of a proportion's interval shrinks as 1/sqrt(n): 20x the examples, about 1/4.5 the width
    assert width(large.accuracy_interval) < width(small.accuracy_interval) / 2.5


# ------------------------------------------------------------------------------------------ labelled data
def rows(labels) -> list[dict]:
    return [{"text": f"review number {i}", "sentiment": label} for i, label in enumerate(labels)]


@pytest.mark.parametrize(
    ("records", "options", "expected"),
    [
        (rows(["a", "b"]), {"label_field": "label"}, "'label'"),
        (rows(["a", "a", "a"]), {"label_field": "sentiment"}, "only one class"),
        (rows(["a", 1]), {"label_field": "sentiment"}, "not a class name"),
        (rows(["a", None]), {"label_field": "sentiment"}, "not a class name"),
        (rows(["a", "b", "c"]), {"label_field": "sentiment", "classes": ["a", "b"]}, "['c']"),
    ],
    ids=["missing-field", "single-class", "number-label", "null-label", "unseen-at-evaluation"],
)
def test_bad_labels_are_refused_by_name(records, options, expected):
    with pytest.raises(DataError) as error:
        load_labelled(records, **options)
    assert expected in str(error.value)


def test_subset_keeps_the_class_mix_and_is_seeded():
    data = load_labelled("drug_reviews", label_field="sentiment")
    small = data.subset(50, seed=3)
    assert len(small) == 50 and small.classes == data.classes
    for name, count in small.counts().items():
        assert abs(count - 50 * data.counts()[name] / len(data)) <= 1
    assert small.texts == data.subset(50, seed=3).texts != data.subset(50, seed=4).texts


# ------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama], ids=["gpt2", "llama"])
def test_the_head_reads_the_last_real_token_whatever_the_padding(make, tokenizer):
    """The same text scores the same alone and right-padded in a batch with a longer one."""
    classifier, _ = load_classifier(make(tokenizer).eval(), ["neg", "pos"])
    classifier.eval()
    data = LabelledData(["short one", "a much longer text than the first one, padded to it"], ["neg", "pos"])
    batch = prepare_classification(tokenizer, data)
    alone = prepare_classification(tokenizer, LabelledData(["short one"], ["neg"], ["neg", "pos"]))
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]  # the short text is padded
    _, together = predict(classifier, batch)
    _, single = predict(classifier, alone)
    # fp32 sums over different lengths reassociate; probabilities of one O(1) logit agree to ~1e-6
    torch.testing.assert_close(together[0], single[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama], ids=["gpt2", "llama"])
def test_features_are_what_the_head_reads(make, tokenizer):
    """The head applied to last_token_features gives the classifier's own logits, for the LM and the classifier."""
    language_model = make(tokenizer)
    classifier, _ = load_classifier(language_model, ["neg", "pos"])
    data = prepare_classification(
        tokenizer, LabelledData(["fine", "not good at all, sadly", "ok then"], ["pos", "neg", "pos"])
    )
    logits = classifier.eval()(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    for source in (language_model, classifier):
        features = last_token_features(source, data, batch_size=2, precision="fp32")
        # the same fp32 operations on the same inputs, batched differently: agreement to rounding
        torch.testing.assert_close(classifier.score(features), logits, rtol=1e-5, atol=1e-5)


def test_features_batch_similar_lengths_and_skip_padding(tokenizer):
    """Shortest texts first, each batch cut to its longest text: the body never computes a column of pure padding."""
    model = make_tiny_gpt2(tokenizer)
    texts = ["a", "one two three four five six seven eight", "b c", "one two three four five six"]
    data = prepare_classification(tokenizer, LabelledData(texts, ["x", "y", "x", "y"]))
    widths = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    last_token_features(model, data, batch_size=2, precision="fp32")
    hook.remove()
    lengths = sorted(data.attention_mask.sum(1).tolist())
    assert widths == [lengths[1], lengths[3]]
    assert widths[0] < data.input_ids.shape[1]


def test_the_body_starts_from_the_language_model_and_the_head_is_seeded(tokenizer):
    model = make_tiny_gpt2(tokenizer)
    first, _ = load_classifier(model, ["a", "b", "c"], seed=5)
    second, _ = load_classifier(model, ["a", "b", "c"], seed=5)
    for name, weight in model.transformer.state_dict().items():
        assert torch.equal(first.transformer.state_dict()[name], weight), name
    assert torch.equal(first.score.weight, second.score.weight)
    assert first.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_a_short_run_beats_the_majority_baseline(tmp_path, drug_reviews):
    """The bundled pre-trained model, 40 steps of ULMFiT's stage 2 on reviews whose verdict is their last word, an
    imbalanced 4:2:1 mix: macro-F1 far above the majority class's (which never predicts two of the three)."""
    verdicts = ["great"] * 4 + ["awful"] * 2 + ["okay"]
    texts = [f"{review[:80]} Verdict: {verdicts[i % 7]}" for i, review in enumerate(drug_reviews["train"][:280])]
    labelled = LabelledData(texts, [verdicts[i % 7] for i in range(len(texts))])
    train, validation = (
        LabelledData(texts[:210], labelled.labels[:210]),
        LabelledData(texts[210:], labelled.labels[210:]),
    )
    classifier, tokenizer = load_classifier("tiny-gpt2-base", train.classes, seed=0)
    config = quick_config(tmp_path, max_steps=40, batch_size=16, learning_rate=3e-3, lr_schedule="slanted_triangular")
    result = train_classifier(
        classifier, tokenizer, prepare_classification(tokenizer, train, max_length=48), None, config
    )
    metrics = evaluate_classifier(result.model, prepare_classification(tokenizer, validation, max_length=48))
    floor = majority_baseline(train, validation)
    assert floor.macro_f1 < 0.3 and metrics.macro_f1 > 0.8, (metrics, floor)
    losses = result.history.column("train_loss")[1]
    assert losses[-1] < losses[0]


def test_frozen_body_trains_only_the_head(tmp_path, tokenizer):
    model = make_tiny_gpt2(tokenizer)
    classifier, _ = load_classifier(model, ["neg", "pos"])
    body = {name: weight.clone() for name, weight in classifier.transformer.h.state_dict().items()}
    head = classifier.score.weight.clone()
    data = prepare_classification(tokenizer, LabelledData(["good", "bad", "fine", "awful"], ["pos", "neg"] * 2))
    train_classifier(classifier, tokenizer, data, None, quick_config(tmp_path, max_steps=3), method="frozen_body")
    assert all(torch.equal(classifier.transformer.h.state_dict()[name], w) for name, w in body.items())
    assert not torch.equal(classifier.score.weight, head)


# ------------------------------------------------------------------------------------------ command line
def test_classify_writes_the_model_metrics_and_confusion_matrix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    labels = ["positive", "negative", "neutral"] * 20
    with open("labelled.jsonl", "w", encoding="utf-8") as file:
        for i, label in enumerate(labels):
            file.write(json.dumps({"text": f"My {label} review, number {i}.", "sentiment": label}) + "\n")
    status = main(
        ["classify", "--data", "labelled.jsonl", "--label-field", "sentiment", "--out", "out", "--steps", "4"]
        + ["--batch-size", "8", "--eval-every", "2"]
    )
    assert status == 0, capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["classes"] == ["negative", "neutral", "positive"] and metrics["examples"] == 6
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 0
    reloaded = load_model(str(tmp_path / "out" / "model"))[0]
    assert reloaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.parametrize(
    ("records", "flags", "expected"),
    [
        (rows(["a", "b"] * 5), ["--label-field", "stars"], "'stars'"),
        (rows(["a"] * 10), ["--label-field", "sentiment"], "only one class"),
        (rows(["a", 3] * 5), ["--label-field", "sentiment"], "not a class name"),
    ],
    ids=["missing-field", "single-class", "number-label"],
)
def test_classify_refuses_bad_labels_and_writes_nothing(records, flags, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    status = main(["classify", "--data", "labelled.jsonl", "--out", "out", "--steps", "2", *flags])
    error = capsys.readouterr().err
    assert status == EXIT_USER_ERROR and expected in error and "Traceback" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labelled.jsonl"]


def test_classify_refuses_a_validation_label_the_training_data_lacks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(["a", "b"] * 5)))
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(["a", "b", "z"])))
    status = main(
        ["classify", "--data", "train.jsonl", "--eval-data", "valid.jsonl", "--label-field", "sentiment"]
        + ["--out", "out", "--steps", "2"]
    )
    error = capsys.readouterr().err
    assert status == EXIT_USER_ERROR and "['z']" in error and "valid.jsonl" in error
    assert not (tmp_path / "out").exists()
