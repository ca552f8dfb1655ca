"""Measure the packaged real model beside the bundled one and write the measured part of its model card.

    python scripts/measure_real_model.py            # ~6 minutes on 2 CPU cores; run it on an otherwise idle machine

Measures, on this machine: the one-time conversion (into a fresh cache folder) and later loads; zero-shot bits per
byte (and per-token perplexity) of ``tiny-gpt2-base`` and ``smollm2-135m-instruct`` on each course dataset's
validation split; training speed of the real model, full fine-tuning and LoRA, fp32 and bf16 autocast (median of
the logged speeds after a warm-up, batch 8 × 128 tokens); and a 60-step LoRA fine-tune on drug reviews.
Writes ``gpt_helpers/assets/model-cards/smollm2-135m-instruct.md`` (copied into every converted folder's card).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import transformers

import gpt_helpers as gh
from gpt_helpers.evaluation import bits_per_byte
from gpt_helpers.model_card import MEASURED_CARDS_DIR
from gpt_helpers.precision import cpu_bf16_instructions
from gpt_helpers.strategies import apply_lora

REAL, TINY = "smollm2-135m-instruct", "tiny-gpt2-base"


def conversion_times() -> tuple[float, float]:
    """Seconds of the first load (conversion) and of a second load, each in a fresh process and cache folder."""
    code = (
        "import time, gpt_helpers as gh; t = time.perf_counter(); gh.load_model('" + REAL + "'); "
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GPT_HELPERS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        seconds = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
                ).stdout.split()[-1]
            )
            for _ in range(2)
        ]
    return seconds[0], seconds[1]


def zero_shot() -> list[tuple[str, str, float, float, float]]:
    """(dataset, model, bits per byte, bytes per token, perplexity per token) on each validation split."""
    rows = []
    for name in (TINY, REAL):
        model, tokenizer = gh.load_model(name)
        for dataset in gh.data.COURSE_DATASETS:
            texts = gh.clean_texts(gh.load_course_dataset(dataset, "validation"))[0]
            measured = bits_per_byte(model, tokenizer, texts)
            data, _ = gh.prepare_dataset(tokenizer, texts, block_size=128)
            rows.append(
                (dataset, name, measured.bits_per_byte, measured.bytes_per_token, gh.evaluate(model, data).perplexity)
            )
            print(rows[-1], flush=True)
    return rows


def training_speeds(steps: int = 6) -> dict[tuple[str, str], float]:
    """Median tokens/s of the logged steps after the first, for full and LoRA × fp32 and bf16."""
    base, tokenizer = gh.load_model(REAL)
    texts = gh.clean_texts(gh.load_course_dataset("drug_reviews", "train"))[0]
    data, _ = gh.prepare_dataset(tokenizer, texts, block_size=128)
    speeds = {}
    for mode in ("full", "lora"):
        for precision in ("fp32", "bf16"):
            model = copy.deepcopy(base)
            if mode == "lora":
                model = apply_lora(model, r=16, alpha=32)
            config = gh.TrainingConfig(
                output_dir=tempfile.mkdtemp(),
                max_steps=steps,
                batch_size=8,
                log_every=1,
                warmup_steps=0,
                precision=precision,
                progress=False,
                plot=False,
                save_best=False,
                save_final=False,
                device="cpu",
            )
            history = gh.train(model, tokenizer, data, None, config).history
            speeds[mode, precision] = statistics.median(history.column("tokens_per_second")[1][1:])
            print(mode, precision, speeds[mode, precision], flush=True)
    return speeds


def lora_fine_tune(steps: int = 60) -> tuple[float, float, float]:
    """Validation perplexity before and after a LoRA fine-tune on drug reviews, and its seconds."""
    model, tokenizer = gh.load_model(REAL)
    splits = {s: gh.clean_texts(gh.load_course_dataset("drug_reviews", s))[0] for s in ("train", "validation")}
    train, _ = gh.prepare_dataset(tokenizer, splits["train"], block_size=128)
    val, _ = gh.prepare_dataset(tokenizer, splits["validation"], block_size=128)
    before = gh.evaluate(model, val).perplexity
    config = gh.TrainingConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        batch_size=8,
        learning_rate=1e-3,
        warmup_steps=5,
        eval_every=steps,
        eval_batches=None,
        progress=False,
        plot=False,
        save_best=False,
        save_final=False,
        device="cpu",
    )
    started = time.perf_counter()
    result = gh.train(apply_lora(model, r=16, alpha=32), tokenizer, train, val, config)
    return before, result.final_eval.perplexity, time.perf_counter() - started


def card(conversion: tuple[float, float], rows, speeds, tune, args) -> str:
    by = {(dataset, name): (bpb, bpt, ppl) for dataset, name, bpb, bpt, ppl in rows}
    lines = [
        "## Measured by the course",
        "",
        f"`python scripts/measure_real_model.py` on {date.today():%Y-%m-%d}: {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads; bf16 instructions: {', '.join(cpu_bf16_instructions()) or 'none'}), "
        f"torch {torch.__version__.split('+')[0]}, transformers {transformers.__version__}.",
        "",
        f"Conversion (first load, once per machine): {conversion[0]:.0f} s; later loads: {conversion[1]:.1f} s.",
        "",
        "Zero-shot on the course's validation splits. Bits per byte (lower is better) compare models with "
        "different tokenizers; perplexity per token does not (a SmolLM2 token covers more text).",
        "",
        "| dataset | tiny-gpt2-base bits/byte | this model bits/byte | this model bytes/token | tiny / this perplexity per token |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for dataset in gh.data.COURSE_DATASETS:
        tiny, real = by[dataset, TINY], by[dataset, REAL]
        lines.append(f"| {dataset} | {tiny[0]:.3f} | {real[0]:.3f} | {real[1]:.2f} | {tiny[2]:.1f} / {real[2]:.1f} |")
    lines += [
        "",
        f"Training speed on this CPU, batch 8 × 128 tokens, `gh.train` (median tokens/s of {args.steps - 1} "
        "steps after a warm-up; LoRA r 16 on q/k/v/o):",
        "",
        "| setup | fp32 | bf16 autocast | bf16 ÷ fp32 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode, label in (("full", "full fine-tuning"), ("lora", "LoRA")):
        fp32, bf16 = speeds[mode, "fp32"], speeds[mode, "bf16"]
        lines.append(f"| {label} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}× |")
    before, after, seconds = tune
    lines += [
        "",
        f"LoRA (r 16, alpha 32, q/k/v/o) on drug reviews, {args.tune_steps} steps of 8 × 128 tokens, lr 1e-3, "
        f"precision chosen automatically: validation perplexity {before:.1f} → {after:.1f} in {seconds:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per speed measurement [6]")
    parser.add_argument("--tune-steps", type=int, default=60, help="steps of the LoRA fine-tune [60]")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    conversion = conversion_times()
    print("conversion", conversion, flush=True)
    rows = zero_shot()
    speeds = training_speeds(args.steps)
    tune = lora_fine_tune(args.tune_steps)
    text = card(conversion, rows, speeds, tune, args)
    MEASURED_CARDS_DIR.mkdir(parents=True, exist_ok=True)
    (MEASURED_CARDS_DIR / f"{REAL}.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"Written: {Path(MEASURED_CARDS_DIR / f'{REAL}.md')}")


if __name__ == "__main__":
    main()
