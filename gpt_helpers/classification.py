"""Transfer learning for classification: a pre-trained causal LM with a classification head, ULMFiT's way.

A causal LM reads a text left to right; its hidden state at the *last real token* has seen the whole text. A
classification head (one linear layer, ``AutoModelForSequenceClassification``) maps that state to one score per
class. The body starts pre-trained; only the head starts random. ULMFiT's recipe (Howard & Ruder, 2018):

1. *stage 1* — fine-tune the language model on the domain's unlabelled text (:func:`adapt_language_model`);
2. *stage 2* — put a classifier head on it and train on the labelled examples with discriminative learning rates,
   gradual unfreezing from the top and a slanted triangular schedule (:func:`train_classifier`).

The same :func:`gpt_helpers.train` and :class:`~gpt_helpers.config.TrainingConfig` run both stages: a dataset whose
``labels`` hold one class per example is trained with cross-entropy per example. Metrics come with bootstrap
confidence intervals (:func:`classification_metrics`), because 98 validation reviews say little without them.

>>> data = load_labelled([{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}])
>>> data.classes, data.labels
(['neg', 'pos'], ['pos', 'neg'])
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrainingConfig
from .data import COURSE_DATASETS, clean_text, course_data_dir, load_records, pad_sequences
from .errors import DataError, ModelLoadError

#: The course dataset with labels, and its label field.
COURSE_LABELS = {"drug_reviews": "sentiment"}


# ------------------------------------------------------------------------------------------ labelled data
@dataclass
class LabelledData:
    """Texts and their labels (strings), and the sorted classes that occur."""

    texts: list[str]
    labels: list[str]
    classes: list[str] = field(default_factory=list)
    rows_empty: int = 0

    def __post_init__(self) -> None:
        self.classes = self.classes or sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> dict[str, int]:
        """Examples per class, in class order."""
        counted = Counter(self.labels)
        return {name: counted.get(name, 0) for name in self.classes}

    def subset(self, count: int, *, seed: int = 0) -> LabelledData:
        """``count`` examples drawn without replacement, each class in proportion to its size (at least one each),
        seeded: the class mix of a small labelled set is the same as the full set's."""
        if not len(self.classes) <= count <= len(self):
            raise DataError(f"count must be between {len(self.classes)} (one per class) and {len(self)}, not {count}.")
        generator = random.Random(seed)
        by_class = {name: [i for i, label in enumerate(self.labels) if label == name] for name in self.classes}
        for indices in by_class.values():
            generator.shuffle(indices)
        shares = {name: count * len(indices) / len(self) for name, indices in by_class.items()}
        taken = {name: max(1, math.floor(share)) for name, share in shares.items()}
        for name in sorted(shares, key=lambda n: shares[n] - math.floor(shares[n]), reverse=True):
            if sum(taken.values()) >= count:
                break
            taken[name] += 1
        chosen = sorted(i for name, indices in by_class.items() for i in indices[: taken[name]])[:count]
        return LabelledData([self.texts[i] for i in chosen], [self.labels[i] for i in chosen], list(self.classes))


def load_labelled(
    source: Any,
    *,
    text_field: str = "text",
    label_field: str = "label",
    split: str = "train",
    classes: Sequence[str] | None = None,
) -> LabelledData:
    """Texts and string labels from a file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``), a list of dicts, or a course
    dataset (``"drug_reviews"`` with ``label_field="sentiment"``; ``split`` picks its split). Texts are cleaned;
    empty ones are dropped and counted. Refused by name: a missing field, a label that is not a string, a single
    class, and (with ``classes``, the training set's) a label the training set does not have.
    """
    if isinstance(source, str) and source in COURSE_DATASETS and not Path(source).exists():
        source = course_data_dir() / source / f"{split}.jsonl"
    records = load_records(source, [text_field, label_field])
    if not records:
        raise DataError(f"'{source}' holds no rows.")
    texts, labels, empty = [], [], 0
    for record in records:
        label, text = record[label_field], record[text_field]
        if not isinstance(label, str) or not label.strip():
            raise DataError(
                f"{record['_where']}: the label ('{label_field}') is {label!r} ({type(label).__name__}), "
                'not a class name. Store labels as text, such as "positive" (numbers as "1" too).'
            )
        if not isinstance(text, str):
            raise DataError(f"{record['_where']}: field '{text_field}' is {type(text).__name__}, not a string.")
        cleaned = clean_text(text)
        if not cleaned:
            empty += 1
            continue
        texts.append(cleaned)
        labels.append(label.strip())
    found = sorted(set(labels))
    if classes is not None:
        unseen = sorted(set(found) - set(classes))
        if unseen:
            raise DataError(
                f"'{source}' has label(s) {unseen} that the training data does not have (its classes: "
                f"{', '.join(classes)}). A classifier cannot predict a class it never saw: fix the labels "
                "or add examples of that class to the training data."
            )
        return LabelledData(texts, labels, list(classes), empty)
    if len(found) < 2:
        raise DataError(
            f"'{source}' has only one class ({found[0] if found else 'none'}) in '{label_field}': a "
            "classifier needs examples of at least two. Check --label-field."
        )
    return LabelledData(texts, labels, found, empty)


class ClassificationDataset(torch.utils.data.Dataset):
    """Texts as right-padded token ids with an attention mask, and one class index per text in ``labels``."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.input_ids, self.attention_mask, self.labels, self.classes = input_ids, attention_mask, labels, classes

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index):
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def balance_classes(dataset: ClassificationDataset, *, seed: int = 0) -> ClassificationDataset:
    """``dataset`` with every class's examples repeated until each class has as many as the largest (random
    oversampling: whole copies, then a seeded draw without replacement for the rest). Trained on it, a classifier
    cannot score well by predicting the common class, which is what an imbalanced set teaches first; in
    expectation it is the same as weighting each class's loss by the inverse of its frequency.

    >>> data = ClassificationDataset(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long),
    ...                              torch.tensor([0, 0, 0, 1]), ["common", "rare"])
    >>> balance_classes(data).labels.tolist()
    [0, 0, 0, 1, 1, 1]
    """
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(dataset.labels == c).flatten() for c in range(len(dataset.classes))]
    largest = max(len(m) for m in members)
    chosen = []
    for indices in members:
        if len(indices):
            repeats, rest = divmod(largest, len(indices))
            chosen += [indices.repeat(repeats), indices[torch.randperm(len(indices), generator=generator)[:rest]]]
    order = torch.cat(chosen)
    return ClassificationDataset(
        dataset.input_ids[order], dataset.attention_mask[order], dataset.labels[order], list(dataset.classes)
    )


def prepare_classification(tokenizer, data: LabelledData, *, max_length: int = 128) -> ClassificationDataset:
    """Tokenize ``data`` (truncated to ``max_length`` tokens, right-padded), labels as indices of ``data.classes``.

    >>> from gpt_helpers.models import load_tokenizer
    >>> dataset = prepare_classification(load_tokenizer(), load_labelled([{"text": "good", "label": "a"},
    ...                                                                   {"text": "bad idea", "label": "b"}]))
    >>> dataset.labels.tolist(), dataset.attention_mask.sum(1).tolist()
    ([0, 1], [2, 3])
    """
    ids = tokenizer(list(data.texts), add_special_tokens=False, verbose=False)["input_ids"]
    length = min(max_length, max(len(row) for row in ids))
    input_ids, mask, _ = pad_sequences(ids, length, tokenizer.pad_token_id or 0)
    index = {name: i for i, name in enumerate(data.classes)}
    labels = torch.tensor([index[label] for label in data.labels], dtype=torch.long)
    return ClassificationDataset(input_ids, mask, labels, list(data.classes))


# ------------------------------------------------------------------------------------------ the model
def load_classifier(name_or_model: Any, classes: Sequence[str], *, seed: int = 0, random_init: bool = False):
    """A sequence classifier on a pre-trained causal LM: the LM's body and a new, seeded linear head that scores the
    hidden state of the last real token. ``name_or_model`` is a model name or folder (as for ``load_model``), or a
    language model already in memory (e.g. after stage 1), whose body weights are copied. ``random_init`` gives the
    same architecture untrained: the from-scratch baseline. Returns ``(model, tokenizer)`` (tokenizer None when a
    model was given).
    """
    from transformers import AutoModelForSequenceClassification

    from .models import load_model

    labels = {
        "num_labels": len(classes),
        "id2label": dict(enumerate(classes)),
        "label2id": {name: i for i, name in enumerate(classes)},
    }
    if isinstance(name_or_model, torch.nn.Module):
        language_model, tokenizer = name_or_model, None
    else:
        language_model, tokenizer = load_model(name_or_model, random_init=random_init, seed=seed)
    config = language_model.config.__class__.from_dict({**language_model.config.to_dict(), **labels})
    config.pad_token_id = language_model.config.pad_token_id
    if config.pad_token_id is None:
        raise ModelLoadError(
            "The model has no pad token id, which the classifier needs to find each text's last "
            "token. Load it with gpt_helpers.load_model (it sets one)."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = AutoModelForSequenceClassification.from_config(
            config, dtype=next(language_model.parameters()).dtype
        )
    missing, unexpected = classifier.base_model.load_state_dict(language_model.base_model.state_dict(), strict=False)
    if unexpected or [name for name in missing if "rotary" not in name]:
        raise ModelLoadError(f"The classifier's body does not match the language model ({(missing or unexpected)[0]}).")
    classifier.config.name_or_path = getattr(language_model.config, "name_or_path", "")
    return classifier, tokenizer


@torch.no_grad()
def predict(model, dataset: ClassificationDataset, *, batch_size: int = 32) -> tuple[list[int], torch.Tensor]:
    """Predicted class indices and class probabilities for every example of ``dataset``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probabilities = []
    for start in range(0, len(dataset), batch_size):
        logits = model(
            input_ids=dataset.input_ids[start : start + batch_size].to(device),
            attention_mask=dataset.attention_mask[start : start + batch_size].to(device),
        ).logits
        probabilities.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    probabilities = torch.cat(probabilities)
    return probabilities.argmax(-1).tolist(), probabilities


@torch.no_grad()
def last_token_features(
    model, dataset: ClassificationDataset, *, batch_size: int = 32, precision: str = "auto"
) -> torch.Tensor:
    """The body's final hidden state at each text's last real token (float32, one row per text): exactly what a
    classifier head reads. ``model`` is a causal LM or a classifier; its output layer is never computed. A frozen
    body plus a linear head *is* a linear model on these features, so scikit-learn's LogisticRegression on them
    trains the frozen-body classifier of a large model in seconds.

    ``precision``: ``"fp32"``, ``"bf16"``, or ``"auto"``: bf16 on a GPU that has it; on a CPU with bf16 instructions
    the first batch runs in both and the faster one does the rest (bf16 pays for a 100M-parameter model, not a tiny
    one); fp32 elsewhere. Texts are batched shortest first and each batch is cut to its longest text, so little
    compute goes to padding; the rows come back in the dataset's order.
    """
    from .precision import cpu_bf16_instructions

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    lengths = dataset.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)  # similar lengths share a batch: less padding to compute

    @torch.inference_mode()  # no graph: the body is only read
    def features(start: int, dtype: torch.dtype | None) -> torch.Tensor:
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())  # right-padded: nothing after the batch's longest text is needed
        mask = dataset.attention_mask[rows, :width].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            hidden = model.base_model(
                input_ids=dataset.input_ids[rows, :width].to(device), attention_mask=mask
            ).last_hidden_state
        last = mask.sum(1) - 1  # the last real token of each text
        return hidden[torch.arange(len(last), device=device), last].float().cpu()

    candidates: list[torch.dtype | None] = [None]
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        candidates = [torch.bfloat16]
    elif precision == "auto" and device.type == "cpu" and cpu_bf16_instructions():
        candidates = [None, torch.bfloat16]
    timed = {}
    for dtype in candidates:
        started = time.perf_counter()
        first = features(0, dtype)
        timed[dtype] = (time.perf_counter() - started, first)
    chosen = min(timed, key=lambda dtype: timed[dtype][0])
    rows = [timed[chosen][1]] + [features(start, chosen) for start in range(batch_size, len(dataset), batch_size)]
    model.train(was_training)
    return torch.cat(rows)[torch.argsort(order)]  # back to the dataset's order


# ------------------------------------------------------------------------------------------ metrics
@dataclass
class ClassificationMetrics:
    """Accuracy and macro-F1 with bootstrap confidence intervals, per-class scores and the confusion matrix
    (rows: true class, columns: predicted class)."""

    classes: list[str]
    examples: int
    accuracy: float
    macro_f1: float
    accuracy_interval: tuple[float, float]
    macro_f1_interval: tuple[float, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        level = f"{100 * self.confidence:.0f}%"
        return (
            f"accuracy {100 * self.accuracy:.1f}% ({level} interval {100 * self.accuracy_interval[0]:.1f}–"
            f"{100 * self.accuracy_interval[1]:.1f}), macro-F1 {self.macro_f1:.3f} ({self.macro_f1_interval[0]:.3f}–"
            f"{self.macro_f1_interval[1]:.3f}) on {self.examples} examples"
        )


def _scores(true: Sequence[int], predicted: Sequence[int], count: int) -> tuple[float, float, list[list[int]]]:
    confusion = [[0] * count for _ in range(count)]
    for t, p in zip(true, predicted):
        confusion[t][p] += 1
    f1s = []
    for c in range(count):
        tp = confusion[c][c]
        fp = sum(confusion[r][c] for r in range(count)) - tp
        fn = sum(confusion[c]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    accuracy = sum(confusion[c][c] for c in range(count)) / max(len(true), 1)
    return accuracy, sum(f1s) / count, confusion


def classification_metrics(
    true: Sequence[int],
    predicted: Sequence[int],
    classes: Sequence[str],
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ClassificationMetrics:
    """Accuracy, macro-F1 (the unweighted mean of the classes' F1, so a rare class counts as much as a common one),
    per-class precision, recall and F1, the confusion matrix, and percentile bootstrap intervals (``bootstrap``
    resamples of the examples, seeded) for accuracy and macro-F1. Scores follow scikit-learn's definitions (a class
    with no predictions has precision 0).

    >>> m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["neg", "pos"], bootstrap=0)
    >>> m.accuracy, round(m.macro_f1, 4), m.confusion
    (0.75, 0.7333, [[1, 1], [0, 2]])
    """
    if len(true) != len(predicted) or not true:
        raise DataError(f"Give as many predictions as true labels, at least one ({len(true)} and {len(predicted)}).")
    count = len(classes)
    accuracy, macro_f1, confusion = _scores(true, predicted, count)
    per_class = {}
    for c, name in enumerate(classes):
        tp, predicted_c, actual = confusion[c][c], sum(confusion[r][c] for r in range(count)), sum(confusion[c])
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / actual if actual else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "support": actual,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        }
    intervals = {"accuracy": (accuracy, accuracy), "macro_f1": (macro_f1, macro_f1)}
    if bootstrap:
        generator = random.Random(seed)
        samples: dict[str, list[float]] = {"accuracy": [], "macro_f1": []}
        n = len(true)
        for _ in range(bootstrap):
            picks = [generator.randrange(n) for _ in range(n)]
            a, f, _ = _scores([true[i] for i in picks], [predicted[i] for i in picks], count)
            samples["accuracy"].append(a)
            samples["macro_f1"].append(f)
        tail = (1 - confidence) / 2
        for key, values in samples.items():
            values.sort()
            intervals[key] = (
                values[int(math.floor(tail * (bootstrap - 1)))],
                values[int(math.ceil((1 - tail) * (bootstrap - 1)))],
            )
    return ClassificationMetrics(
        list(classes),
        len(true),
        accuracy,
        macro_f1,
        intervals["accuracy"],
        intervals["macro_f1"],
        per_class,
        confusion,
        confidence,
    )


def evaluate_classifier(model, dataset: ClassificationDataset, **options) -> ClassificationMetrics:
    """:func:`classification_metrics` of ``model``'s predictions on ``dataset``."""
    predicted, _ = predict(model, dataset)
    return classification_metrics(dataset.labels.tolist(), predicted, dataset.classes, **options)


def majority_baseline(train: LabelledData, evaluation: LabelledData, **options) -> ClassificationMetrics:
    """The metrics of always predicting the training set's most common class: the floor every classifier must beat."""
    common = Counter(train.labels).most_common(1)[0][0]
    index = {name: i for i, name in enumerate(train.classes)}
    true = [index[label] for label in evaluation.labels]
    return classification_metrics(true, [index[common]] * len(true), train.classes, **options)


def plot_confusion(metrics: ClassificationMetrics, *, title: str = "", save_to: str | os.PathLike | None = None):
    """The confusion matrix as a heat map with the counts written in; returns the Figure (saved when asked)."""
    from matplotlib.figure import Figure

    size = len(metrics.classes)
    figure = Figure(figsize=(1.4 * size + 2, 1.2 * size + 1.5), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(metrics.confusion, cmap="Blues")
    axes.set_xticks(range(size), metrics.classes, rotation=30, ha="right")
    axes.set_yticks(range(size), metrics.classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    top = max(max(row) for row in metrics.confusion) or 1
    for r, row in enumerate(metrics.confusion):
        for c, value in enumerate(row):
            axes.text(c, r, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    axes.set_title(title or f"accuracy {100 * metrics.accuracy:.1f}%, macro-F1 {metrics.macro_f1:.2f}")
    figure.colorbar(image, ax=axes, shrink=0.8, label="examples")
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(save_to, dpi=100)
    return figure


# ------------------------------------------------------------------------------------------ ULMFiT's two stages
def adapt_language_model(model, tokenizer, texts: Sequence[str], config: TrainingConfig, *, block_size: int = 128):
    """Stage 1: fine-tune the language model on the domain's text (labels unused); returns the ``TrainResult``."""
    from .data import prepare_dataset
    from .training import train

    data, _ = prepare_dataset(tokenizer, list(texts), block_size=block_size)
    return train(model, tokenizer, data, None, config)


def train_classifier(
    model,
    tokenizer,
    train_data: ClassificationDataset,
    eval_data: ClassificationDataset | None,
    config: TrainingConfig,
    *,
    method: str = "gradual_unfreezing",
    decay: float = 2.6,
    unfreeze_every: int | None = None,
    balance: bool = True,
):
    """Stage 2: train a classifier from :func:`load_classifier` by ``method``, on ``train_data`` with its classes
    balanced by oversampling (:func:`balance_classes`; ``balance=False`` trains on the data as it is):

    * ``"full"`` — every weight at ``config.learning_rate``;
    * ``"frozen_body"`` — only the head (and the final norm);
    * ``"discriminative"`` — every weight, each level below the top ``decay`` times slower (ULMFiT: 2.6);
    * ``"gradual_unfreezing"`` — discriminative rates, and the levels thawed from the top one at a time, every
      ``unfreeze_every`` steps (by default the budget spread evenly over the levels): ULMFiT's recipe, with
      ``config.lr_schedule="slanted_triangular"`` for its schedule.
    """
    from .strategies import GradualUnfreezing, discriminative_param_groups, freeze
    from .training import train

    methods = ("full", "frozen_body", "discriminative", "gradual_unfreezing")
    if method not in methods:
        raise DataError(f"method must be one of {', '.join(methods)}, not {method!r}.")
    groups, callbacks = None, []
    if method == "frozen_body":
        freeze(model, all_but_head=True)
    if method in ("discriminative", "gradual_unfreezing"):
        groups = discriminative_param_groups(model, config.learning_rate, decay=decay, weight_decay=config.weight_decay)
    if method == "gradual_unfreezing":
        from .architecture import transformer_blocks

        levels = len(transformer_blocks(model)) + 1
        callbacks = [GradualUnfreezing(model, unfreeze_every or max(1, (config.max_steps or levels) // levels))]
    if balance:
        train_data = balance_classes(train_data, seed=config.seed)
    return train(model, tokenizer, train_data, eval_data, config, param_groups=groups, callbacks=callbacks)
