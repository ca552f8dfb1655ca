"""The training loop, on HF Accelerate: one function, ``train``, that every lesson and the CLI call.

What happens in one optimizer step, in order (:meth:`_Loop.run` reads top to bottom):

1. take the next ``batch_size × gradient_accumulation_steps × processes`` examples of this epoch's shuffled order;
2. count the real (non-padding) target tokens of the whole step, so the loss is a mean *per token*,
   whatever the accumulation or the number of processes;
3. forward and backward each micro-batch (gradients add up; DDP syncs only on the last one);
4. refuse a non-finite loss or gradient before it reaches the weights; clip; step AdamW and the schedule;
5. when due: log the loss window, evaluate (keep the best model, maybe stop early), write a checkpoint.

A run killed at any moment resumes from its newest intact checkpoint (``resume=True``) and continues the same run:
same data order, schedule, optimizer moments and random state. Ctrl-C (a notebook's interrupt) and the panel's
Stop end the run at the next step boundary with a checkpoint and the history written.

Callbacks are any objects with some of these methods: ``on_train_begin(state)``, ``on_step_end(state)``,
``on_log(state, history)``, ``on_train_end(state, history)``; ``state.stop_requested = True`` ends the run cleanly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed

from . import checkpoints, resume
from .config import TrainingConfig
from .data import document_attention
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .evaluation import EvalResult, count_targets, evaluate, perplexity, target_losses
from .fused_loss import decoder_of, linear_cross_entropy, supports_fused_loss
from .history import History
from .models import count_parameters
from .precision import PrecisionChoice, choose_precision, measured_bf16_speedup
from .vocab_padding import pad_vocabulary

logger = logging.getLogger(__name__)

#: Examples in the bf16 probe step (fewer if the batch or the data is smaller).
PROBE_EXAMPLES = 4
#: ``compile=None`` compiles on CUDA only for runs of at least this many steps (compiling takes a minute or so).
COMPILE_MIN_STEPS = 1000


@dataclass
class TrainState:
    """Where the run is: everything needed, with the checkpointed tensors, to resume exactly."""

    step: int = 0
    epoch: int = 0
    sample_offset: int = 0
    tokens_seen: int = 0
    best_eval_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0
    micro_batch_size: int = 0
    accumulation_steps: int = 0
    elapsed_seconds: float = 0.0
    stop_requested: bool = False
    stop_reason: str | None = None
    skipped_nonfinite_steps: int = 0
    model: Any = field(default=None, repr=False)

    SAVED = (
        "step",
        "epoch",
        "sample_offset",
        "tokens_seen",
        "best_eval_loss",
        "best_step",
        "evals_without_improvement",
        "micro_batch_size",
        "accumulation_steps",
        "elapsed_seconds",
        "skipped_nonfinite_steps",
    )

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.SAVED}


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model, its history and where things were written."""

    model: Any
    history: History
    output_dir: Path
    best_dir: Path | None
    model_dir: Path | None
    last_checkpoint: Path | None
    stop_reason: str
    final_eval: EvalResult | None

    def __str__(self) -> str:
        lines = [f"Training stopped: {self.stop_reason}.", self.history.summary_line()]
        if self.final_eval:
            lines.append(f"Final validation: {self.final_eval}")
        lines.append(f"History: {self.output_dir / 'history.json'}")
        for label, folder in (
            ("Best model", self.best_dir),
            ("Final model", self.model_dir),
            ("Checkpoint", self.last_checkpoint),
        ):
            if folder:
                lines.append(f"{label}: {folder}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Due:
    """What the loop does after a step besides training: log, evaluate, checkpoint; ``final`` on the last step."""

    log: bool
    eval: bool
    checkpoint: bool
    final: bool


def due_after(step: int, config: TrainingConfig, *, final: bool, can_eval: bool) -> Due:
    """What is due after ``step`` steps.

    A checkpoint step is also a log step: the loss window is flushed into the saved state, so a resumed run logs
    exactly what the uninterrupted run logs.

    >>> due_after(10, TrainingConfig(log_every=10, eval_every=50), final=False, can_eval=True)
    Due(log=True, eval=False, checkpoint=False, final=False)
    """
    checkpoint = bool(config.save_every) and step % config.save_every == 0 and not final
    return Due(
        log=step % config.log_every == 0 or final or checkpoint,
        eval=can_eval and (step % config.eval_every == 0 or final),
        checkpoint=checkpoint,
        final=final,
    )


class LossWindow:
    """The training loss and tokens since the last log line, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.tokens += tokens
        self.steps += 1

    def flush(self) -> tuple[float, int, float]:
        """``(mean step loss, tokens, tokens per second)`` of the window, which starts again empty."""
        mean = float(self.loss) / self.steps if self.steps else math.nan
        tokens = int(self.tokens)
        speed = tokens / max(time.perf_counter() - self.started, 1e-9)
        self.loss.zero_(), self.tokens.zero_()
        self.steps = 0
        self.restart_clock()
        return mean, tokens, speed

    def restart_clock(self) -> None:
        """Evaluation and checkpoint time does not count against training speed."""
        self.started = time.perf_counter()


class Clock:
    """Seconds of training so far, across a resume (evaluation included, as the time budget counts it)."""

    def __init__(self) -> None:
        self.before = 0.0
        self.started = time.perf_counter()

    def restart(self, before: float = 0.0) -> None:
        self.before, self.started = before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started


def schedule(config: TrainingConfig, max_steps: int, clock: Clock):
    """The learning-rate factor of each step, for ``LambdaLR``: warmup, then decay by steps (or by time, with a
    time budget). A plain function, so the scheduler's saved state holds no object of ours."""

    def factor(step: int) -> float:
        progress = step / max_steps
        if config.max_time_seconds:
            progress = max(progress, clock.elapsed() / config.max_time_seconds)
        return lr_factor(progress, step, config)

    return factor


class Callbacks:
    """The user's callbacks; each implements any subset of the hooks."""

    def __init__(self, callbacks) -> None:
        self.callbacks = list(callbacks)

    def fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)


# ------------------------------------------------------------------------------------------- set-up helpers
#: ULMFiT's slanted triangular schedule: the rate rises for this fraction of the run, then falls, …
STLR_CUT = 0.1
#: … from 1/ratio of the peak to the peak and back (Howard & Ruder, 2018).
STLR_RATIO = 32


def lr_factor(progress: float, step: int, config: TrainingConfig) -> float:
    """Linear warmup for ``warmup_steps``, then cosine / linear decay to ``min_lr_ratio`` (or constant); or ULMFiT's
    slanted triangular schedule (``"slanted_triangular"``: a short linear rise over the first 10% of the run, a long
    linear fall, from and to 1/32 of the peak; it has its own warmup).

    >>> config = TrainingConfig(lr_schedule="slanted_triangular")
    >>> [round(lr_factor(p, 0, config), 3) for p in (0.0, 0.1, 0.55, 1.0)]
    [0.031, 1.0, 0.516, 0.031]
    """
    if config.lr_schedule == "slanted_triangular":
        progress = min(max(progress, 0.0), 1.0)
        p = progress / STLR_CUT if progress < STLR_CUT else 1 - (progress - STLR_CUT) / (1 - STLR_CUT)
        return (1 + p * (STLR_RATIO - 1)) / STLR_RATIO
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def default_param_groups(model: torch.nn.Module, config: TrainingConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases and norm weights), every parameter included once.

    Frozen parameters stay in the optimizer so a strategy can unfreeze them mid-run; AdamW skips them
    while they have no gradient.
    """
    parameters = list(model.parameters())  # shared (tied) parameters come once
    return [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_accelerator(config: TrainingConfig, precision: str) -> Accelerator:
    """An Accelerator for the requested device and precision (it also handles multi-process launches)."""
    # Accelerate keeps one process-wide state; a notebook that trains twice with other settings needs it fresh.
    # A multi-process group (PartialState) is kept; a single-process one is re-read from the environment.
    single_process = PartialState._shared_state.get("num_processes", 1) == 1
    AcceleratorState._reset_state(reset_partial_state=single_process)
    GradientState._reset_state()
    trackers = {}
    if config.report_to:
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError(
                "report_to='tensorboard' needs the tensorboard package: pip install tensorboard "
                "(then: tensorboard --logdir <output_dir>)."
            )
        trackers = dict(log_with=config.report_to, project_dir=config.output_dir)
    return Accelerator(
        cpu=training_device(config) == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision), **trackers
    )


def training_device(config: TrainingConfig) -> str:
    """The device type a run trains on: the one asked for, else CUDA, then MPS, then the CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible. Use device='auto' to fall back to the CPU.")
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but Apple's MPS backend is not available. Use device='auto'.")
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def _compile_choice(config: TrainingConfig, device_type: str, max_steps: int) -> tuple[bool, str]:
    if config.compile is not None:
        return config.compile, "set in the config"
    if device_type != "cuda":
        return False, f"not on {device_type} by default"
    long_enough = max_steps >= COMPILE_MIN_STEPS or (config.max_time_seconds or 0) >= 600
    return long_enough, (
        f"a CUDA run of {max_steps} steps {'repays' if long_enough else 'is too short to repay'} "
        f"compiling (from {COMPILE_MIN_STEPS} steps or 10 minutes)"
    )


def _fused_loss_choice(
    config: TrainingConfig, model, device_type: str, processes: int, padded: bool
) -> tuple[bool, str]:
    """Whether to compute the output layer and the loss chunk by chunk (:mod:`gpt_helpers.fused_loss`)."""
    possible = supports_fused_loss(model) and processes == 1 and not padded
    if config.fused_loss is not None:
        if config.fused_loss and not possible:
            raise ConfigError(
                "fused_loss=True needs one process, no vocabulary padding and a plain output layer "
                f"(no bias, no logit scaling); {type(model).__name__} here does not qualify."
            )
        return config.fused_loss, "set in the config"
    if not possible:
        return False, "not possible here (several processes, vocabulary padding or another output layer)"
    output = model.get_output_embeddings().weight
    if device_type != "cpu" or output.requires_grad or output.shape[0] < 16_384:
        return False, (
            "off by default: on CPU it pays for a large vocabulary whose output layer is frozen (LoRA); "
            "measured on SmolLM2, 35% less memory and 1.05× the speed there, 0.92× when the layer trains"
        )
    return True, "a large frozen output layer on CPU: 35% less memory, same speed (measured on SmolLM2-135M)"


def _largest_dropout(model: torch.nn.Module) -> float:
    """The largest dropout probability in the model (its modules, and the rate passed to attention kernels)."""
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.attention_dropout for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    return max(rates, default=0.0)


def _batch_of(dataset, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    if hasattr(dataset, "input_ids") and hasattr(dataset, "labels"):
        return {
            "input_ids": dataset.input_ids[indices],
            "attention_mask": dataset.attention_mask[indices],
            "labels": dataset.labels[indices],
        }
    batch = torch.utils.data.default_collate([dataset[int(i)] for i in indices])
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "labels" not in batch:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _model_name(model) -> str | None:
    """The model's hub or short name (a folder's own name, never a full path of this machine)."""
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return Path(name).name if os.path.isabs(name) else (name or None)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@contextlib.contextmanager
def _stop_on_interrupt(state: TrainState):
    """Ctrl-C (SIGINT, a notebook's interrupt) asks the loop to stop at the next step boundary; a second one
    interrupts at once. Only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        signal.signal(signal.SIGINT, previous)
        state.stop_requested = True
        state.stop_reason = (
            f"interrupted (Ctrl-C) after step {state.step}; a checkpoint was written: continue with "
            "resume=True (--resume) and the same settings"
        )
        logger.warning("Interrupted: stopping after this step (press Ctrl-C again to abort at once).")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is request_stop:
            signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------------ the loop
class _Loop:
    """The state and steps of one call to :func:`train`; :meth:`run` is the loop, the rest its named helpers."""

    def __init__(
        self,
        model,
        tokenizer,
        train_data,
        eval_data,
        config: TrainingConfig,
        param_groups: list[dict[str, Any]] | None,
        callbacks: list,
        accelerator: Accelerator | None,
    ):
        if len(train_data) == 0:
            raise DataError("The training dataset is empty. Check the data file and the cleaning report.")
        self.config, self.tokenizer, self.train_data, self.eval_data = config, tokenizer, train_data, eval_data
        self.callbacks = Callbacks(callbacks)
        self.out = Path(config.output_dir)
        self.raw_model = model
        self.clock = Clock()
        self.world = accelerator.num_processes if accelerator else int(os.environ.get("WORLD_SIZE", "1"))
        self.max_steps = self._max_steps()
        self.resume_from = self._find_checkpoint() if config.resume else None
        set_seed(config.seed)
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        device_type = accelerator.device.type if accelerator else training_device(config)
        self.precision = self._choose_precision(device_type, accelerator)
        self.accelerator = accelerator or make_accelerator(config, self.precision.precision)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.max_steps = self._max_steps()
        self.vocabulary = pad_vocabulary(
            model, config.pad_vocab_to_multiple_of, device_type, custom_groups=param_groups is not None
        )
        groups = param_groups or default_param_groups(model, config)
        for group in groups:
            group.setdefault("lr", config.learning_rate)
        fused = config.fused_adamw if config.fused_adamw is not None else device_type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(
            groups,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
            fused=fused or None,
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(config, self.max_steps, self.clock))
        use_compile, compile_reason = _compile_choice(config, device_type, self.max_steps)
        self.fused, fused_reason = _fused_loss_choice(config, model, device_type, self.world, self.vocabulary.active)
        self.output_weight = model.get_output_embeddings().weight if self.fused else None
        self.eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if config.document_attention and self.eos_id is None:
            raise ConfigError(
                "document_attention=True finds documents by their EOS token: pass the tokenizer to train()."
            )
        forward = decoder_of(model) if self.fused else self.model
        self.forward_model = torch.compile(forward) if use_compile else forward
        self.state = TrainState(
            micro_batch_size=config.batch_size, accumulation_steps=config.gradient_accumulation_steps, model=model
        )
        self.history = History()
        self.identity = {**resume.run_identity(model, train_data, _model_name(model)), "processes": self.world}
        self.last_eval: EvalResult | None = None
        self.last_checkpoint: Path | None = None
        self.step_lr = config.learning_rate
        counts = count_parameters(model)
        self.history.info = {
            "device": str(self.accelerator.device),
            "precision": self.precision.precision,
            "precision_reason": self.precision.reason,
            "processes": self.world,
            "compile": bool(use_compile),
            "compile_reason": compile_reason,
            "fused_adamw": bool(fused),
            "dropout": _largest_dropout(model),
            "fused_loss": self.fused,
            "fused_loss_reason": fused_reason,
            "padded_vocabulary": self.vocabulary.size if self.vocabulary.active else None,
            "parameters": counts.total,
            "trainable_parameters": counts.trainable,
            "max_steps": self.max_steps,
            "train_examples": len(train_data),
            "global_batch_size": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "config": config.to_dict(),
            "base_model": _model_name(model),
        }

    # ---------------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        state, config = self.state, self.config
        self._begin()
        self.callbacks.fire("on_train_begin", state)
        bar = _progress_bar(config, self.max_steps, state.step, self.accelerator.is_main_process)
        window = LossWindow(self.accelerator.device)
        self.model.train()
        while state.step < self.max_steps and not state.stop_requested:
            loss, tokens, skipped = self._step()
            if not skipped:  # a skipped step trained on nothing: its NaN must not hide the window's real loss
                window.add(loss, tokens)
            self.callbacks.fire("on_step_end", state)
            self._check_time_budget()
            due = due_after(
                state.step,
                config,
                final=state.step >= self.max_steps or state.stop_requested,
                can_eval=self.eval_data is not None,
            )
            if due.log:
                self._log_training(window, bar)
            if due.eval:
                self._evaluate_and_keep_best()
                window.restart_clock()
            if due.log or due.eval:
                self.callbacks.fire("on_log", state, self.history)
            if due.checkpoint:
                self.save_checkpoint()
                window.restart_clock()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        state.stop_reason = state.stop_reason or (
            "stopped on request" if state.stop_requested else f"reached {self.max_steps} steps"
        )
        if config.save_every or config.resume or state.stop_requested:
            self.save_checkpoint()  # a stopped or interrupted run can always be continued
        return self._finish()

    # ---------------------------------------------------------------------------------------- one step
    @property
    def global_batch(self) -> int:
        return self.state.micro_batch_size * self.state.accumulation_steps * self.world

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_data) // (self.config.effective_batch_size * self.world)

    def _max_steps(self) -> int:
        config = self.config
        if self.steps_per_epoch == 0:
            raise DataError(
                f"The training data has {len(self.train_data)} examples, fewer than one step's batch of "
                f"{config.effective_batch_size * self.world} (batch_size × gradient_accumulation_steps × processes). "
                "Lower batch_size, or add data."
            )
        limits = [config.max_steps] if config.max_steps else []
        if config.epochs:
            limits.append(max(1, math.ceil(config.epochs * self.steps_per_epoch)))
        return min(limits)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=generator)

    def _next_step_indices(self) -> torch.Tensor:
        """The global examples of the next step (an epoch's tail shorter than one step is skipped)."""
        size = self.global_batch
        if self.state.sample_offset + size > len(self.train_data):
            self.state.epoch += 1
            self.state.sample_offset = 0
        order = self._epoch_order(self.state.epoch)
        return order[self.state.sample_offset : self.state.sample_offset + size]

    @property
    def epoch_progress(self) -> float:
        """Epochs done, counting an epoch as the examples it trains on (its dropped tail excluded)."""
        per_epoch = self.steps_per_epoch * self.config.effective_batch_size * self.world
        return self.state.epoch + self.state.sample_offset / per_epoch

    def _micro_batches(self, step_indices: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        share = step_indices.chunk(self.world)[self.rank]
        device = self.accelerator.device
        return [
            {k: v.to(device, non_blocking=True) for k, v in _batch_of(self.train_data, part).items()}
            for part in share.split(self.state.micro_batch_size)
        ]

    def _forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = sum(count_targets(b["labels"]) for b in micro_batches)
        global_tokens = self.accelerator.reduce(tokens, reduction="sum") if self.world > 1 else tokens
        global_tokens = global_tokens.clamp(min=1)
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model)
            with sync:
                batch_sum = self._loss_sum(batch)
                # DDP averages gradients over the processes; multiplying by their number first turns that average
                # into the sum over every process's tokens divided by the global token count: a per-token mean.
                self.accelerator.backward(batch_sum * self.world / global_tokens)
            loss_sum += batch_sum.detach()
        if self.world > 1:
            loss_sum = self.accelerator.reduce(loss_sum, reduction="sum")
        return loss_sum / global_tokens, global_tokens

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of a micro-batch's targets (ignored targets, -100, count 0)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if self.config.document_attention:
            inputs["attention_mask"], inputs["position_ids"] = document_attention(batch["input_ids"], self.eos_id)
        with self.accelerator.autocast():
            if self.fused:  # the body's hidden states, then the output layer and the loss chunk by chunk
                hidden = self.forward_model(**inputs).last_hidden_state
                return linear_cross_entropy(hidden, self.output_weight, batch["labels"])
            logits = self.forward_model(**inputs).logits
        return target_losses(logits, batch["labels"])[0].sum()

    def _forward_backward_with_backoff(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_forward_backward`; on out-of-memory, halve the micro-batch, double accumulation and retry."""
        while True:
            try:
                return self._forward_backward(self._micro_batches(indices))
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
                if not (_is_oom(error) and self.config.oom_backoff and self.state.micro_batch_size > 1):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.state.micro_batch_size //= 2
                self.state.accumulation_steps *= 2
                logger.warning(
                    "Out of memory at step %d: micro-batch halved to %d, accumulation doubled to %d "
                    "(the effective batch stays %d).",
                    self.state.step + 1,
                    self.state.micro_batch_size,
                    self.state.accumulation_steps,
                    self.global_batch,
                )

    def _step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step: the step's mean token loss, its real target tokens, and whether it was skipped."""
        indices = self._next_step_indices()
        group = self.optimizer.param_groups[0]
        self.step_lr = self.config.learning_rate * group["lr"] / group["initial_lr"]  # the schedule's factor now
        loss, tokens = self._forward_backward_with_backoff(indices)
        norm = None
        if self.config.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        skip = self._refuse_nonfinite(loss, norm)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.sample_offset += len(indices)
        return loss, tokens, skip

    def _refuse_nonfinite(self, loss: torch.Tensor, norm: torch.Tensor | None) -> bool:
        """Stop (or, with ``nonfinite='skip'``, skip the update) when the loss or gradient is NaN or infinite,
        *before* the update reaches the weights, so every checkpoint and the best model stay good."""
        if bool(torch.isfinite(loss)) and (norm is None or bool(torch.isfinite(norm))):
            return False
        step = self.state.step + 1
        what = f"loss became {float(loss)}" if not torch.isfinite(loss) else f"gradient norm became {float(norm)}"
        if self.config.nonfinite == "skip":
            self.state.skipped_nonfinite_steps += 1
            logger.warning(
                "Step %d: the %s; the update was skipped (%d skipped so far).",
                step,
                what,
                self.state.skipped_nonfinite_steps,
            )
            return True
        self.save_history()
        kept = [f"the best model so far is in {self.out / 'best'}"] if (self.out / "best").exists() else []
        if self.last_checkpoint or checkpoints.latest_checkpoint(self.out):
            kept.append(
                f"the last checkpoint ({(self.last_checkpoint or checkpoints.latest_checkpoint(self.out)).name}) "
                "is intact"
            )
        raise TrainingError(
            f"The training {what} at step {step} (learning rate {self.step_lr:.2e}); "
            "the update was not applied. Likely causes: a learning rate too high for this model (try 10× lower), "
            "fp16 overflow (use bf16 or fp32), or corrupt data. "
            + (f"{'; '.join(kept).capitalize()}. " if kept else "")
            + "Set nonfinite='skip' to skip such steps instead."
        )

    def _check_time_budget(self) -> None:
        state, budget = self.state, self.config.max_time_seconds
        if budget and self.clock.elapsed() >= budget and state.step < self.max_steps and not state.stop_requested:
            state.stop_requested, state.stop_reason = True, f"time budget of {budget:g} s reached"

    # ---------------------------------------------------------------------------------------- logging, evaluation
    def _log_training(self, window: LossWindow, bar) -> None:
        mean_loss, tokens, speed = window.flush()
        self.state.tokens_seen += tokens
        self.history.log(
            step=self.state.step,
            epoch=self.epoch_progress,
            tokens_seen=self.state.tokens_seen,
            learning_rate=self.step_lr,
            train_loss=mean_loss,
            tokens_per_second=speed,
            elapsed_seconds=self.clock.elapsed(),
        )
        self._track({"train_loss": mean_loss, "learning_rate": self.step_lr, "tokens_per_second": speed})
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{speed:,.0f}", lr=f"{self.step_lr:.1e}", refresh=False)
        else:
            logger.info(
                "step %d/%d: loss %.4f, lr %.2e, %.0f tokens/s",
                self.state.step,
                self.max_steps,
                mean_loss,
                self.step_lr,
                speed,
            )

    def _evaluate_and_keep_best(self) -> None:
        state, config = self.state, self.config
        with self.accelerator.autocast():
            result = evaluate(
                self.raw_model,
                self.eval_data,
                batch_size=config.eval_batch_size,
                max_batches=config.eval_batches,
                device=self.accelerator.device,
                document_eos_id=self.eos_id if config.document_attention else None,
            )
        self.last_eval = result
        self.history.log(
            step=state.step,
            epoch=self.epoch_progress,
            tokens_seen=state.tokens_seen,
            learning_rate=self.step_lr,
            eval_loss=result.loss,
            eval_perplexity=result.perplexity,
            elapsed_seconds=self.clock.elapsed(),
        )
        self._track({"eval_loss": result.loss, "eval_perplexity": result.perplexity})
        if result.loss < state.best_eval_loss - config.early_stopping_min_delta:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = result.loss, state.step, 0
            if config.save_best:
                self.save_model_folder("best")
            return
        state.evals_without_improvement += 1
        if config.early_stopping_patience and state.evals_without_improvement >= config.early_stopping_patience:
            state.stop_requested = True
            state.stop_reason = (
                f"early stopping: validation loss has not improved for {state.evals_without_improvement} "
                f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step})"
            )

    def _begin(self) -> None:
        """Resume if asked, start the clock and the trackers, and say what is about to happen."""
        self.resume()
        self.clock.restart(self.state.elapsed_seconds)
        logger.info(
            "Training on %s, precision %s (%s), %s parameters, %d steps of %d examples.",
            self.history.info["device"],
            self.precision.precision,
            self.precision.reason,
            count_parameters(self.raw_model),
            self.max_steps,
            self.global_batch,
        )
        if self.config.report_to:
            self.accelerator.init_trackers(
                "tensorboard",
                config={k: v for k, v in self.config.to_dict().items() if isinstance(v, (int, float, str, bool))},
            )

    def _track(self, values: dict[str, float]) -> None:
        if self.config.report_to:
            self.accelerator.log(values, step=self.state.step)

    # ---------------------------------------------------------------------------------------- saving, resuming
    def save_model_folder(self, name: str) -> Path | None:
        """Save ``best/`` or ``model/`` from the main process, with the model's real vocabulary."""
        if not self.accelerator.is_main_process:
            return None
        with self.vocabulary.real_vocabulary():
            return checkpoints.save_model_folder(
                self.out / name, self.accelerator.unwrap_model(self.model), self.tokenizer
            )

    def save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.state.elapsed_seconds = self.clock.elapsed()
            tensor_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": checkpoints.rng_state(),
            }
            if self.accelerator.scaler is not None:
                tensor_state["scaler"] = self.accelerator.scaler.state_dict()
            adapters_only = hasattr(self.raw_model, "peft_config")
            trainer_state = {
                "state": self.state.to_dict(),
                "history": self.history.to_dict(),
                "config": self.config.to_dict(),
                "identity": self.identity,
                "precision": self.precision.precision,
                "weights": "trainable" if adapters_only else "all",
            }
            self.last_checkpoint = checkpoints.save_checkpoint(
                self.out / "checkpoints" / f"step-{self.state.step:06d}",
                model=self.accelerator.unwrap_model(self.model),
                tensor_state=tensor_state,
                trainer_state=trainer_state,
                trainable_only=adapters_only,
            )
            checkpoints.rotate_checkpoints(self.out, self.config.keep_last)
            self.save_history()

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint and its recorded state (damaged newer ones are skipped, with a warning)."""
        folder, skipped = resume.newest_intact_checkpoint(self.out)
        for line in skipped:
            logger.warning("Checkpoint %s is damaged, so it is skipped.", line)
        if folder is None:
            if skipped:
                raise CheckpointError(
                    f"Every checkpoint in '{self.out / 'checkpoints'}' is damaged ({'; '.join(skipped)}). "
                    "Start a new run (resume=False), or in another output_dir."
                )
            logger.info("No checkpoint in %s: starting a new run.", self.out / "checkpoints")
            return None
        if skipped:
            logger.warning("Resuming from %s instead (the newest intact checkpoint).", folder.name)
        return folder, json.loads((folder / checkpoints.STATE_FILE).read_text(encoding="utf-8"))

    def _choose_precision(self, device_type: str, accelerator: Accelerator | None) -> PrecisionChoice:
        if accelerator is not None:
            precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
            return PrecisionChoice(precision, "the given Accelerator's")
        if self.resume_from is not None and self.config.precision == "auto" and "precision" in self.resume_from[1]:
            return PrecisionChoice(self.resume_from[1]["precision"], "the checkpoint's (chosen when the run began)")
        # the probe's rows decide what it measures: bf16 kernels pay off on larger matrices, so it takes up to
        # PROBE_EXAMPLES of the run's examples (one 128-token example understated a 1,024-token batch's gain)
        sample = _batch_of(
            self.train_data, torch.arange(min(self.config.batch_size, PROBE_EXAMPLES, len(self.train_data)))
        )
        return choose_precision(
            self.config.precision,
            device_type,
            processes=self.world,
            speedup=lambda: measured_bf16_speedup(self.raw_model, sample),
        )

    def resume(self) -> None:
        self.history.info["resumed_from"] = None
        if self.resume_from is None:
            return
        folder, recorded = self.resume_from
        changes = resume.check_compatible(folder, recorded, self.config, self.identity)
        tensor_state, trainer_state = checkpoints.load_checkpoint(folder, self.accelerator.unwrap_model(self.model))
        self.optimizer.load_state_dict(tensor_state["optimizer"])
        if "scheduler" in tensor_state:
            self.scheduler.load_state_dict(tensor_state["scheduler"])
        if "scaler" in tensor_state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(tensor_state["scaler"])
        checkpoints.set_rng_state(tensor_state["rng"])
        for key, value in trainer_state["state"].items():
            setattr(self.state, key, value)
        info = self.history.info
        self.history = History.from_dict(trainer_state["history"])
        self.history.info = {**info, "resumed_from": str(folder), "resume_changes": changes}
        logger.info(
            "Resumed from %s (step %d of %d)%s.",
            folder,
            self.state.step,
            self.max_steps,
            f", with {'; '.join(changes)}" if changes else "",
        )

    def save_history(self) -> None:
        if self.accelerator.is_main_process:
            self.history.info["stop_reason"] = self.state.stop_reason
            self.history.save(self.out / "history.json")
            self.history.save(self.out / "history.csv")

    def _final_eval(self) -> EvalResult | None:
        if not self.history.eval_records:
            return None
        last = self.history.eval_records[-1]
        if self.last_eval is not None and self.last_eval.loss == last.eval_loss:
            return self.last_eval
        # e.g. resumed after the last evaluation: only the history's numbers are known
        return EvalResult(loss=last.eval_loss, perplexity=perplexity(last.eval_loss), accuracy=float("nan"), tokens=0)

    def _finish(self) -> TrainResult:
        self.accelerator.wait_for_everyone()
        self.vocabulary.remove()
        model = self.accelerator.unwrap_model(self.model)
        self.history.info.update(
            skipped_nonfinite_steps=self.state.skipped_nonfinite_steps,
            final_micro_batch_size=self.state.micro_batch_size,
            best_step=self.state.best_step,
        )
        model_dir = self.save_model_folder("model") if self.config.save_final else None
        best_dir = self.out / "best" if (self.out / "best").exists() and self.accelerator.is_main_process else None
        self.save_history()
        if self.config.plot and self.accelerator.is_main_process:
            from .plotting import plot_history

            plot_history(self.history, save_to=self.out / "history.png", show=False)
        if self.config.report_to:
            self.accelerator.end_training()
        self.callbacks.fire("on_train_end", self.state, self.history)
        log = logger.warning if self.state.stop_reason.startswith("interrupted") else logger.info
        log("Training stopped: %s. Output in %s.", self.state.stop_reason, self.out)
        return TrainResult(
            model=model,
            history=self.history,
            output_dir=self.out,
            best_dir=best_dir,
            model_dir=model_dir,
            last_checkpoint=self.last_checkpoint,
            stop_reason=self.state.stop_reason,
            final_eval=self._final_eval(),
        )


def _enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing; set gradient_checkpointing=False."
        )
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _progress_bar(config: TrainingConfig, total: int, initial: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def train(
    model,
    tokenizer,
    train_data,
    eval_data=None,
    config: TrainingConfig | None = None,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    callbacks: list | tuple = (),
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Fine-tune (or pre-train) a causal LM; returns the model, its :class:`~gpt_helpers.history.History` and paths.

    ``train_data`` / ``eval_data`` are :class:`~gpt_helpers.data.LMDataset` objects (see ``prepare_dataset``).
    ``param_groups`` overrides the optimizer's parameter groups (e.g. discriminative learning rates);
    ``callbacks`` receive ``on_train_begin``, ``on_step_end``, ``on_log`` and ``on_train_end``.

    >>> from gpt_helpers import load_model, prepare_dataset, TrainingConfig
    >>> model, tok = load_model()
    >>> data, _ = prepare_dataset(tok, ["Some text to learn from."] * 64, block_size=32)
    >>> result = train(model, tok, data, data, TrainingConfig(max_steps=2, output_dir="/tmp/doctest-run",
    ...                progress=False, plot=False, save_final=False, save_best=False))
    >>> len(result.history.eval_records)
    1
    """
    config = config or TrainingConfig()
    loop = _Loop(model, tokenizer, train_data, eval_data, config, param_groups, callbacks, accelerator)
    try:
        with _stop_on_interrupt(loop.state):
            return loop.run()
    finally:
        loop.vocabulary.remove()
