"""Which number format a run computes in, chosen once by what the hardware has and what it measurably gains.

* CUDA: bf16 autocast where the GPU supports it (Ampere and newer), else fp16 with loss scaling (T4, V100).
* CPU: bf16 autocast only where the CPU has bf16 matrix instructions (``avx512_bf16`` or AMX on x86, the ``bf16``
  feature on Arm) *and* a probe step of the model at hand runs measurably faster in bf16 than in fp32. A 135M
  model gains about 2× on such a CPU; a 2M-parameter model gains little, because its time goes to operations
  that autocast does not speed up. Elsewhere fp32.
* MPS: fp32.

The choice and its reason go into the run's history (``history.info["precision"]``, ``["precision_reason"]``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: bf16 is chosen on a CPU when a probe step is at least this many times faster than in fp32.
BF16_MIN_SPEEDUP = 1.15


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why."""

    precision: str
    reason: str


def cpu_bf16_instructions() -> list[str]:
    """The bf16 matrix instruction sets this CPU reports (empty when it has none, or torch cannot tell).

    >>> isinstance(cpu_bf16_instructions(), list)
    True
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return [name for name in ("amx_bf16", "avx512_bf16") if found.get(name)]
    flags = []
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.append("avx512_bf16")
    cpuinfo = Path("/proc/cpuinfo")
    if not flags and cpuinfo.exists() and " bf16" in cpuinfo.read_text(errors="ignore").lower():
        flags.append("bf16")  # Arm's feature name (Graviton 3, Ampere Altra Max…)
    return flags


def probe_step_seconds(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str, *, warm_up: bool = True
) -> float:
    """Seconds of one forward and backward pass of ``model`` on ``batch`` (after one warm-up pass, unless
    ``warm_up=False``).

    The model's weights and the random state are left as they were; gradients are set back to None.
    """
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    with torch.random.fork_rng(devices=[]):
        seconds = []
        for _ in range(2 if warm_up else 1):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).logits.float().logsumexp(-1).mean()
            loss.backward()
            seconds.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return seconds[-1]


def measured_bf16_speedup(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, repeats: int = 3) -> float:
    """fp32 time ÷ bf16 time of a training pass of ``model`` on ``batch`` on this CPU: the median of ``repeats``
    alternating probes, remembered in the course's cache folder (``precision.json``; delete it to measure again),
    so every run of the same model shape on this machine makes the same choice."""
    from .architecture import architecture
    from .packaged import cache_dir

    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    key = (
        f"{capabilities.get('cpu_name', 'cpu')} {capabilities.get('num_physical_cores', '?')} cores | torch "
        f"{torch.__version__} | {torch.get_num_threads()} threads | {architecture(model)} | "
        f"{tuple(batch['input_ids'].shape)}"
    )
    file = cache_dir() / "precision.json"
    try:
        known = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        ratios = [  # alternating, each precision warmed up once
            probe_step_seconds(model, batch, "fp32", warm_up=not i)
            / max(probe_step_seconds(model, batch, "bf16", warm_up=not i), 1e-9)
            for i in range(repeats)
        ]
        known[key] = round(statistics.median(ratios), 3)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            temporary = file.with_name(f".{file.name}.{os.getpid()}")
            temporary.write_text(json.dumps(known, indent=1), encoding="utf-8")
            os.replace(temporary, file)
        except OSError:
            logger.debug("Could not remember the precision probe in %s.", file)
    return known[key]


def choose_precision(
    requested: str, device_type: str, *, processes: int = 1, speedup: Callable[[], float] | None = None
) -> PrecisionChoice:
    """The precision for ``requested`` (``auto``, ``fp32``, ``bf16``, ``fp16``) on ``device_type``.

    ``speedup()`` measures how many times faster a training pass runs in bf16 than in fp32 (see
    :func:`measured_bf16_speedup`); it decides ``auto`` on a CPU with bf16 instructions (skipped with several
    processes, which must agree without talking: they use fp32).

    >>> choose_precision("fp32", "cpu").precision
    'fp32'
    >>> choose_precision("auto", "cpu", speedup=lambda: 2.0).precision in ("bf16", "fp32")
    True
    """
    from .errors import ConfigError

    if requested != "auto":
        if requested == "fp16" and device_type == "cpu":
            raise ConfigError(
                "precision='fp16' needs a GPU (loss scaling on CPU is not supported). Use fp32 or bf16 on CPU."
            )
        return PrecisionChoice(requested, "set in the config")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "the GPU supports bf16")
        return PrecisionChoice("fp16", "the GPU has no bf16: fp16 with loss scaling")
    if device_type != "cpu":
        return PrecisionChoice("fp32", f"{device_type}: fp32")
    instructions = cpu_bf16_instructions()
    if not instructions:
        return PrecisionChoice("fp32", "the CPU has no bf16 matrix instructions")
    if processes > 1 or speedup is None:
        return PrecisionChoice(
            "fp32",
            f"the CPU has {', '.join(instructions)}, but no probe step was run "
            f"({'several processes' if processes > 1 else 'no model given'})",
        )
    ratio = speedup()
    verdict = "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32"
    return PrecisionChoice(
        verdict,
        f"the CPU has {', '.join(instructions)} and a training pass of this model ran "
        f"{ratio:.2f}× the fp32 speed in bf16 (bf16 from {BF16_MIN_SPEEDUP}×)",
    )
