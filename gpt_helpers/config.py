"""``TrainingConfig``: every knob of a training run, checked when it is made.

A wrong value is refused at once with the reason, not three minutes into a run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "slanted_triangular")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
NONFINITE_POLICIES = ("stop", "skip")
TRACKERS = ("tensorboard",)


@dataclass
class TrainingConfig:
    """Settings of one training run. Every field has a default that runs on a laptop CPU.

    >>> TrainingConfig(max_steps=100, learning_rate=3e-4).effective_batch_size
    16
    >>> TrainingConfig(learning_rate="fast")
    Traceback (most recent call last):
    ...
    gpt_helpers.errors.ConfigError: learning_rate must be a number, not 'fast' (str).
    """

    output_dir: str = "runs/latest"
    max_steps: int | None = 200
    epochs: float | None = None
    max_time_seconds: float | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    eval_batches: int | None = 20
    eval_batch_size: int = 16  # fixed, so eval_batches covers the same blocks whatever the training batch
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    log_every: int = 10
    save_every: int | None = None
    keep_last: int = 2
    save_best: bool = True
    save_final: bool = True
    resume: bool = False
    allow_config_change: bool = False  # resume with more steps or other intervals (never another batch, lr or model)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on GPUs that have it (else fp16), on CPUs where a probe step shows it pays
    compile: bool | None = None  # torch.compile the model; None: on CUDA for runs long enough to repay compiling
    fused_adamw: bool | None = None  # one fused AdamW kernel; None: on CUDA and CPU
    pad_vocab_to_multiple_of: int | None = None  # pad the output layer for faster matmuls; None: 64 on CUDA, 0: off
    document_attention: bool = False  # packed blocks: each document attends only to itself (positions restart)
    fused_loss: bool | None = None  # output layer + loss chunk by chunk; None: on CPU with a frozen output layer
    gradient_checkpointing: bool = False
    nonfinite: str = "stop"
    oom_backoff: bool = True
    progress: bool = True
    plot: bool = True
    report_to: str | None = None  # "tensorboard": log to <output_dir>/tensorboard through Accelerate's trackers

    def __post_init__(self) -> None:
        self._check_types()
        positive = ["batch_size", "gradient_accumulation_steps", "log_every", "eval_every", "eval_batch_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("max_steps", "save_every", "eval_batches", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or None), not {value}.")
        for name in ("epochs", "max_time_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive (or None), not {value}.")
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("Set max_steps or epochs (or both: training stops at whichever comes first).")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(
                f"learning_rate must be between 0 and 1, not {self.learning_rate}. Typical fine-tuning values: 1e-5 to 1e-3."
            )
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, not {self.weight_decay}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), not {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, not {self.warmup_steps}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(
                f"max_grad_norm must be positive (or None to turn clipping off), not {self.max_grad_norm}."
            )
        if self.pad_vocab_to_multiple_of is not None and self.pad_vocab_to_multiple_of < 0:
            raise ConfigError(
                f"pad_vocab_to_multiple_of must be >= 0 (0 turns padding off), not {self.pad_vocab_to_multiple_of}."
            )
        if self.keep_last < 1:
            raise ConfigError(f"keep_last must be at least 1, not {self.keep_last}.")
        self._check_choice("lr_schedule", SCHEDULES)
        self._check_choice("precision", PRECISIONS)
        self._check_choice("device", DEVICES)
        self._check_choice("nonfinite", NONFINITE_POLICIES)
        if self.report_to is not None:
            self._check_choice("report_to", TRACKERS)
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir must be a folder path, not empty.")

    def _check_types(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = str(spec.type)
            if value is None:
                if "None" not in expected:
                    raise ConfigError(f"{spec.name} must be set, not None.")
                continue
            if expected.startswith("bool"):
                if not isinstance(value, bool):
                    raise ConfigError(f"{spec.name} must be True or False, not {value!r} ({type(value).__name__}).")
            elif expected.startswith("int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{spec.name} must be a whole number, not {value!r} ({type(value).__name__}).")
            elif expected.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{spec.name} must be a number, not {value!r} ({type(value).__name__}).")
                if value != value or value in (float("inf"), float("-inf")):
                    raise ConfigError(f"{spec.name} must be a finite number, not {value}.")
            elif expected.startswith("str") and not isinstance(value, str):
                raise ConfigError(f"{spec.name} must be text, not {value!r} ({type(value).__name__}).")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}.")

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step on one process: batch_size × gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"Unknown setting(s): {', '.join(sorted(unknown))}. See TrainingConfig for the names.")
        return TrainingConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build from a dict (e.g. a JSON file), refusing unknown keys by name."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown setting(s): {', '.join(sorted(unknown))}. See TrainingConfig for the names.")
        return cls(**values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingConfig:
        """Read a JSON config file."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"Config file '{path}' does not exist.")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}).") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings.")
        try:
            return cls.from_dict(values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
