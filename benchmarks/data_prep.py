"""Data preparation throughput: gpt_helpers' batched path vs the seed's one-text-at-a-time ``encode``, one run.

Measured on the course datasets with the bundled tokenizer (and GPT-2's real one):

* seed: ``tokenizer.encode(text, return_tensors="pt")`` for each text, then padding every text to the block size;
* gpt_helpers: ``clean_texts`` + ``prepare_dataset`` (batched fast tokenization, EOS between texts, packing);
* gpt_helpers with the tokenization cache warm (a second run over the same texts).

It reports texts per second, the ratio, and the fraction of computed tokens that are padding in each layout.

    python benchmarks/data_prep.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gpt_helpers as gh


def seed_style(tokenizer, texts: list[str], block_size: int) -> tuple[float, float]:
    """Seconds and padding fraction of encoding one text at a time and padding each to ``block_size``."""
    started = time.perf_counter()
    encoded = [tokenizer.encode(text, return_tensors="pt")[0, :block_size] for text in texts]
    padded = torch.full((len(encoded), block_size), tokenizer.pad_token_id)
    for row, ids in enumerate(encoded):
        padded[row, : len(ids)] = ids
    seconds = time.perf_counter() - started
    real = sum(len(ids) for ids in encoded)
    return seconds, 1 - real / padded.numel()


def batched(tokenizer, texts: list[str], block_size: int, cache_dir: str | None) -> tuple[float, float]:
    started = time.perf_counter()
    cleaned, _ = gh.clean_texts(texts)
    dataset, report = gh.prepare_dataset(tokenizer, cleaned, block_size=block_size, cache_dir=cache_dir)
    seconds = time.perf_counter() - started
    left_over = report.tokens_left_over / max(report.tokens, 1)
    return seconds, left_over


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    lines = [
        f"Data preparation, block size {args.block_size}, medians of {args.repeats} runs, "
        f"{torch.get_num_threads()} torch threads",
        "",
        "| dataset | tokenizer | texts | seed texts/s | gpt_helpers texts/s | speed-up | cached texts/s | "
        "padding (seed) | waste (packing) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tokenizer_name in ("tiny-gpt2-base", "gpt2-tokenizer"):
        tokenizer = gh.load_tokenizer(tokenizer_name)
        for dataset in gh.data.COURSE_DATASETS:
            texts = gh.load_course_dataset(dataset, "train")
            seed = [seed_style(tokenizer, texts, args.block_size) for _ in range(args.repeats)]
            ours = [batched(tokenizer, texts, args.block_size, None) for _ in range(args.repeats)]
            with tempfile.TemporaryDirectory() as cache:
                batched(tokenizer, texts, args.block_size, cache)
                cached = [batched(tokenizer, texts, args.block_size, cache) for _ in range(args.repeats)]
            seed_rate = len(texts) / statistics.median(s for s, _ in seed)
            our_rate = len(texts) / statistics.median(s for s, _ in ours)
            cached_rate = len(texts) / statistics.median(s for s, _ in cached)
            lines.append(
                f"| {dataset} | {tokenizer_name} | {len(texts)} | {seed_rate:,.0f} | {our_rate:,.0f} | "
                f"{our_rate / seed_rate:.1f}× | {cached_rate:,.0f} | {100 * seed[0][1]:.1f}% | {100 * ours[0][1]:.2f}% |"
            )
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_prep.md").write_text(report + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
