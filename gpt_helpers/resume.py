"""Which checkpoint a resumed run continues from, and whether it may: the newest intact one, written by the same setup.

A resumed run must be the *same* run: same model, data, batch, schedule and seed, or its result is neither the
old run nor a new one. So resuming compares what the checkpoint recorded with the run about to start, and:

* refuses a different model, data or block size, and any setting that changes the optimisation itself
  (batch, learning rate and schedule, seed, precision…), naming each differing field;
* accepts settings that only change how long the run goes on or how it is watched (more steps, another eval or
  save interval, patience…) when the user says so: ``allow_config_change=True`` (``--allow-config-change``);
* skips a newest checkpoint whose files are cut short or damaged (their sizes and checksums are recorded at save
  time), falls back to the previous intact one, and says which and why.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from . import checkpoints
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

#: Settings that do not matter to the run's numbers at all.
IGNORED_FIELDS = frozenset({"output_dir", "resume", "allow_config_change", "progress", "plot", "report_to"})
#: Settings a resumed run may change when the user allows it: how long it runs and how it is watched or saved.
SAFE_FIELDS = frozenset(
    {
        "max_steps",
        "epochs",
        "max_time_seconds",
        "eval_every",
        "eval_batches",
        "log_every",
        "save_every",
        "keep_last",
        "save_best",
        "save_final",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "nonfinite",
        "oom_backoff",
        "compile",
        "device",
        "fused_adamw",
        "gradient_checkpointing",
        "eval_batch_size",
    }
)


def tensor_fingerprint(tensors: list[torch.Tensor], samples: int = 4096) -> str:
    """A short digest of some tensors' shapes and of evenly spaced values: different data or weights differ here.

    >>> tensor_fingerprint([torch.arange(10)]) == tensor_fingerprint([torch.arange(10)])
    True
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_identity(model: torch.nn.Module, train_data: Any, base_model_name: str | None) -> dict[str, Any]:
    """What a checkpoint records of its run besides the config: the model and the training data."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    data = [train_data.input_ids] if hasattr(train_data, "input_ids") else []
    return {
        "base_model": base_model_name,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_weights": tensor_fingerprint(frozen) if frozen else None,
        "train_examples": len(train_data),
        "block_size": int(train_data.input_ids.shape[1]) if data else None,
        "train_data": tensor_fingerprint(data) if data else None,
    }


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for every setting that differs and matters.

    >>> config_differences({"batch_size": 4, "plot": True}, {"batch_size": 8, "plot": False})
    {'batch_size': (4, 8)}
    """
    names = (set(saved) | set(current)) - IGNORED_FIELDS
    return {
        name: (saved.get(name), current.get(name)) for name in sorted(names) if saved.get(name) != current.get(name)
    }


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name}={old!r} (now {new!r})" for name, (old, new) in differences.items())


def check_compatible(folder: Path, trainer_state: dict[str, Any], config: Any, identity: dict[str, Any]) -> list[str]:
    """Refuse to resume from ``folder`` with another model, data or optimisation; return the changes accepted.

    ``config`` is the run's :class:`~gpt_helpers.config.TrainingConfig`; safe changes need
    ``config.allow_config_change``.
    """
    saved_identity = trainer_state.get("identity") or {}
    setup = {
        name: (saved_identity.get(name), value)
        for name, value in identity.items()
        if name in saved_identity and saved_identity[name] != value
    }
    if setup:
        raise CheckpointError(
            f"Cannot resume from '{folder}': it was written by another setup ({_describe(setup)}). Resume with the "
            "model, adapters and data that wrote it, or start a new run in another output_dir."
        )
    differences = config_differences(trainer_state.get("config", {}), config.to_dict())
    unsafe = {name: change for name, change in differences.items() if name not in SAFE_FIELDS}
    if unsafe:
        raise ConfigError(
            f"Cannot resume from '{folder}' with other training settings: {_describe(unsafe)}. They change the "
            "optimisation itself, so the result would be neither the old run nor a new one. Resume with the "
            "settings it was written with, or start a new run in another output_dir."
        )
    if differences and not config.allow_config_change:
        raise ConfigError(
            f"Resuming from '{folder}' with changed settings: {_describe(differences)}. If that is what you mean, "
            "say so with allow_config_change=True (--allow-config-change on the command line); these settings only "
            "change how long the run goes on or how it is watched."
        )
    return [f"{name}: {old!r} -> {new!r}" for name, (old, new) in differences.items()]


def newest_intact_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their recorded sizes and checksums, and a line for each one skipped."""
    skipped = []
    for folder in reversed(checkpoints.list_checkpoints(root)):
        problem = checkpoints.verify_checkpoint(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped
