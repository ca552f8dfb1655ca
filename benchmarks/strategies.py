"""Transfer-learning strategies, measured: which one wins on each course dataset, and how much data pre-training saves.

Part 1 runs ``gpt_helpers.experiments.compare_strategies`` on each course dataset: every strategy starts from the
bundled base model (``from_scratch``: the same architecture, random weights) and trains with the same data, seed,
batch and step budget. Part 2 runs ``data_efficiency_sweep``: full fine-tuning vs from scratch on growing
fractions of one dataset's training split. Part 3 is the memory planner's table for the GPT-2 family, to show where
LoRA's memory saving starts to matter.

Writes into ``--out``: ``RESULTS.md`` (tables and the winners), ``results.json`` (every row), ``curves-<dataset>.png``
(validation curves per strategy) and ``data-efficiency.png``.

    python benchmarks/strategies.py            # defaults: 8 strategies × 3 datasets + a 6-run sweep, ~30 min on 2 CPU cores
    python benchmarks/strategies.py --steps 40 --datasets drug_reviews --fractions 0.1 1.0   # a quick look, ~5 min
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import gpt_helpers as gh
from gpt_helpers.data import COURSE_DATASETS
from gpt_helpers.experiments import best_by, compare_strategies, data_efficiency_sweep
from gpt_helpers.memory import family_table_markdown, gpt2_family_table
from gpt_helpers.strategies import STRATEGIES

logger = logging.getLogger("benchmarks.strategies")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-gpt2-base", help="base model: bundled name or local folder")
    parser.add_argument("--datasets", nargs="+", default=list(COURSE_DATASETS), choices=COURSE_DATASETS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (the equal budget)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="wall-time budget per run instead of / besides steps"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of every strategy but LoRA and scratch")
    parser.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA's learning rate (adapters want a higher one)")
    parser.add_argument("--scratch-lr", type=float, default=2e-3, help="from-scratch learning rate")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--sweep-dataset", default="drug_reviews", choices=[*COURSE_DATASETS, "none"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.2, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/strategies"))
    return parser.parse_args()


def load_splits(tokenizer, dataset: str, block_size: int):
    train, train_report = gh.prepare_dataset(tokenizer, gh.load_course_dataset(dataset, "train"), block_size=block_size)
    validation, _ = gh.prepare_dataset(tokenizer, gh.load_course_dataset(dataset, "validation"), block_size=block_size)
    logger.info("%s: %s", dataset, train_report)
    return train, validation


def strategy_table(rows: list[dict[str, Any]]) -> str:
    scratch = next((row for row in rows if row["strategy"] == "from_scratch"), None)
    lines = [
        "| strategy | trainable | % | peak memory | wall | tokens/s | best val. perplexity | at step | vs scratch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        versus = (
            f"{100 * (row['best_perplexity'] / scratch['best_perplexity'] - 1):+.0f}%"
            if scratch and row["best_perplexity"]
            else ""
        )
        memory = f"{row['peak_memory_mb']:.0f} MiB" if row["peak_memory_mb"] is not None else "–"
        lines.append(
            f"| {row['strategy']} | {row['trainable_parameters']:,} | {row['trainable_percent']:.1f} | {memory} | "
            f"{row['wall_seconds']:.0f} s | {row['tokens_per_second']:,.0f} | {row['best_perplexity']:.1f} | "
            f"{row['best_step']} | {versus} |"
        )
    return "\n".join(lines)


def winners(dataset: str, rows: list[dict[str, Any]]) -> str:
    best = best_by(rows, "best_eval_loss")
    table = {row["strategy"]: row for row in rows}
    parts = [f"**{dataset}**: {best['strategy']} wins with validation perplexity {best['best_perplexity']:.1f}"]
    for other in ("full", "from_scratch"):
        if other in table and other != best["strategy"]:
            parts.append(
                f"{100 * (1 - best['best_perplexity'] / table[other]['best_perplexity']):.0f}% lower than {other} "
                f"({table[other]['best_perplexity']:.1f})"
            )
    if "lora" in table and "full" in table:
        parts.append(
            f"LoRA's measured peak {table['lora']['peak_memory_mb']:.0f} MiB vs full {table['full']['peak_memory_mb']:.0f} MiB"
        )
    return "; ".join(parts) + "."


def sweep_table(rows: list[dict[str, Any]]) -> str:
    strategies = sorted({r["strategy"] for r in rows})
    lines = [
        "| fraction | training blocks | " + " | ".join(strategies) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in strategies) + " |",
    ]
    for fraction in sorted({r["fraction"] for r in rows}):
        cells = {r["strategy"]: r for r in rows if r["fraction"] == fraction}
        examples = next(iter(cells.values()))["train_examples"]
        lines.append(
            f"| {fraction:g} | {examples} | "
            + " | ".join(f"{cells[s]['best_perplexity']:.1f}" for s in strategies)
            + " |"
        )
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for strategy in sorted({r["strategy"] for r in rows}):
        points = sorted((r["train_examples"], r["best_perplexity"]) for r in rows if r["strategy"] == strategy)
        axis.plot(
            *zip(*points), marker="o", label="pre-trained base" if strategy == "full" else strategy.replace("_", " ")
        )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="training blocks",
        ylabel="best validation perplexity",
        title="Data efficiency: pre-trained vs from scratch",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = gh.load_tokenizer(args.model)
    config = gh.TrainingConfig(
        output_dir=str(args.out / "runs"),
        max_steps=args.steps,
        max_time_seconds=args.seconds,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_every=args.eval_every,
        eval_batches=None,
        log_every=5,
        warmup_steps=max(1, args.steps // 20),
        seed=args.seed,
        save_best=False,
        save_final=False,
        plot=False,
        progress=False,
    )
    rates = {
        name: rate
        for name, rate in (("lora", args.lora_lr), ("from_scratch", args.scratch_lr))
        if name in args.strategies
    }
    started = time.perf_counter()
    report = []
    results: dict[str, Any] = {"arguments": {k: str(v) for k, v in vars(args).items()}, "strategies": {}, "sweep": []}
    summary = []
    for dataset in args.datasets:
        train, validation = load_splits(tokenizer, dataset, args.block_size)
        rows, histories = compare_strategies(
            args.model,
            args.strategies,
            train,
            validation,
            config.replace(output_dir=str(args.out / "runs" / dataset)),
            learning_rates=rates,
        )
        gh.plot_history(
            histories, save_to=args.out / f"curves-{dataset}.png", show=False, title=f"{dataset}: strategies"
        )
        results["strategies"][dataset] = rows
        results["device"] = next(iter(histories.values())).info["device"]
        summary.append(winners(dataset, rows))
        report += [
            f"## {dataset} ({len(train)} training blocks)\n",
            strategy_table(rows),
            "",
            f"![validation curves](curves-{dataset}.png)\n",
        ]
    if args.sweep_dataset != "none":
        train, validation = load_splits(tokenizer, args.sweep_dataset, args.block_size)
        sweep_rows, _ = data_efficiency_sweep(
            args.model,
            args.fractions,
            train,
            validation,
            config.replace(output_dir=str(args.out / "runs" / "sweep")),
            learning_rates={"from_scratch": args.scratch_lr},
        )
        plot_sweep(sweep_rows, args.out / "data-efficiency.png")
        results["sweep"] = sweep_rows
        report += [
            f"## Data efficiency on {args.sweep_dataset} (best validation perplexity)\n",
            sweep_table(sweep_rows),
            "",
            "![data efficiency](data-efficiency.png)\n",
        ]
    family = gpt2_family_table(batch_size=8, seq_len=1024, precision="bf16")
    report += [
        "## Where LoRA's memory saving shows up (estimate, batch 8 × 1024 tokens, bf16, AdamW)\n",
        family_table_markdown(family),
        "",
        "## Summary\n",
        *[f"- {line}" for line in summary],
        f"\nTotal wall time {time.perf_counter() - started:.0f} s.\n",
    ]
    header = [
        "# Transfer-learning strategies on the course datasets\n",
        f"Base model `{args.model}`; {args.steps} steps of {args.batch_size} × {args.block_size} tokens per run"
        f"{f' (or {args.seconds:g} s)' if args.seconds else ''}; learning rate {args.lr:g} (LoRA {args.lora_lr:g}, "
        f"from scratch {args.scratch_lr:g}); seed {args.seed}; device {results.get('device', '?')}. Peak memory: "
        "tensor memory of loading the model and two training steps, measured.\n",
    ]
    (args.out / "RESULTS.md").write_text("\n".join(header + report), encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    logger.info("Wrote %s, %s and the plots.", args.out / "RESULTS.md", args.out / "results.json")


if __name__ == "__main__":
    main()
