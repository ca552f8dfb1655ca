"""Checkpoints that survive a kill: written to a temporary folder, then renamed in one atomic step.

Layout under a run's output folder::

    checkpoints/step-000200/   model.safetensors, training_state.pt, trainer_state.json, manifest.json
                               (rotated: keep_last; the manifest records each file's size and sha256)
    best/                      a loadable model folder (config, safetensors, tokenizer) of the best validation loss
    model/                     the final model folder

A folder whose name starts with ``.tmp`` is an unfinished write and is never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file as save_safetensors_file
from safetensors.torch import save_model as save_safetensors_model
from transformers.utils import logging as hf_logging

from .errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
TENSOR_STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "model.safetensors"


def temporary_folder(final: Path, *, suffix: str = "") -> Path:
    """A fresh temporary folder next to ``final``; rename it with :func:`publish_folder` when complete."""
    temporary = final.parent / f".tmp-{final.name}-{os.getpid()}{suffix}"
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


def publish_folder(temporary: Path, final: Path) -> None:
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


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Record every file's size and sha256, so that a truncated or bit-flipped checkpoint is recognised later."""
    files = {
        file.name: {"bytes": file.stat().st_size, "sha256": file_digest(file)}
        for file in sorted(folder.iterdir())
        if file.is_file()
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with a checkpoint (a missing, truncated or changed file), or None when it is intact.

    Checkpoints written before manifests existed are checked for their files only.
    """
    folder = Path(folder)
    for name in (TENSOR_STATE_FILE, STATE_FILE):
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not (folder / MANIFEST_FILE).is_file():
        return None if (folder / WEIGHTS_FILE).is_file() else f"{WEIGHTS_FILE} is missing"
    try:
        recorded = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is damaged"
    for name, expected in recorded.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size:,} bytes, {expected['bytes']:,} when it was saved (cut short or overwritten)"
        if file_digest(file) != expected["sha256"]:
            return f"{name} has the right size but not the checksum recorded when it was saved (damaged)"
    return None


def _disk_full_error(error: OSError, folder: Path, needed: int) -> CheckpointError:
    free = shutil.disk_usage(folder.parent).free if folder.parent.exists() else 0
    previous = latest_checkpoint(folder.parent.parent)
    kept = f"The previous checkpoint ({previous.name}) and" if previous else "Earlier output such as"
    return CheckpointError(
        f"Could not write the checkpoint {folder.name} into '{folder.parent}': {error.strerror or error}. {kept} "
        f"best/ are intact, and the half-written files were removed. One checkpoint needs about "
        f"{needed / 2**20:,.1f} MiB; {free / 2**20:,.1f} MiB are free there. Free some space (or lower keep_last, or "
        "choose another output_dir), then continue with resume=True (--resume)."
    )


def save_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    tensor_state: dict[str, Any],
    trainer_state: dict[str, Any],
    trainable_only: bool = False,
) -> Path:
    """Write one resumable checkpoint atomically into ``folder`` and return it.

    ``trainable_only`` stores only the parameters that train (a LoRA run's adapters: megabytes, not the whole
    model); the frozen rest is reloaded from the base model on resume. A write that fails (a full disk) removes
    its own files, leaves every earlier checkpoint as it was, and raises :class:`CheckpointError`.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_folder(folder)
    try:
        if trainable_only:
            trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
            save_safetensors_file(trained, str(temporary / WEIGHTS_FILE))
        else:
            save_safetensors_model(model, str(temporary / WEIGHTS_FILE))
        torch.save(tensor_state, temporary / TENSOR_STATE_FILE)
        (temporary / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        _write_manifest(temporary)
        publish_folder(temporary, folder)
    except OSError as error:
        needed = sum(f.stat().st_size for f in temporary.iterdir() if f.is_file()) if temporary.exists() else 0
        shutil.rmtree(temporary, ignore_errors=True)
        previous = latest_checkpoint(folder.parent.parent)
        if previous is not None:
            needed = max(needed, sum(f.stat().st_size for f in previous.iterdir() if f.is_file()))
        raise _disk_full_error(error, folder, needed) from None
    return folder


def load_checkpoint(folder: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; return ``(tensor_state, trainer_state)``. Pickles and damaged files are refused."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, TENSOR_STATE_FILE, STATE_FILE):
        if not (folder / name).exists():
            raise CheckpointError(
                f"Checkpoint '{folder}' is incomplete: {name} is missing. Delete it to resume from an older one."
            )
    try:
        tensor_state = torch.load(folder / TENSOR_STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for unsafe or broken files
        problem = verify_checkpoint(folder)
        raise CheckpointError(
            f"Refused to load '{folder / TENSOR_STATE_FILE}': it is not a plain tensor file ({type(error).__name__}). "
            "Only checkpoints written by gpt_helpers are accepted, because pickled objects can run code."
            + (f" Also, {problem}." if problem else "")
        ) from None
    problem = verify_checkpoint(folder)
    if problem:
        raise CheckpointError(
            f"Checkpoint '{folder}' is damaged: {problem}. Resume from an older one (resume=True "
            "picks the newest intact checkpoint)."
        )
    trainer_state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if trainer_state.get("weights") == "trainable":
        saved = load_safetensors_file(str(folder / WEIGHTS_FILE))
        parameters = dict(model.named_parameters())
        missing = sorted(set(saved) - set(parameters))
        if missing:
            raise CheckpointError(
                f"Checkpoint '{folder}' holds {missing[0]}, which this model does not have. Resume "
                "with the same model and adapters (e.g. the same apply_lora settings) that wrote it."
            )
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)
    else:
        missing, unexpected = load_safetensors_model(model, str(folder / WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"Checkpoint '{folder}' does not match this model (missing {len(missing)}, unexpected {len(unexpected)} "
                f"tensors, e.g. {(missing or unexpected)[0]}). Resume with the same model and strategy that wrote it."
            )
    return tensor_state, trainer_state


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


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Silence transformers' own progress bars ("Writing model shards"), which would clutter every lesson's output."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def save_model_folder(folder: Path, model, tokenizer=None, *, extra_files: dict[str, str] | None = None) -> Path:
    """Save a loadable Hugging Face model folder (safetensors) atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_folder(folder)
    try:
        with transformers_bars_off():
            model.save_pretrained(temporary, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text, encoding="utf-8")
        publish_folder(temporary, folder)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        needed = sum(p.numel() * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(folder.parent).free
        raise CheckpointError(
            f"Could not write the model folder '{folder}': {error.strerror or error}. The half-written files were "
            f"removed{' and the earlier ' + folder.name + '/ is intact' if folder.exists() else ''}. The folder needs "
            f"about {needed / 2**20:,.1f} MiB; {free / 2**20:,.1f} MiB are free there. Free some space or choose "
            "another output_dir."
        ) from None
    return folder
