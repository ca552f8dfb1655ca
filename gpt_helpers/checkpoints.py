"""Checkpoints that survive a kill: written to a temporary folder, then renamed in one atomic step.

Layout under a run's output folder::

    checkpoints/step-000200/   model.safetensors, training_state.pt, trainer_state.json   (rotated: keep_last)
    best/                      a loadable model folder (config, safetensors, tokenizer) of the best validation loss
    model/                     the final model folder

A folder whose name starts with ``.tmp`` is an unfinished write and is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from transformers.utils import logging as hf_logging

from .errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "model.safetensors"


def _atomic_folder(final: Path) -> Path:
    """A fresh temporary folder next to ``final``; rename it with :func:`_publish` when complete."""
    temporary = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o644)  # some writers create 0600 files; a model folder is meant to be shared
            with file.open("rb") as handle:
                os.fsync(handle.fileno())


def _publish(temporary: Path, final: Path) -> None:
    """Replace ``final`` by ``temporary`` so that a reader sees either the old or the new folder, complete."""
    _fsync_folder(temporary)
    if final.exists():
        retired = final.parent / f".old-{final.name}-{os.getpid()}"
        if retired.exists():
            shutil.rmtree(retired)
        os.rename(final, retired)
        os.rename(temporary, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(temporary, final)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states, in types that ``torch.load(weights_only=True)`` accepts."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # The uint32 key is stored as int64: torch 2.4 cannot save uint32 tensors.
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, *, model: torch.nn.Module, tensor_state: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write one resumable checkpoint atomically into ``folder`` and return it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = _atomic_folder(folder)
    save_safetensors_model(model, str(temporary / WEIGHTS_FILE))
    torch.save(tensor_state, temporary / TENSOR_STATE_FILE)
    (temporary / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    _publish(temporary, folder)
    return folder


def load_checkpoint(folder: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; return ``(tensor_state, trainer_state)``. Pickles are refused."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, TENSOR_STATE_FILE, STATE_FILE):
        if not (folder / name).exists():
            raise CheckpointError(f"Checkpoint '{folder}' is incomplete: {name} is missing. Delete it to resume from an older one.")
    try:
        tensor_state = torch.load(folder / TENSOR_STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for unsafe or broken files
        raise CheckpointError(
            f"Refused to load '{folder / TENSOR_STATE_FILE}': it is not a plain tensor file ({type(error).__name__}). "
            "Only checkpoints written by gpt_helpers are accepted, because pickled objects can run code."
        ) from None
    missing, unexpected = load_safetensors_model(model, str(folder / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint '{folder}' does not match this model (missing {len(missing)}, unexpected {len(unexpected)} "
            f"tensors, e.g. {(missing or unexpected)[0]}). Resume with the same model and strategy that wrote it."
        )
    return tensor_state, json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root/checkpoints``, oldest first."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def rotate_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (the best model lives in ``best/`` and is never touched)."""
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in (Path(root) / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_model_folder(folder: Path, model, tokenizer=None, *, extra_files: dict[str, str] | None = None) -> Path:
    """Save a loadable Hugging Face model folder (safetensors) atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = _atomic_folder(folder)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter every lesson's output
    try:
        model.save_pretrained(temporary, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    for name, text in (extra_files or {}).items():
        (temporary / name).write_text(text, encoding="utf-8")
    _publish(temporary, folder)
    return folder
