"""The real model on CPU: gpt_helpers against transformers.Trainer, TRL's SFTTrainer and a bare PyTorch loop.

Part 1, equal work: SmolLM2-135M-Instruct on the same packed drug-review blocks (``--batch`` × 128 tokens a step,
lr 1e-3), LoRA (r 16, alpha 32, q/k/v/o, no dropout) and full fine-tuning, ``--steps`` steps. Each method runs in
its own process, so its peak resident memory is its own: gpt_helpers with its defaults; the Trainer (+ peft) and
TRL's SFTTrainer (packing on) with their documented defaults (Trainer fp32; SFTConfig bf16 and activation
checkpointing) and again "tuned" (bf16 only on a CPU with bf16 instructions, TRL without activation checkpointing;
``--compile`` adds torch.compile); a bare loop with the same math as gpt_helpers' default (bf16 autocast where the
CPU has bf16 instructions, fused AdamW, the model's own loss): the floor a library cannot beat without changing
the math. Tokens/s counts the steps after the first two (warm-up, kernel selection); medians of ``--repeats``.

Part 2, the hardware limit: this CPU's peak matmul FLOP/s in fp32 and bf16 (large square matmuls), and each
setup's achieved model FLOP/s as a fraction of it. Training FLOPs per token: full 6N + 12·L·d·T (nanoGPT's
estimate: forward 2N + attention, backward twice the forward); LoRA 4N + 8·L·d·T (the backward computes only the
activations' gradients through the frozen weights; the adapters' own FLOPs are < 1 %).

Part 3, time to quality: raw drug reviews → validation perplexity ``--target`` × zero-shot, LoRA. Every method
gets the same settings (batch ``--batch``, lr 1e-3, LoRA r 16/alpha 32, warmup 5, cosine over ``--ttq-steps``), so
the ratio measures the library; then the Trainer and TRL with their guides' defaults (lr 5e-5 and 2e-5, linear, no
warmup) as a learner following each guide would run them. Wall time counts data preparation and training; the
scoring (the same evaluation for all) is excluded.

    python benchmarks/real_model.py --repeats 3              # all parts, an hour or more on 2 cores; idle machine
    python benchmarks/real_model.py --parts time-to-quality --batch 4 --target 0.8 --ttq-steps 30 \
        --score-every 3 --score-batches 2 --cap 150      # the time-to-quality run of RESULTS.md (about 30 minutes)
    python benchmarks/real_model.py --parts equal-work --steps 6 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gpt_helpers as gh

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("gpt_helpers", "bare loop", "Trainer default", "Trainer tuned", "TRL default", "TRL tuned")
logging.getLogger("transformers").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------ shared set-up
def blocks(tokenizer, split: str = "train", block_size: int = 128):
    texts, _ = gh.clean_texts(gh.load_course_dataset("drug_reviews", split))
    return gh.prepare_dataset(tokenizer, texts, block_size=block_size)[0]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (the "tuned" rows use bf16 only then)."""
    return bool(gh.precision.cpu_bf16_instructions())


def as_hf_dataset(data):
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": data.input_ids.tolist(), "attention_mask": data.attention_mask.tolist()}
    )


def peft_model(model, seed: int = 0):
    """The same adapters as ``gh.strategies.apply_lora`` (rank, alpha, targets, dropout, seeded init)."""
    from gpt_helpers.strategies import apply_lora

    return apply_lora(
        model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=TARGETS, seed=seed
    )


class StepTimes:
    """Timestamps of each optimizer step, from a callback of whichever trainer runs."""

    def __init__(self) -> None:
        self.times = [time.perf_counter()]

    def mark(self) -> None:
        self.times.append(time.perf_counter())

    def steady_tokens_per_second(self, tokens_per_step: int, skip: int = 2) -> float:
        steps = len(self.times) - 1 - skip
        return steps * tokens_per_step / (self.times[-1] - self.times[skip])


def hf_callback(times: StepTimes):
    import transformers

    class Mark(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.mark()

    return Mark()


def run_method(
    method: str, mode: str, steps: int, compile_model: bool, lr: float, batch: int = 8, seed: int = 0
) -> dict:
    """One equal-work run; returns its steady tokens/s and the precision it used."""
    import transformers

    model, tokenizer = gh.load_model(MODEL)
    data = blocks(tokenizer)
    if mode == "lora":
        model = peft_model(model, seed)
    tokens = batch * 128
    times = StepTimes()
    bf16 = cpu_has_bf16()
    with tempfile.TemporaryDirectory() as out:
        if method == "gpt_helpers":

            class Mark:
                def on_step_end(self, state):
                    times.mark()

            config = gh.TrainingConfig(
                output_dir=out,
                max_steps=steps,
                batch_size=batch,
                learning_rate=lr,
                warmup_steps=0,
                progress=False,
                plot=False,
                save_best=False,
                save_final=False,
                seed=seed,
                log_every=10**6,
                compile=True if compile_model else None,
            )
            result = gh.train(model, tokenizer, data, None, config, callbacks=[Mark()])
            precision = result.history.info["precision"]
        elif method == "bare loop":
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],
                lr=lr,
                betas=(0.9, 0.95),
                weight_decay=0.01,
                fused=True,
            )
            forward = torch.compile(model) if compile_model else model
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
            model.train()
            for step in range(steps):
                ids = data.input_ids[order[step * batch : (step + 1) * batch]]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = forward(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.mark()
            precision = "bf16" if bf16 else "fp32"
        else:
            tuned = method.endswith("tuned")
            common = dict(
                output_dir=out,
                max_steps=steps,
                per_device_train_batch_size=batch,
                learning_rate=lr,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                logging_strategy="no",
                seed=seed,
                use_cpu=True,
            )
            if method.startswith("Trainer"):
                if tuned:
                    common.update(bf16=bf16, torch_compile=compile_model)
                trainer = transformers.Trainer(
                    model=model,
                    args=transformers.TrainingArguments(**common),
                    train_dataset=as_hf_dataset(data),
                    data_collator=transformers.DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False),
                    callbacks=[hf_callback(times)],
                )
                precision = "bf16" if common.get("bf16") else "fp32"
            else:
                from trl import SFTConfig, SFTTrainer

                common.update(packing=True, max_length=128, bf16=bf16 if tuned else True)  # SFTConfig: bf16 by default
                if tuned:  # SFTConfig checkpoints activations by default: memory for time, which a CPU run need not pay
                    common.update(torch_compile=compile_model, gradient_checkpointing=False)
                trainer = SFTTrainer(
                    model=model,
                    args=SFTConfig(**common),
                    train_dataset=as_hf_dataset(data),
                    processing_class=tokenizer,
                    callbacks=[hf_callback(times)],
                )
                precision = "bf16" if common["bf16"] else "fp32"
            times.times = [time.perf_counter()]
            trainer.train()
    return {
        "tokens_per_second": times.steady_tokens_per_second(tokens),
        "precision": precision,
        "steps": len(times.times) - 1,
    }


def measure_in_subprocess(method: str, mode: str, args) -> dict:
    """Run one method in a fresh process, which reports its tokens/s and its own peak resident memory."""
    command = [sys.executable, __file__, "--worker", method, mode, "--steps", str(args.steps), "--lr", str(args.lr)]
    command += ["--batch", str(args.batch)]
    if args.compile:
        command.append("--compile")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"{method} / {mode} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def equal_work(args) -> list[dict]:
    rows = []
    for mode in args.modes:
        for method in args.methods:
            if method == "Trainer tuned" and not (cpu_has_bf16() or args.compile):
                print(
                    f"skipped {mode} / Trainer tuned: without bf16 units or --compile it is Trainer default", flush=True
                )
                continue
            runs = [measure_in_subprocess(method, mode, args) for _ in range(args.repeats)]
            row = {
                "mode": mode,
                "method": method,
                "precision": runs[0]["precision"],
                "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
                "runs": [round(r["tokens_per_second"], 1) for r in runs],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------ the hardware limit
def peak_matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def training_flops_per_token(mode: str, seq: int = 128) -> float:
    model, _ = gh.load_model(MODEL)
    facts = gh.architecture(model)
    n = facts.parameters - facts.vocab_size * facts.hidden_size * (0 if facts.tied_embeddings else 1)
    attention = facts.layers * facts.hidden_size * seq
    return 6 * n + 12 * attention if mode == "full" else 4 * n + 8 * attention


# ------------------------------------------------------------------------------------------ time to quality
def time_to_quality(method: str, settings: str, args, target: float, cap: float) -> float | None:
    """Seconds (data preparation + training) until validation perplexity ≤ target, or None within ``cap``."""
    import transformers

    started = time.perf_counter()
    excluded = 0.0
    model, tokenizer = gh.load_model(MODEL)
    data = blocks(tokenizer)
    validation = blocks(tokenizer, "validation")
    model = peft_model(model)
    reached: dict[str, float | None] = {"at": None}
    guide = settings == "guide"
    lr = {"Trainer": 5e-5, "TRL": 2e-5}.get(method.split()[0], 1e-3) if guide else 1e-3
    every = args.score_every

    def score(current, step: int) -> bool:
        nonlocal excluded
        if step % every:
            return time.perf_counter() - started - excluded > cap
        pause = time.perf_counter()
        perplexity = gh.evaluate(current, validation, batch_size=16, max_batches=args.score_batches).perplexity
        excluded += time.perf_counter() - pause
        if perplexity <= target and reached["at"] is None:
            reached["at"] = time.perf_counter() - started - excluded
        return reached["at"] is not None or time.perf_counter() - started - excluded > cap

    with tempfile.TemporaryDirectory() as out:
        if method == "gpt_helpers":

            class Watch:
                def on_step_end(self, state):
                    state.stop_requested = state.stop_requested or score(state.model, state.step)

            config = gh.TrainingConfig(
                output_dir=out,
                max_steps=args.ttq_steps,
                batch_size=args.batch,
                learning_rate=lr,
                warmup_steps=5,
                progress=False,
                plot=False,
                save_best=False,
                save_final=False,
                log_every=10**6,
            )
            gh.train(model, tokenizer, data, None, config, callbacks=[Watch()])
        else:
            bf16 = cpu_has_bf16()

            class Watch(transformers.TrainerCallback):
                def on_step_end(self, a, state, control, model=None, **kwargs):
                    control.should_training_stop = score(model, state.global_step)

            common = dict(
                output_dir=out,
                max_steps=args.ttq_steps,
                per_device_train_batch_size=args.batch,
                learning_rate=lr,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                logging_strategy="no",
                use_cpu=True,
            )
            if not guide:
                common.update(warmup_steps=5, lr_scheduler_type="cosine", bf16=bf16)
            if method == "Trainer":
                trainer = transformers.Trainer(
                    model=model,
                    args=transformers.TrainingArguments(**common),
                    train_dataset=as_hf_dataset(data),
                    data_collator=transformers.DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False),
                    callbacks=[Watch()],
                )
            else:
                from trl import SFTConfig, SFTTrainer

                common.update(packing=True, max_length=128)
                trainer = SFTTrainer(
                    model=model,
                    args=SFTConfig(**common),
                    train_dataset=as_hf_dataset(data),
                    processing_class=tokenizer,
                    callbacks=[Watch()],
                )
            trainer.train()
    return reached["at"]


# ------------------------------------------------------------------------------------------ report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="*", default=["equal-work", "limit", "time-to-quality"])
    parser.add_argument("--steps", type=int, default=8, help="equal-work steps per run [8]")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8, help="blocks of 128 tokens per step, both parts [8]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="equal-work methods [all]")
    parser.add_argument("--modes", nargs="*", default=["lora", "full"], help="equal-work modes [lora full]")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the tuned and gpt_helpers rows")
    parser.add_argument("--target", type=float, default=0.65, help="time-to-quality target × zero-shot [0.65]")
    parser.add_argument("--ttq-steps", type=int, default=100, help="schedule length for time to quality [100]")
    parser.add_argument("--score-every", type=int, default=5, help="steps between scorings [5]")
    parser.add_argument(
        "--score-batches", type=int, default=None, help="validation batches of 16 blocks per scoring [all]"
    )
    parser.add_argument("--cap", type=float, default=300.0, help="seconds a method may train to reach the target [300]")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker:
        import resource

        result = run_method(args.worker[0], args.worker[1], args.steps, args.compile, args.lr, args.batch)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    report: dict = {
        "machine": {
            "cpu": torch.cpu.get_capabilities().get("cpu_name", "?") if hasattr(torch.cpu, "get_capabilities") else "?",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "bf16_instructions": gh.precision.cpu_bf16_instructions(),
        }
    }
    if "equal-work" in args.parts:
        report["equal_work"] = equal_work(args)
    if "limit" in args.parts:
        peaks = {"fp32": peak_matmul_flops(torch.float32), "bf16": peak_matmul_flops(torch.bfloat16)}
        report["peak_flops"] = peaks
        for row in report.get("equal_work", []):
            achieved = row["tokens_per_second"] * training_flops_per_token(row["mode"])
            row["model_flops"] = achieved
            row["fraction_of_peak"] = achieved / peaks[row["precision"]]
        print(json.dumps({"peak_flops": peaks}), flush=True)
    if "time-to-quality" in args.parts:
        model, tokenizer = gh.load_model(MODEL)
        zero_shot = gh.evaluate(
            model, blocks(tokenizer, "validation"), batch_size=16, max_batches=args.score_batches
        ).perplexity
        target = round(args.target * zero_shot, 1)
        report["time_to_quality"] = {"zero_shot": zero_shot, "target": target, "cap": args.cap, "rows": []}
        plan = [
            ("gpt_helpers", "shared"),
            ("Trainer", "shared"),
            ("TRL", "shared"),
            ("Trainer", "guide"),
            ("TRL", "guide"),
        ]
        for method, settings in plan:
            repeats = args.repeats if settings == "shared" else 1
            seconds = [time_to_quality(method, settings, args, target, args.cap) for _ in range(repeats)]
            row = {
                "method": method,
                "settings": settings,
                "seconds": seconds,
                "median": statistics.median(math.inf if s is None else s for s in seconds),
            }
            report["time_to_quality"]["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/real_model.json").write_text(json.dumps(report, indent=1, default=str))
    print_tables(report)


def print_tables(report: dict) -> None:
    if "equal_work" in report:
        print(
            "\n| mode | method | precision | tokens/s (median) | runs | × gpt_helpers | peak RSS (MiB) | of peak FLOP/s |"
        )
        print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
        for row in report["equal_work"]:
            ours = next(
                (r for r in report["equal_work"] if r["mode"] == row["mode"] and r["method"] == "gpt_helpers"), None
            )
            versus = f"{row['tokens_per_second'] / ours['tokens_per_second']:.2f}" if ours else "-"
            fraction = f"{100 * row['fraction_of_peak']:.1f} %" if "fraction_of_peak" in row else "-"
            print(
                f"| {row['mode']} | {row['method']} | {row['precision']} | {row['tokens_per_second']:,.0f} | "
                f"{', '.join(f'{r:,.0f}' for r in row['runs'])} | {versus} | "
                f"{row['peak_rss_mib']:,.0f} | {fraction} |"
            )
    if "peak_flops" in report:
        print("\nPeak matmul: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in report["peak_flops"].items()))
    if "time_to_quality" in report:
        ttq = report["time_to_quality"]
        print(f"\nTime to validation perplexity {ttq['target']} (zero-shot {ttq['zero_shot']:.1f}):")
        ours = next(r["median"] for r in ttq["rows"] if r["method"] == "gpt_helpers")
        for row in ttq["rows"]:
            seconds = ", ".join("not reached" if s is None else f"{s:.0f} s" for s in row["seconds"])
            if math.isfinite(row["median"]):
                ratio = f"×{row['median'] / ours:.2f} gpt_helpers' time"
            else:
                ratio = f"≥ ×{ttq['cap'] / ours:.1f} gpt_helpers' time (not reached within the {ttq['cap']:.0f} s cap)"
            print(f"- {row['method']} ({row['settings']} settings): {seconds}; {ratio}")


if __name__ == "__main__":
    main()
