"""Experiments that compare runs fairly: the same data, budget and seeds for every strategy, several seeds each, and
a mean and spread for every number, so that a ranking can be told apart from run-to-run noise.

    rows, histories = compare_strategies("tiny-gpt2-base", ["full", "lora"], train, val, config, seeds=[0, 1, 2])
    table = summarize(rows)            # one row per strategy: mean, standard deviation, min and max over the seeds
    print(ranking_text(table))         # says which differences are larger than the spread

:func:`data_efficiency_sweep` repeats the comparison on growing subsets of the training data.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import TrainingConfig
from .errors import ConfigError
from .history import History
from .memory import measure_peak_memory
from .models import count_parameters, load_model
from .strategies import STRATEGIES, prepare_strategy

logger = logging.getLogger(__name__)


def _check_strategies(strategies: Sequence[str]) -> None:
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"Unknown strategy {unknown or '(none given)'}: choose from {', '.join(STRATEGIES)}.")
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"Each strategy once, please: {list(strategies)}.")


class _ModelSource:
    """Fresh models for the runs of one comparison: the pre-trained weights are read from disk once (before any
    memory is measured) and each run gets its own copy; a from-scratch model is built anew for its seed."""

    def __init__(self, model_name: str, strategies: Sequence[str]) -> None:
        self.model_name = model_name
        self.pretrained = load_model(model_name) if any(s != "from_scratch" for s in strategies) else None

    def fresh(self, strategy: str, seed: int):
        if strategy == "from_scratch":
            return load_model(self.model_name, random_init=True, seed=seed)
        model, tokenizer = self.pretrained
        return copy.deepcopy(model), tokenizer


def _setup(
    strategy: str, source: _ModelSource, config: TrainingConfig, lora: dict[str, Any] | None, unfreeze_every: int | None
):
    """A fresh model for ``strategy`` (seeded by ``config.seed``) with the param groups and callbacks it trains with."""
    model, tokenizer = source.fresh(strategy, config.seed)
    lora = {"seed": config.seed, **(lora or {})}
    model, groups, callbacks = prepare_strategy(
        strategy,
        model,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        weight_decay=config.weight_decay,
        lora=lora,
        unfreeze_every=unfreeze_every,
    )
    return model, tokenizer, groups, callbacks


def _probe_peak(
    strategy: str,
    source: _ModelSource,
    train_data,
    config: TrainingConfig,
    lora: dict[str, Any] | None,
    unfreeze_every: int | None,
) -> int:
    """Peak tensor memory of a fresh copy of the strategy's model and two training steps.

    Gradual unfreezing ends with every parameter trainable, so its peak is measured in that final state (as full).
    """
    from .training import train

    strategy = "full" if strategy == "gradual_unfreezing" else strategy
    with tempfile.TemporaryDirectory(prefix="gpt-helpers-probe-") as folder:
        probe = config.replace(
            output_dir=folder,
            max_steps=2,
            epochs=None,
            max_time_seconds=None,
            save_best=False,
            save_final=False,
            save_every=None,
            resume=False,
            plot=False,
            progress=False,
        )

        def run() -> None:
            model, tokenizer, groups, callbacks = _setup(strategy, source, probe, lora, unfreeze_every)
            train(model, tokenizer, train_data, None, probe, param_groups=groups, callbacks=callbacks)

        return measure_peak_memory(run).peak_bytes


def _row(
    strategy: str, seed: int, model: torch.nn.Module, history: History, wall: float, peak: int | None
) -> dict[str, Any]:
    counts = count_parameters(model)
    best = history.best
    speeds = history.column("tokens_per_second")[1]
    train_losses = history.column("train_loss")[1]
    return {
        "strategy": strategy,
        "seed": seed,
        "trainable_parameters": counts.trainable,
        "total_parameters": counts.total,
        "trainable_percent": 100 * counts.trainable_fraction,
        "peak_memory_mb": None if peak is None else peak / 2**20,
        "wall_seconds": wall,
        "tokens_per_second": statistics.median(speeds) if speeds else None,
        "steps": history.final.step if history.final else 0,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "best_eval_loss": best.eval_loss if best else None,
        "best_perplexity": best.eval_perplexity if best else None,
        "best_step": best.step if best else None,
    }


def compare_strategies(
    model_name_or_path: str,
    strategies: Sequence[str],
    train_data,
    eval_data,
    config: TrainingConfig,
    *,
    learning_rates: dict[str, float] | None = None,
    lora: dict[str, Any] | None = None,
    unfreeze_every: int | None = None,
    measure_memory: bool = True,
    seeds: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, History]]:
    """Train each strategy from the same starting model, on the same data and budget, once per seed; return a table
    (one row per strategy and seed) and the histories (``{"<strategy>" or "<strategy>/seed-<s>": History}``).

    The budget is ``config``'s: ``max_steps`` and/or ``max_time_seconds``. ``seeds`` (default: ``config.seed``
    alone) seed the data order, dropout, the adapters and a from-scratch model; the pre-trained weights are the
    same for every seed. Every strategy uses ``config.learning_rate`` unless ``learning_rates`` names another
    (LoRA and from-scratch often want more: ``{"lora": 2e-3}``); ``lora`` holds :func:`apply_lora` options
    (``{"r": 16, "alpha": 32}``). Each run writes to ``config.output_dir/<strategy>[/seed-<s>]``. Row keys:
    ``strategy``, ``seed``, ``trainable_parameters`` (at the end of the run), ``total_parameters``,
    ``trainable_percent``, ``peak_memory_mb`` (tensor memory of a fresh copy of the model and two training steps,
    measured once per strategy in a separate run so the timed runs are not slowed; gradual unfreezing in its final,
    all-trainable state), ``wall_seconds``, ``tokens_per_second`` (median of the logged speeds), ``steps``,
    ``final_train_loss``, ``best_eval_loss``, ``best_perplexity``, ``best_step``.

    >>> rows, histories = compare_strategies("tiny-gpt2-base", ["full", "lora"], train, val,
    ...     TrainingConfig(max_steps=50, output_dir="runs/compare"), seeds=[0, 1, 2])  # doctest: +SKIP
    """
    from .training import train

    _check_strategies(strategies)
    seeds = list(seeds) if seeds is not None else [config.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct whole numbers, at least one: {seeds}.")
    learning_rates = dict(learning_rates or {})
    unknown = set(learning_rates) - set(strategies)
    if unknown:
        raise ConfigError(f"learning_rates names strategies that are not compared: {sorted(unknown)}.")
    rows, histories = [], {}
    source = _ModelSource(model_name_or_path, strategies)
    for strategy in strategies:
        learning_rate = learning_rates.get(strategy, config.learning_rate)
        base = config.replace(output_dir=str(Path(config.output_dir) / strategy), learning_rate=learning_rate)
        peak = _probe_peak(strategy, source, train_data, base, lora, unfreeze_every) if measure_memory else None
        for seed in seeds:
            run_config = base.replace(
                seed=seed, output_dir=base.output_dir + (f"/seed-{seed}" if len(seeds) > 1 else "")
            )
            model, tokenizer, groups, callbacks = _setup(strategy, source, run_config, lora, unfreeze_every)
            logger.info("Strategy %s, seed %d: %s", strategy, seed, count_parameters(model))
            started = time.perf_counter()
            result = train(
                model, tokenizer, train_data, eval_data, run_config, param_groups=groups, callbacks=callbacks
            )
            rows.append(_row(strategy, seed, result.model, result.history, time.perf_counter() - started, peak))
            histories[strategy if len(seeds) == 1 else f"{strategy}/seed-{seed}"] = result.history
    return rows, histories


def subset(dataset, fraction: float, *, seed: int = 0):
    """The first ``fraction`` of a seeded shuffle of ``dataset`` (smaller fractions are nested in larger ones).

    >>> from gpt_helpers.data import LMDataset
    >>> len(subset(LMDataset(torch.zeros(10, 4, dtype=torch.long)), 0.3))
    3
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"A fraction of the training set must be in (0, 1], not {fraction}.")
    count = max(1, round(len(dataset) * fraction))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    if hasattr(dataset, "input_ids"):
        return type(dataset)(dataset.input_ids[order], dataset.attention_mask[order])
    return torch.utils.data.Subset(dataset, order.tolist())


def data_efficiency_sweep(
    model_name_or_path: str,
    fractions: Sequence[float],
    train_data,
    eval_data,
    config: TrainingConfig,
    *,
    strategies: Sequence[str] = ("full", "from_scratch"),
    learning_rates: dict[str, float] | None = None,
    seeds: Sequence[int] | None = None,
    lora: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, History]]:
    """How much training text does pre-training save? Train each strategy on growing fractions of the data.

    Same budget at every fraction (small fractions repeat their data, and the best validation loss is kept), each
    fraction once per seed. Rows: ``fraction``, ``train_examples`` and the columns of :func:`compare_strategies`;
    histories are keyed ``"<fraction>/<strategy>[/seed-<s>]"``. Runs write to
    ``config.output_dir/fraction-<f>/<strategy>``.

    >>> rows, _ = data_efficiency_sweep("tiny-gpt2-base", [0.1, 1.0], train, val,
    ...                                 TrainingConfig(max_steps=50), seeds=[0, 1, 2])  # doctest: +SKIP
    """
    if not fractions:
        raise ConfigError("Give at least one fraction of the training set, e.g. [0.1, 0.3, 1.0].")
    rows, histories = [], {}
    for fraction in sorted(fractions):
        part = subset(train_data, fraction, seed=config.seed)
        part_config = config.replace(output_dir=str(Path(config.output_dir) / f"fraction-{fraction:g}"))
        part_rows, part_histories = compare_strategies(
            model_name_or_path,
            strategies,
            part,
            eval_data,
            part_config,
            learning_rates=learning_rates,
            measure_memory=False,
            seeds=seeds,
            lora=lora,
        )
        rows += [{"fraction": fraction, "train_examples": len(part), **row} for row in part_rows]
        histories.update({f"{fraction:g}/{name}": history for name, history in part_histories.items()})
    return rows, histories


# ------------------------------------------------------------------------------------------ reading the results
def summarize(
    rows: list[dict[str, Any]],
    *,
    by: Sequence[str] = ("strategy",),
    keys: Sequence[str] = ("best_eval_loss", "best_perplexity", "tokens_per_second", "wall_seconds"),
) -> list[dict[str, Any]]:
    """One row per group (``by``): ``runs``, and for each of ``keys`` its ``<key>_mean``, ``_std`` (sample
    standard deviation; 0 with one run), ``_min`` and ``_max`` over the runs. Other columns that are the same for
    every run of a group (parameters, memory) are kept. Groups come in the order they first appear.

    >>> table = summarize([{"strategy": "a", "best_eval_loss": 1.0}, {"strategy": "a", "best_eval_loss": 3.0}],
    ...                   keys=["best_eval_loss"])
    >>> table[0]["runs"], table[0]["best_eval_loss_mean"], table[0]["best_eval_loss_std"]
    (2, 2.0, 1.4142135623730951)
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[name] for name in by), []).append(row)
    table = []
    for group, members in groups.items():
        summary: dict[str, Any] = dict(zip(by, group))
        summary["runs"] = len(members)
        for column in members[0]:
            values = {repr(m.get(column)) for m in members}
            if column not in keys and column not in by and column != "seed" and len(values) == 1:
                summary[column] = members[0][column]
        for key in keys:
            values = [m[key] for m in members if m.get(key) is not None and math.isfinite(m[key])]
            summary[f"{key}_mean"] = statistics.fmean(values) if values else None
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
            summary[f"{key}_min"] = min(values) if values else None
            summary[f"{key}_max"] = max(values) if values else None
        table.append(summary)
    return table


def ranking_text(
    table: list[dict[str, Any]], *, key: str = "best_perplexity", name: str = "strategy", higher_is_better: bool = False
) -> str:
    """The groups of :func:`summarize` from best (lowest mean ``key``, or highest with ``higher_is_better``, as for
    accuracy) to worst, one line each, saying whether each is apart from the one above beyond their spread (their
    ranges over the seeds do not overlap) or within noise.

    >>> print(ranking_text([{"strategy": "a", "runs": 3, "best_perplexity_mean": 10.0, "best_perplexity_std": 0.5,
    ...                      "best_perplexity_min": 9.5, "best_perplexity_max": 10.5},
    ...                     {"strategy": "b", "runs": 3, "best_perplexity_mean": 10.4, "best_perplexity_std": 0.5,
    ...                      "best_perplexity_min": 9.9, "best_perplexity_max": 10.9}]))
    1. a: 10.00 ± 0.50 (3 runs, 9.50-10.50)
    2. b: 10.40 ± 0.50 (3 runs, 9.90-10.90) - within noise of a (the ranges overlap)
    """
    ranked = sorted(
        (row for row in table if row.get(f"{key}_mean") is not None),
        key=lambda row: row[f"{key}_mean"],
        reverse=higher_is_better,
    )
    lines = []
    for index, row in enumerate(ranked):
        line = (
            f"{index + 1}. {row[name]}: {row[f'{key}_mean']:.2f} ± {row[f'{key}_std']:.2f} "
            f"({row['runs']} run{'s' if row['runs'] != 1 else ''}, {row[f'{key}_min']:.2f}-{row[f'{key}_max']:.2f})"
        )
        if index:
            above = ranked[index - 1]
            if row["runs"] < 2 or above["runs"] < 2:
                line += f" - one run each: no spread to compare with {above[name]}"
            elif (
                (above[f"{key}_min"] <= row[f"{key}_max"])
                if higher_is_better
                else (row[f"{key}_min"] <= above[f"{key}_max"])
            ):
                line += f" - within noise of {above[name]} (the ranges overlap)"
            else:
                line += f" - worse than {above[name]} in every run"
        lines.append(line)
    return "\n".join(lines)


def best_by(rows: list[dict[str, Any]], key: str = "best_eval_loss") -> dict[str, Any]:
    """The row with the lowest finite ``key`` (e.g. the strategy with the best validation loss)."""
    finite = [row for row in rows if row.get(key) is not None and math.isfinite(row[key])]
    if not finite:
        raise ConfigError(f"No row has a finite '{key}': did every run diverge or skip evaluation?")
    return min(finite, key=lambda row: row[key])
