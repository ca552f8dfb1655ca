"""The training loop, on HF Accelerate: one function, ``train``, that every lesson and the CLI call.

What happens in one optimizer step, in order:

1. take the next ``batch_size × gradient_accumulation_steps × processes`` examples of this epoch's shuffled order;
2. count the real (non-padding) target tokens of the whole step, so the loss is a mean *per token*,
   whatever the accumulation or the number of processes;
3. forward and backward each micro-batch (gradients add up; DDP syncs only on the last one);
4. clip gradients, step AdamW and the learning-rate schedule;
5. every ``log_every`` steps read the loss back to the host (the only sync), every ``eval_every`` steps
   evaluate, keep the best model and maybe stop early, every ``save_every`` steps write a checkpoint.

A run killed at any moment resumes from its newest complete checkpoint (``resume=True``) and continues
the same run: same data order, schedule, optimizer moments and random state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed

from . import checkpoints
from .config import TrainingConfig
from .errors import ConfigError, DataError, TrainingError
from .evaluation import EvalResult, evaluate, perplexity, token_losses
from .history import History
from .models import count_parameters
from .vocab_padding import PaddedVocabulary, padded_size

logger = logging.getLogger(__name__)


class Callback(Protocol):
    """Hooks into the loop; implement any subset. ``state.stop_requested = True`` ends training cleanly."""

    def on_train_begin(self, state: "TrainState") -> None: ...
    def on_step_end(self, state: "TrainState") -> None: ...
    def on_log(self, state: "TrainState", history: History) -> None: ...
    def on_train_end(self, state: "TrainState", history: History) -> None: ...


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

    def to_dict(self) -> dict[str, Any]:
        keys = ("step", "epoch", "sample_offset", "tokens_seen", "best_eval_loss", "best_step",
                "evals_without_improvement", "micro_batch_size", "accumulation_steps", "elapsed_seconds",
                "skipped_nonfinite_steps")
        return {key: getattr(self, key) for key in keys}


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
        lines = [f"Training stopped: {self.stop_reason}.", f"History: {self.output_dir / 'history.json'}"]
        if self.final_eval:
            lines.insert(1, f"Final validation: {self.final_eval}")
        if self.best_dir:
            lines.append(f"Best model: {self.best_dir}")
        if self.model_dir:
            lines.append(f"Final model: {self.model_dir}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- set-up helpers
def choose_precision(config: TrainingConfig, device_type: str) -> str:
    """bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs such as the T4, fp32 elsewhere."""
    if config.precision != "auto":
        if config.precision == "fp16" and device_type == "cpu":
            raise ConfigError("precision='fp16' needs a GPU (loss scaling on CPU is not supported). Use fp32 or bf16 on CPU.")
        return config.precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """An Accelerator for the requested device and precision (it also handles multi-process launches)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible. Use device='auto' to fall back to the CPU.")
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but Apple's MPS backend is not available. Use device='auto'.")
    probe = "cpu" if config.device == "cpu" else ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    precision = choose_precision(config, probe)
    # Accelerate keeps one process-wide state; a notebook that trains twice with other settings needs it fresh.
    # A multi-process group (PartialState) is kept; a single-process one is re-read from the environment.
    single_process = PartialState._shared_state.get("num_processes", 1) == 1
    AcceleratorState._reset_state(reset_partial_state=single_process)
    GradientState._reset_state()
    return Accelerator(cpu=probe == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision))


def lr_factor(progress: float, step: int, config: TrainingConfig) -> float:
    """Linear warmup for ``warmup_steps``, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def default_param_groups(model: torch.nn.Module, config: TrainingConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases and LayerNorm weights), every parameter included.

    Frozen parameters stay in the optimizer so a strategy can unfreeze them mid-run; AdamW skips them
    while they have no gradient.
    """
    decay, no_decay, seen = [], [], set()
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batch_of(dataset, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    if hasattr(dataset, "input_ids") and hasattr(dataset, "labels"):
        return {"input_ids": dataset.input_ids[indices], "attention_mask": dataset.attention_mask[indices],
                "labels": dataset.labels[indices]}
    batch = torch.utils.data.default_collate([dataset[int(i)] for i in indices])
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "labels" not in batch:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _model_name(model) -> str | None:
    """The model's hub or bundled name (a folder's own name, never a full path of this machine)."""
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return Path(name).name if os.path.isabs(name) else (name or None)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------ the loop
class _Loop:
    """The state and steps of one call to :func:`train` (kept small; read top to bottom)."""

    def __init__(self, model, tokenizer, train_data, eval_data, config: TrainingConfig,
                 param_groups: list[dict[str, Any]] | None, callbacks: list, accelerator: Accelerator | None):
        if len(train_data) == 0:
            raise DataError("The training dataset is empty. Check the data file and the cleaning report.")
        self.config = config
        self.tokenizer = tokenizer
        self.train_data = train_data
        self.eval_data = eval_data
        self.callbacks = list(callbacks)
        self.accelerator = accelerator or make_accelerator(config)
        self.out = Path(config.output_dir)
        set_seed(config.seed)
        self.raw_model = model
        if config.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; set gradient_checkpointing=False.")
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        device_type = self.accelerator.device.type
        self.vocabulary = _pad_vocabulary(model, config, device_type, custom_groups=param_groups is not None)
        groups = param_groups or default_param_groups(model, config)
        for group in groups:
            group.setdefault("lr", config.learning_rate)
            group["initial_lr"] = group["lr"]
        fused = config.fused_adamw if config.fused_adamw is not None else device_type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                           weight_decay=config.weight_decay, fused=fused or None)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        use_compile = config.compile if config.compile is not None else device_type == "cuda"
        self.forward_model = torch.compile(self.model) if use_compile else self.model
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.state = TrainState(micro_batch_size=config.batch_size, accumulation_steps=config.gradient_accumulation_steps)
        self.state.model = self.raw_model
        self.history = History()
        self.max_steps = self._max_steps()
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        precision = self.accelerator.mixed_precision
        counts = count_parameters(self.raw_model)
        self.history.info = {
            "device": str(self.accelerator.device), "precision": {"no": "fp32"}.get(precision, precision),
            "processes": self.world, "compile": bool(use_compile), "fused_adamw": bool(fused),
            "padded_vocabulary": self.vocabulary.size if self.vocabulary else None,
            "parameters": counts.total, "trainable_parameters": counts.trainable, "max_steps": self.max_steps,
            "train_examples": len(train_data), "global_batch_size": self.global_batch, "config": config.to_dict(),
            "base_model": _model_name(model),
        }

    @property
    def global_batch(self) -> int:
        return self.state.micro_batch_size * self.state.accumulation_steps * self.world

    def _max_steps(self) -> int:
        config = self.config
        steps_per_epoch = len(self.train_data) // (config.effective_batch_size * self.world)
        if steps_per_epoch == 0:
            raise DataError(
                f"The training data has {len(self.train_data)} examples, fewer than one step's batch of "
                f"{config.effective_batch_size * self.world} (batch_size × gradient_accumulation_steps × processes). "
                "Lower batch_size, or add data."
            )
        limits = [config.max_steps] if config.max_steps else []
        if config.epochs:
            limits.append(max(1, math.ceil(config.epochs * steps_per_epoch)))
        return min(limits)

    # ---------------------------------------------------------------------------------------- data order
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
        return order[self.state.sample_offset:self.state.sample_offset + size]

    def _micro_batches(self, step_indices: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        share = step_indices.chunk(self.world)[self.rank]
        device = self.accelerator.device
        return [{k: v.to(device, non_blocking=True) for k, v in _batch_of(self.train_data, part).items()}
                for part in share.split(self.state.micro_batch_size)]

    # ---------------------------------------------------------------------------------------- one step
    def _progress(self) -> float:
        by_steps = self.state.step / self.max_steps
        if self.config.max_time_seconds:
            return max(by_steps, self._elapsed() / self.config.max_time_seconds)
        return by_steps

    def _set_learning_rate(self) -> float:
        factor = lr_factor(self._progress(), self.state.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.config.learning_rate * factor

    def _forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)
        global_tokens = self.accelerator.reduce(tokens, reduction="sum") if self.world > 1 else tokens
        global_tokens = global_tokens.clamp(min=1)
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    logits = self.forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                losses, _ = token_losses(logits, batch["labels"])
                batch_sum = losses.sum()
                self.accelerator.backward(batch_sum * self.world / global_tokens)
            loss_sum += batch_sum.detach()
        if self.world > 1:
            loss_sum = self.accelerator.reduce(loss_sum, reduction="sum")
        return loss_sum / global_tokens, global_tokens

    def _step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step; on a CUDA out-of-memory error, halve the micro-batch and retry the same examples.

        Returns the step's mean token loss, its real target tokens, and whether the update was skipped
        (``nonfinite='skip'`` and a NaN/inf loss).
        """
        indices = self._next_step_indices()
        while True:
            try:
                loss, tokens = self._forward_backward(self._micro_batches(indices))
                break
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
                if not (_is_oom(error) and self.config.oom_backoff and self.state.micro_batch_size > 1):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.state.micro_batch_size //= 2
                self.state.accumulation_steps *= 2
                logger.warning("Out of memory at step %d: micro-batch halved to %d, accumulation doubled to %d "
                               "(the effective batch stays %d).", self.state.step + 1, self.state.micro_batch_size,
                               self.state.accumulation_steps, self.global_batch)
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        skip = False
        if self.config.nonfinite == "skip" and not torch.isfinite(loss):
            skip = True
            self.state.skipped_nonfinite_steps += 1
            logger.warning("Step %d: the loss is not finite; the update was skipped (%d skipped so far).",
                           self.state.step + 1, self.state.skipped_nonfinite_steps)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.sample_offset += len(indices)
        return loss, tokens, skip

    # ---------------------------------------------------------------------------------------- evaluation
    def _evaluate(self) -> EvalResult | None:
        if self.eval_data is None:
            return None
        with self.accelerator.autocast():
            return evaluate(self.raw_model, self.eval_data, batch_size=self.config.eval_batch_size,
                            max_batches=self.config.eval_batches, device=self.accelerator.device)

    def _after_eval(self, result: EvalResult) -> None:
        state, config = self.state, self.config
        improved = result.loss < state.best_eval_loss - config.early_stopping_min_delta
        if improved:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = result.loss, state.step, 0
            if config.save_best and self.accelerator.is_main_process:
                with self.vocabulary.real_vocabulary() if self.vocabulary else contextlib.nullcontext():
                    checkpoints.save_model_folder(self.out / "best", self.accelerator.unwrap_model(self.model), self.tokenizer)
        else:
            state.evals_without_improvement += 1
            if config.early_stopping_patience and state.evals_without_improvement >= config.early_stopping_patience:
                state.stop_requested = True
                state.stop_reason = (f"early stopping: validation loss has not improved for {state.evals_without_improvement} "
                                     f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step})")

    # ---------------------------------------------------------------------------------------- checkpoints
    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        self.state.elapsed_seconds = self._elapsed()
        tensor_state = {"optimizer": self.optimizer.state_dict(), "rng": checkpoints.rng_state()}
        if self.accelerator.scaler is not None:
            tensor_state["scaler"] = self.accelerator.scaler.state_dict()
        trainer_state = {"state": self.state.to_dict(), "history": self.history.to_dict(), "config": self.config.to_dict()}
        folder = checkpoints.save_checkpoint(self.out / "checkpoints" / f"step-{self.state.step:06d}",
                                             model=self.accelerator.unwrap_model(self.model),
                                             tensor_state=tensor_state, trainer_state=trainer_state)
        checkpoints.rotate_checkpoints(self.out, self.config.keep_last)
        return folder

    def resume(self) -> Path | None:
        folder = checkpoints.latest_checkpoint(self.out)
        if folder is None:
            logger.info("No checkpoint in %s: starting a new run.", self.out / "checkpoints")
            return None
        tensor_state, trainer_state = checkpoints.load_checkpoint(folder, self.accelerator.unwrap_model(self.model))
        self.optimizer.load_state_dict(tensor_state["optimizer"])
        if "scaler" in tensor_state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(tensor_state["scaler"])
        checkpoints.set_rng_state(tensor_state["rng"])
        saved = trainer_state["state"]
        for key, value in saved.items():
            setattr(self.state, key, value)
        self.elapsed_before = saved["elapsed_seconds"]
        info = self.history.info
        self.history = History.from_dict(trainer_state["history"])
        self.history.info = info
        logger.info("Resumed from %s (step %d of %d).", folder, self.state.step, self.max_steps)
        return folder

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        config, state = self.config, self.state
        resumed_from = self.resume() if config.resume else None
        self.history.info["resumed_from"] = str(resumed_from) if resumed_from else None
        self.started = time.perf_counter()
        logger.info("Training on %s, precision %s, %s parameters, %d steps of %d examples.", self.history.info["device"],
                    self.history.info["precision"], count_parameters(self.raw_model), self.max_steps, self.global_batch)
        for callback in self.callbacks:
            getattr(callback, "on_train_begin", lambda s: None)(state)
        bar = _progress_bar(config, self.max_steps, state.step, self.accelerator.is_main_process)
        self.model.train()
        window_loss = torch.zeros((), device=self.accelerator.device)
        window_tokens = torch.zeros((), device=self.accelerator.device, dtype=torch.long)
        window_steps, window_started = 0, time.perf_counter()
        last_checkpoint = None
        while state.step < self.max_steps and not state.stop_requested:
            learning_rate = self._set_learning_rate()
            loss, tokens, skipped = self._step()
            if not skipped:  # a skipped step trained on nothing: its NaN must not hide the window's real loss
                window_loss += loss.detach().float()
                window_tokens += tokens
                window_steps += 1
            for callback in self.callbacks:
                getattr(callback, "on_step_end", lambda s: None)(state)
            final = state.step >= self.max_steps or state.stop_requested
            if config.max_time_seconds and self._elapsed() >= config.max_time_seconds and not final:
                state.stop_requested, state.stop_reason, final = True, f"time budget of {config.max_time_seconds:g} s reached", True
            checkpoint_due = bool(config.save_every) and state.step % config.save_every == 0 and not final
            # A checkpoint step is also a log step: the running window is flushed into the saved state, so a
            # resumed run logs exactly what the uninterrupted run logs.
            if state.step % config.log_every == 0 or final or checkpoint_due:
                mean_loss = float(window_loss) / window_steps if window_steps else math.nan
                seen = int(window_tokens)
                state.tokens_seen += seen
                speed = seen / max(time.perf_counter() - window_started, 1e-9)
                if not math.isfinite(mean_loss) and config.nonfinite == "stop":
                    self.save_history()
                    first = state.step - window_steps + 1
                    where = f"at step {state.step}" if first == state.step else f"between steps {first} and {state.step}"
                    raise TrainingError(
                        f"The training loss became {mean_loss} {where} "
                        f"(learning rate {learning_rate:.2e}). Likely causes: a learning rate too high for this model "
                        "(try 10× lower), fp16 overflow (use bf16 or fp32), or corrupt data. "
                        + (f"The best model so far is in {self.out / 'best'}. " if (self.out / "best").exists() else "")
                        + "Set nonfinite='skip' to skip such steps instead."
                    )
                self.history.log(step=state.step, epoch=state.epoch + state.sample_offset / len(self.train_data),
                                 tokens_seen=state.tokens_seen, learning_rate=learning_rate, train_loss=mean_loss,
                                 tokens_per_second=speed, elapsed_seconds=self._elapsed())
                window_loss.zero_(), window_tokens.zero_()
                window_steps, window_started = 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{speed:,.0f}", lr=f"{learning_rate:.1e}", refresh=False)
                else:
                    logger.info("step %d/%d: loss %.4f, lr %.2e, %.0f tokens/s", state.step, self.max_steps, mean_loss,
                                learning_rate, speed)
            if (state.step % config.eval_every == 0 or final) and self.eval_data is not None:
                result = self._evaluate()
                self.last_eval = result  # kept whole (with accuracy and tokens) for TrainResult.final_eval
                self.history.log(step=state.step, epoch=state.epoch + state.sample_offset / len(self.train_data),
                                 tokens_seen=state.tokens_seen, learning_rate=learning_rate, eval_loss=result.loss,
                                 eval_perplexity=result.perplexity, elapsed_seconds=self._elapsed())
                self._after_eval(result)
                window_started = time.perf_counter()  # evaluation time does not count against training speed
            if state.step % config.log_every == 0 or final or checkpoint_due or state.step % config.eval_every == 0:
                for callback in self.callbacks:
                    getattr(callback, "on_log", lambda s, h: None)(state, self.history)
            if checkpoint_due:
                last_checkpoint = self.save_checkpoint()
                self.save_history()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        state.stop_reason = state.stop_reason or ("stopped on request" if state.stop_requested else f"reached {self.max_steps} steps")
        if config.save_every or config.resume:
            last_checkpoint = self.save_checkpoint()
        return self._finish(last_checkpoint)

    def unpad_vocabulary(self) -> None:
        """Give the model back its real vocabulary size (after training, or when it fails)."""
        if self.vocabulary is not None:
            self.vocabulary.remove()

    def save_history(self) -> None:
        if self.accelerator.is_main_process:
            self.history.info["stop_reason"] = self.state.stop_reason
            self.history.save(self.out / "history.json")
            self.history.save(self.out / "history.csv")

    def _finish(self, last_checkpoint: Path | None) -> TrainResult:
        config = self.config
        self.accelerator.wait_for_everyone()
        self.unpad_vocabulary()
        model = self.accelerator.unwrap_model(self.model)
        final_eval = None
        if self.history.eval_records:
            last = self.history.eval_records[-1]
            measured = getattr(self, "last_eval", None)
            if measured is not None and measured.loss == last.eval_loss:
                final_eval = measured
            else:  # e.g. resumed after the last evaluation: only the history's numbers are known
                final_eval = EvalResult(loss=last.eval_loss, perplexity=perplexity(last.eval_loss), accuracy=float("nan"), tokens=0)
        model_dir = best_dir = None
        self.history.info["skipped_nonfinite_steps"] = self.state.skipped_nonfinite_steps
        self.history.info["final_micro_batch_size"] = self.state.micro_batch_size
        self.history.info["best_step"] = self.state.best_step
        if self.accelerator.is_main_process:
            if config.save_final:
                model_dir = checkpoints.save_model_folder(self.out / "model", model, self.tokenizer)
            if (self.out / "best").exists():
                best_dir = self.out / "best"
            self.save_history()
            if config.plot:
                from .plotting import plot_history
                plot_history(self.history, save_to=self.out / "history.png", show=False)
        for callback in self.callbacks:
            getattr(callback, "on_train_end", lambda s, h: None)(self.state, self.history)
        logger.info("Training stopped: %s. Output in %s.", self.state.stop_reason, self.out)
        return TrainResult(model=model, history=self.history, output_dir=self.out, best_dir=best_dir, model_dir=model_dir,
                           last_checkpoint=last_checkpoint, stop_reason=self.state.stop_reason, final_eval=final_eval)


def _pad_vocabulary(model, config: TrainingConfig, device_type: str, *, custom_groups: bool) -> PaddedVocabulary | None:
    """Pad the vocabulary when asked (or by default on CUDA) and when it is safe to: not under custom parameter
    groups (they hold the embedding parameters that padding replaces) nor on PEFT adapters (their base is frozen)."""
    multiple = config.pad_vocab_to_multiple_of
    if multiple is None:
        multiple = 64 if device_type == "cuda" else 0
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None or padded_size(embeddings.num_embeddings, multiple) == embeddings.num_embeddings:
        return None
    if custom_groups or hasattr(model, "peft_config") or getattr(model, "get_output_embeddings", lambda: None)() is None:
        log = logger.warning if config.pad_vocab_to_multiple_of else logger.debug
        log("Vocabulary padding skipped: it needs the model's own parameter groups and a plain output layer.")
        return None
    return PaddedVocabulary(model, multiple)


def _progress_bar(config: TrainingConfig, total: int, initial: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def train(model, tokenizer, train_data, eval_data=None, config: TrainingConfig | None = None, *,
          param_groups: list[dict[str, Any]] | None = None, callbacks: list | tuple = (),
          accelerator: Accelerator | None = None) -> TrainResult:
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
        return loop.run()
    finally:
        loop.unpad_vocabulary()
