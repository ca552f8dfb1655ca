"""Time to quality on CPU: raw drug-review text → a model at a fixed validation perplexity, four ways, one run.

1. ``gpt_helpers``: ``clean_texts`` → ``prepare_dataset`` (batched tokenization, packing) → ``train`` (default
   settings apart from batch 8 and learning rate 1e-3, the course's advice for the small bundled model; the sweep
   behind that choice is in RESULTS.md).
2. The seed article's loop: each text encoded on its own with ``tokenizer.encode(text, return_tensors="pt")``,
   batch of one, ``torch.optim.AdamW(lr=5e-5)``, ``loss.item()`` every step.
3. ``transformers.Trainer`` as its causal-LM guide sets it up: ``datasets.map`` tokenization, ``group_texts``
   into blocks, ``DataCollatorForLanguageModeling(mlm=False)``, default ``TrainingArguments`` apart from the budget.
4. ``transformers.Trainer`` with gpt_helpers' settings: the same packed blocks, batch, learning rate, warmup, cosine
   decay, weight decay and schedule length. Rows 1 and 3 measure what a learner following each guide gets; rows 1
   and 4 measure the library alone.

Every method starts from the bundled base model and is scored the same way: every ``--eval-tokens`` training tokens
the clock stops, ``gpt_helpers.evaluate`` measures perplexity on the same packed validation blocks, and the clock
restarts. Wall time counts data preparation and training, not evaluation. The targets are fractions of the
zero-shot perplexity (``--target-ratios``: an easy one and the ones fine-tuning is for); a method that does not
reach a target within ``--cap`` seconds is reported as "not reached", with the ratio as a lower bound.

A second part runs gpt_helpers and the Trainer at *equal work* (same blocks, batch, learning rate and steps)
and compares tokens per second.

    python benchmarks/time_to_quality.py --repeats 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import gpt_helpers as gh
from gpt_helpers.data import course_data_dir

logging.getLogger("transformers").setLevel(logging.ERROR)


class Clock:
    """Wall time that can be paused while a method is being scored."""

    def __init__(self) -> None:
        self.total, self.started = 0.0, time.perf_counter()

    def pause(self) -> None:
        self.total += time.perf_counter() - self.started

    def resume(self) -> None:
        self.started = time.perf_counter()

    def read(self) -> float:
        return self.total + time.perf_counter() - self.started


class TargetWatcher:
    """Scores a model every ``every_tokens`` training tokens; remembers when each target was first met."""

    def __init__(self, clock: Clock, eval_data, targets: list[float], every_tokens: int, cap: float) -> None:
        self.clock, self.eval_data, self.targets, self.every, self.cap = clock, eval_data, targets, every_tokens, cap
        self.reached_at: dict[float, float | None] = {target: None for target in targets}
        self.tokens, self.next_check, self.best, self.train_seconds = 0, every_tokens, float("inf"), 0.0

    def after_step(self, model, tokens: int) -> bool:
        """Count tokens; evaluate when due; return True when the run should stop (all targets met, or time cap)."""
        self.tokens += tokens
        if self.tokens < self.next_check:
            return self.clock.read() > self.cap
        self.clock.pause()
        self.train_seconds = self.clock.total
        self.next_check += self.every
        ppl = gh.evaluate(model, self.eval_data, batch_size=32).perplexity  # restores train/eval mode itself
        self.best = min(self.best, ppl)
        for target, reached in self.reached_at.items():
            if reached is None and ppl <= target:
                self.reached_at[target] = self.clock.total
        self.clock.resume()
        return all(self.reached_at.values()) or self.clock.total > self.cap


@dataclass
class Outcome:
    method: str
    seconds_to_target: dict[float, float | None]
    best_perplexity: float
    tokens: int
    tokens_per_second: float


def _outcome(name: str, watcher: TargetWatcher, clock: Clock) -> Outcome:
    seconds = watcher.train_seconds or clock.read()
    return Outcome(name, dict(watcher.reached_at), watcher.best, watcher.tokens, watcher.tokens / max(seconds, 1e-9))


def quiet_config(args, out: str, max_steps: int, **changes) -> gh.TrainingConfig:
    """gpt_helpers' settings for a timed run: the benchmark's batch, rate and seed; nothing evaluated or saved."""
    return gh.TrainingConfig(
        output_dir=out,
        max_steps=max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_every=10**9,
        progress=False,
        plot=False,
        save_best=False,
        save_final=False,
        seed=args.seed,
        **changes,
    )


def run_gpt_helpers(texts, eval_data, args) -> Outcome:
    clock = Clock()
    model, tokenizer = gh.load_model(args.model)
    cleaned, _ = gh.clean_texts(texts)
    train_data, _ = gh.prepare_dataset(tokenizer, cleaned, block_size=args.block_size)
    watcher = TargetWatcher(clock, eval_data, args.targets, args.eval_tokens, args.cap)
    tokens_per_step = args.batch_size * (args.block_size - 1)

    class Stop:
        def on_step_end(self, state):
            if watcher.after_step(state.model, tokens_per_step):
                state.stop_requested = True

    with tempfile.TemporaryDirectory() as out:
        config = quiet_config(args, out, args.max_steps)
        gh.train(model, tokenizer, train_data, None, config, callbacks=[Stop()])
    return _outcome("gpt_helpers", watcher, clock)


def run_seed_loop(texts, eval_data, args) -> Outcome:
    clock = Clock()
    model, tokenizer = gh.load_model(args.model)
    encoded = [tokenizer.encode(text, return_tensors="pt")[:, : args.block_size] for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    watcher = TargetWatcher(clock, eval_data, args.targets, args.eval_tokens, args.cap)
    model.train()
    stop = False
    while not stop:
        for ids in encoded:
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            _ = loss.item()  # the seed prints the loss every step
            if watcher.after_step(model, ids.shape[1] - 1):
                stop = True
                break
    return _outcome("seed loop (one text per step, lr 5e-5)", watcher, clock)


def _trainer_setup(texts, args, tokenizer):
    import datasets

    raw = datasets.Dataset.from_dict({"text": list(texts)})
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // args.block_size) * args.block_size
        return {
            k: [v[i : i + args.block_size] for i in range(0, total, args.block_size)] for k, v in concatenated.items()
        }

    return tokenized.map(group_texts, batched=True)


def run_trainer(texts, eval_data, args, *, shared: bool = False) -> Outcome:
    """The Trainer as its causal-LM guide sets it up (its default batch 8, learning rate 5e-5, linear schedule), or
    with ``shared`` the settings gpt_helpers runs with (the same packed blocks, batch, peak rate, warmup, cosine
    decay to 0.1 × the peak, weight decay and schedule length), so the ratio measures the library, not the advice."""
    clock = Clock()
    model, tokenizer = gh.load_model(args.model)
    collator = transformers.DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    if shared:
        cleaned, _ = gh.clean_texts(texts)
        train_data, _ = gh.prepare_dataset(tokenizer, cleaned, block_size=args.block_size)
        blocks = datasets_from_blocks(train_data)
    else:
        blocks = _trainer_setup(texts, args, tokenizer)
    watcher = TargetWatcher(clock, eval_data, args.targets, args.eval_tokens, args.cap)
    defaults = gh.TrainingConfig()
    batch = args.batch_size if shared else 8  # 8: TrainingArguments' default per-device batch size

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, arguments, state, control, model=None, **kwargs):
            if watcher.after_step(model, batch * (args.block_size - 1)):
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        options = dict(
            output_dir=out,
            max_steps=10**6,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="no",
            seed=args.seed,
            use_cpu=True,
        )
        if shared:
            options.update(
                max_steps=args.max_steps,
                per_device_train_batch_size=batch,
                learning_rate=args.lr,
                warmup_steps=defaults.warmup_steps,
                lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr_rate": defaults.min_lr_ratio},
                weight_decay=defaults.weight_decay,
                max_grad_norm=defaults.max_grad_norm,
            )
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(**options),
            train_dataset=blocks,
            data_collator=collator,
            callbacks=[Watch()],
        )
        trainer.train()
    name = "transformers.Trainer (gpt_helpers' settings)" if shared else "transformers.Trainer (guide defaults)"
    return _outcome(name, watcher, clock)


def run_trainer_shared(texts, eval_data, args) -> Outcome:
    return run_trainer(texts, eval_data, args, shared=True)


def equal_work_tokens_per_second(texts, args) -> tuple[float, float]:
    """Tokens/s of gpt_helpers and of the Trainer on the same blocks, batch size, learning rate and step count.

    Each is timed around its own ``train()`` call (set-up included for both); data preparation is done before.
    """
    model, tokenizer = gh.load_model(args.model)
    cleaned, _ = gh.clean_texts(texts)
    train_data, _ = gh.prepare_dataset(tokenizer, cleaned, block_size=args.block_size)
    tokens = args.equal_work_steps * args.batch_size * args.block_size
    with tempfile.TemporaryDirectory() as out:
        config = quiet_config(args, out, args.equal_work_steps, log_every=10**9)
        started = time.perf_counter()
        gh.train(model, tokenizer, train_data, None, config)
        helpers = tokens / (time.perf_counter() - started)

    model, tokenizer = gh.load_model(args.model)
    blocks = datasets_from_blocks(train_data)
    collator = transformers.DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    with tempfile.TemporaryDirectory() as out:
        options = dict(
            output_dir=out,
            max_steps=args.equal_work_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="no",
            seed=args.seed,
            use_cpu=True,
        )
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**options), train_dataset=blocks, data_collator=collator
        )
        started = time.perf_counter()
        trainer.train()
        reference = tokens / (time.perf_counter() - started)
    return helpers, reference


def datasets_from_blocks(train_data):
    """The very blocks gpt_helpers trains on, as a ``datasets.Dataset`` for the Trainer."""
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": train_data.input_ids.tolist(), "attention_mask": train_data.attention_mask.tolist()}
    )


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-gpt2-base")
    parser.add_argument(
        "--target-ratios",
        default="0.75,0.5,0.4",
        help="targets as fractions of the zero-shot validation perplexity [0.75,0.5,0.4]",
    )
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="gpt_helpers' batch [8]; see RESULTS.md for the sweep"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="gpt_helpers' peak learning rate [1e-3]")
    parser.add_argument("--max-steps", type=int, default=400, help="schedule length for gpt_helpers")
    parser.add_argument("--equal-work-steps", type=int, default=60)
    parser.add_argument("--eval-tokens", type=int, default=10_000, help="training tokens between scorings")
    parser.add_argument("--cap", type=float, default=240.0, help="seconds a method may train before giving up")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    texts = gh.load_course_dataset("drug_reviews", "train")
    model, tokenizer = gh.load_model(args.model)
    validation, _ = gh.clean_texts(gh.load_course_dataset("drug_reviews", "validation"))
    eval_data, _ = gh.prepare_dataset(tokenizer, validation, block_size=args.block_size)
    zero_shot = gh.evaluate(model, eval_data).perplexity
    args.targets = sorted((round(zero_shot * float(r), 1) for r in args.target_ratios.split(",")), reverse=True)
    print(
        f"Data: {len(texts)} raw drug reviews from {course_data_dir().name}/; zero-shot validation perplexity "
        f"{zero_shot:.1f}; targets {args.targets}"
    )

    runs: dict[str, list[Outcome]] = {}
    for repeat in range(args.repeats):
        for runner in (run_gpt_helpers, run_trainer_shared, run_trainer, run_seed_loop):
            outcome = runner(texts, eval_data, args)
            runs.setdefault(outcome.method, []).append(outcome)
            reached = ", ".join(f"{t}: {_seconds(v)}" for t, v in outcome.seconds_to_target.items())
            print(
                f"  run {repeat + 1}: {outcome.method}: {reached} "
                f"(best ppl {outcome.best_perplexity:.1f}, {outcome.tokens_per_second:,.0f} tokens/s)",
                flush=True,
            )
    equal = [equal_work_tokens_per_second(texts, args) for _ in range(args.repeats)]

    def median_seconds(outcomes: list[Outcome], target: float) -> float | None:
        """The median time, counting a run that missed the target as slower than any that reached it."""
        times = [o.seconds_to_target[target] for o in outcomes]
        median = statistics.median(math.inf if t is None else t for t in times)
        return None if math.isinf(median) else median

    ours = {t: median_seconds(runs["gpt_helpers"], t) for t in args.targets}
    header = " | ".join(f"to ppl {t} (s) | gpt_helpers faster by" for t in args.targets)
    lines = [
        f"Time to validation perplexity on drug reviews (zero-shot {zero_shot:.1f}; targets = "
        f"{args.target_ratios} × zero-shot), bundled base, CPU, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} run(s), "
        f"cap {args.cap:.0f} s",
        "",
        f"| method | {header} | tokens/s | best ppl |",
        "| --- | " + " | ".join("---: | ---:" for _ in args.targets) + " | ---: | ---: |",
    ]
    summary = {}
    for method, outcomes in runs.items():
        cells = []
        for target in args.targets:
            theirs = median_seconds(outcomes, target)
            if ours[target] is None:
                ratio = "—"
            elif theirs is None:
                ratio = f"≥ {args.cap / ours[target]:.1f}×"
            else:
                ratio = f"{theirs / ours[target]:.2f}×"
            cells.append(f"{_seconds(theirs)} | {ratio}")
        speed = statistics.median(o.tokens_per_second for o in outcomes)
        best = min(o.best_perplexity for o in outcomes)
        lines.append(f"| {method} | {' | '.join(cells)} | {speed:,.0f} | {best:.1f} |")
        summary[method] = {
            "median_seconds": {str(t): median_seconds(outcomes, t) for t in args.targets},
            "tokens_per_second": speed,
            "best_perplexity": best,
            "runs": [asdict(o) for o in outcomes],
        }
    helpers_speed = statistics.median(e[0] for e in equal)
    trainer_speed = statistics.median(e[1] for e in equal)
    lines += [
        "",
        f"Equal work ({args.equal_work_steps} steps × {args.batch_size} blocks × {args.block_size} tokens, lr {args.lr}): "
        f"gpt_helpers {helpers_speed:,.0f} tokens/s, Trainer {trainer_speed:,.0f} tokens/s, "
        f"ratio {helpers_speed / trainer_speed:.2f}× (medians of {len(equal)})",
    ]
    summary["equal_work"] = {
        "gpt_helpers_tokens_per_second": [e[0] for e in equal],
        "trainer_tokens_per_second": [e[1] for e in equal],
    }
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_to_quality.md").write_text(report + "\n", encoding="utf-8")
    (out / "time_to_quality.json").write_text(
        json.dumps({"args": vars(args), "zero_shot": zero_shot, **summary}, indent=1)
    )


if __name__ == "__main__":
    main()
