"""GPU throughput: GPT-2 124M (random init), sequence 1024, bf16 — gpt_helpers vs ``transformers.Trainer``, one run.

Model FLOPs utilisation follows nanoGPT's estimate: ``6·N + 12·L·H·Q·T`` FLOPs per token, N = parameters minus
position embeddings, against the H100 SXM dense bf16 peak of 989 TFLOP/s (``--peak-tflops`` for other cards).
Both paths train on the same random token blocks; each is timed over ``--steps`` steps after ``--warmup`` steps
(compilation and the first allocations excluded for both).

    python benchmarks/gpu_throughput.py --batch-size 16 --steps 30      # on one GPU, a few minutes
    python benchmarks/gpu_throughput.py --tiny --device cpu --steps 3   # a check of the script itself, on CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

import gpt_helpers as gh
from gpt_helpers.data import LMDataset
from gpt_helpers.models import build_model_from_config, gpt2_family_config, tiny_gpt2_config


def flops_per_token(model, seq_len: int) -> float:
    """nanoGPT's estimate: 6·N + 12·L·H·Q·T (N without position embeddings)."""
    config = model.config
    n = gh.count_parameters(model).total - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * seq_len


class StepTimer:
    """Times optimizer steps after a warm-up (with a device sync at both ends of the window)."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.steps, self.started, self.seconds = warmup, device, 0, None, None

    def tick(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self._sync()
            self.started = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        self.seconds = time.perf_counter() - self.started
        return self.seconds

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build(args):
    config = (
        tiny_gpt2_config(vocab_size=512, n_positions=args.seq_len, n_embd=64, n_layer=2)
        if args.tiny
        else gpt2_family_config("gpt2")
    )
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(
        0, config.vocab_size, ((args.steps + args.warmup) * args.batch_size, args.seq_len), generator=generator
    )
    return config, LMDataset(blocks)


def run_gpt_helpers(args, config, data) -> tuple[float, dict]:
    model = build_model_from_config(config, seed=0)
    timer = StepTimer(args.warmup, args.device)

    class Tick:
        def on_step_end(self, state):
            timer.tick()

    with tempfile.TemporaryDirectory() as out:
        training = gh.TrainingConfig(
            output_dir=out,
            max_steps=args.steps + args.warmup,
            batch_size=args.batch_size,
            learning_rate=6e-4,
            warmup_steps=10,
            eval_every=10**9,
            log_every=10**9,
            progress=False,
            plot=False,
            save_best=False,
            save_final=False,
            precision=args.precision,
            device=args.device,
        )
        result = gh.train(model, None, data, None, training, callbacks=[Tick()])
    seconds = timer.stop()
    return args.steps * args.batch_size * args.seq_len / seconds, result.history.info


def run_trainer(args, config, data) -> float:
    model = build_model_from_config(config, seed=0)
    timer = StepTimer(args.warmup, args.device)

    class Tick(transformers.TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            timer.tick()

    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": data.input_ids.tolist(), "labels": data.input_ids.tolist()})
    with tempfile.TemporaryDirectory() as out:
        arguments = transformers.TrainingArguments(
            output_dir=out,
            max_steps=args.steps + args.warmup,
            per_device_train_batch_size=args.batch_size,
            learning_rate=6e-4,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
        )
        transformers.Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[Tick()]).train()
    seconds = timer.stop()
    return args.steps * args.batch_size * args.seq_len / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the card (H100 SXM bf16: 989)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, to check the script on a CPU")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len = min(args.seq_len, 64)
    config, data = build(args)
    per_token = flops_per_token(build_model_from_config(config), args.seq_len)
    ours, info = run_gpt_helpers(args, config, data)
    reference = run_trainer(args, config, data)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, transformers {transformers.__version__}; batch {args.batch_size} × "
        f"{args.seq_len}, {args.precision}; {per_token / 1e9:.3f} GFLOP/token"
    )
    print(
        f"gpt_helpers (compile={info['compile']}, fused AdamW={info['fused_adamw']}, "
        f"vocabulary padded to {info['padded_vocabulary'] or config.vocab_size}): {ours:,.0f} tokens/s, "
        f"MFU {100 * ours * per_token / (args.peak_tflops * 1e12):.1f}%"
    )
    print(
        f"transformers.Trainer ({args.precision}=True):              {reference:,.0f} tokens/s, "
        f"MFU {100 * reference * per_token / (args.peak_tflops * 1e12):.1f}%"
    )
    print(f"ratio: {ours / reference:.2f}×")


if __name__ == "__main__":
    main()
