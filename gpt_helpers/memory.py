"""How much memory a training run needs, before you start it, and how much it really took.

A training step holds four things in memory:

* **weights** — 4 bytes per parameter (fp32 master weights, also under bf16/fp16 mixed precision, which adds a
  2-byte working copy of every matrix that takes part in the backward pass);
* **gradients** — 4 bytes per *trainable* parameter;
* **optimizer state** — AdamW keeps two fp32 moments: 8 bytes per trainable parameter (SGD with momentum: 4);
* **activations** — what the forward pass saves for the backward pass. Counted from the real structure of GPT-2
  and of Llama-family models such as SmolLM2 (see :func:`activation_bytes`); for small models the
  ``batch × sequence × vocabulary`` logits and their gradients dominate.

:func:`estimate_training_memory` adds these up; :func:`measure_peak_memory` measures the real peak (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the allocation events of PyTorch's profiler). The tests hold the
estimate to the measured peak of real training steps.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .architecture import Architecture, architecture, block_projections, meta_model, transformer_blocks
from .errors import ConfigError, ModelLoadError
from .models import (
    FAMILIES,
    GPT2_FAMILY,
    OFFLINE_MODELS,
    SMOLLM2_FAMILY,
    count_parameters,
    family_config,
    resolve_model_path,
)

GIB = 1024**3
MIB = 1024**2
#: Bytes of one activation element for each training precision (mixed precision computes in 16 bits).
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Optimizer state per trainable parameter: AdamW's two fp32 moments; SGD's one momentum buffer.
OPTIMIZER_BYTES = {"adamw": 8, "sgd": 4}
MODES = ("full", "frozen", "lora")
#: Memory of common GPUs as ``nvidia-smi`` reports it (MiB).
GPUS = {"T4 16 GB": 15_360, "L4 24 GB": 23_034, "A100 40 GB": 40_960, "A100 80 GB": 81_920, "H100 80 GB": 81_559}
#: Kept free on a GPU for the CUDA context, kernels and the caching allocator's slack.
GPU_RESERVE_BYTES = 1 * GIB


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory one training step needs, in bytes, by component."""

    model: str
    parameters: int
    trainable_parameters: int
    batch_size: int
    seq_len: int
    precision: str
    mode: str
    gradient_checkpointing: bool
    base_precision: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    def fits(self, gpu_mib: int) -> bool:
        """Whether the run fits a GPU of ``gpu_mib`` MiB, keeping :data:`GPU_RESERVE_BYTES` free."""
        return self.total <= gpu_mib * MIB - GPU_RESERVE_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def __str__(self) -> str:
        setup = (
            f"{self.model}: {self.mode} training, {self.trainable_parameters:,} of {self.parameters:,} parameters "
            f"trainable, batch {self.batch_size} × {self.seq_len} tokens, {self.precision}"
            f"{', gradient checkpointing' if self.gradient_checkpointing else ''}"
        )
        parts = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("total", self.total),
        ]
        return "\n".join([setup] + [f"  {name:<16}{format_bytes(value):>12}" for name, value in parts])


@dataclass
class PeakMemory:
    """The measured peak of a function: bytes allocated above the level at its start, and how it was measured."""

    peak_bytes: int
    device: str
    method: str
    result: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"peak {format_bytes(self.peak_bytes)} above the start ({self.device}, {self.method})"


def format_bytes(value: float) -> str:
    """Bytes as GiB (from 1 GiB) or MiB.

    >>> format_bytes(3 * 1024**3), format_bytes(5 * 1024**2)
    ('3.00 GiB', '5.0 MiB')
    """
    return f"{value / GIB:.2f} GiB" if abs(value) >= GIB else f"{value / MIB:.1f} MiB"


# ------------------------------------------------------------------------------------------ the model's shape
def _config_of(model_or_config_or_name: Any) -> tuple[PretrainedConfig, str]:
    source = model_or_config_or_name
    if isinstance(source, PretrainedConfig):
        return source, getattr(source, "name_or_path", "") or source.model_type
    if isinstance(source, torch.nn.Module):
        config = source.config  # a PeftModel forwards .config to its base model
        return config, getattr(config, "name_or_path", "") or type(source).__name__
    name = str(source)
    if name in GPT2_FAMILY or name in SMOLLM2_FAMILY:
        return family_config(name), name
    if name in OFFLINE_MODELS or os.path.isdir(name):
        return AutoConfig.from_pretrained(resolve_model_path(name)), name
    raise ModelLoadError(
        f"Cannot size '{name}' offline: it is not a GPT-2 family name ({', '.join(GPT2_FAMILY)}), a course model "
        f"({', '.join(OFFLINE_MODELS)}) or a local model folder. Pass a model, its config, or one of those names."
    )


@dataclass(frozen=True)
class _Shape:
    """What the estimate needs of an architecture, read from an instance on the 'meta' device (no memory used)."""

    arch: Architecture
    total: int
    block: int
    block_matrices: int
    final_norm: int
    head_matrix: int
    attention: str
    projections: dict[str, tuple[int, int, str]]  # path in a block: (fan_in, fan_out, "attention" | "mlp")


def _shape(config: PretrainedConfig) -> _Shape:
    model = meta_model(config)
    arch = architecture(config)
    if arch.model_type != "gpt2" and not (arch.gated_mlp and arch.norm == "RMSNorm" and arch.positions == "rotary"):
        raise ConfigError(
            f"The memory planner models GPT-2 and Llama-family blocks (RMSNorm, rotary positions, gated MLP, such as "
            f"SmolLM2); this model is '{arch.model_type}'. Measure it instead: "
            "gpt_helpers.memory.measure_peak_memory(lambda: train(...))."
        )
    block = transformer_blocks(model)[0]
    modules = dict(block.named_modules())
    projections = {}
    for path, part in block_projections(model).items():
        weight = modules[path].weight
        fan_in, fan_out = (
            (weight.shape[0], weight.shape[1])
            if isinstance(modules[path], Conv1D)
            else (weight.shape[1], weight.shape[0])
        )
        projections[path] = (fan_in, fan_out, part)
    norm = next(
        m
        for name, m in model.named_modules()
        if name
        and "norm" in type(m).__name__.lower()
        and not any(name.startswith(p) for p in ("transformer.h.", "model.layers."))
    )
    return _Shape(
        arch=arch,
        total=arch.parameters,
        block=count_parameters(block).total,
        block_matrices=sum(p.numel() for p in block.parameters() if p.ndim == 2),
        final_norm=count_parameters(norm).total,
        head_matrix=model.get_output_embeddings().weight.numel(),
        attention=model.config._attn_implementation,
        projections=projections,
    )


def _targeted(shape: _Shape, lora_targets: Sequence[str] | None) -> dict[str, tuple[int, int, str]]:
    """The projections of one block that LoRA adapts (by the suffix names PEFT matches)."""
    if lora_targets is None:
        return {path: spec for path, spec in shape.projections.items() if spec[2] == "attention"}
    found = {
        path: spec
        for path, spec in shape.projections.items()
        if any(
            path == target or path.endswith("." + target) or path.split(".")[-1] == target for target in lora_targets
        )
    }
    if not found:
        raise ConfigError(
            f"No projection of this model's blocks is named {list(lora_targets)}; its projections are "
            f"{', '.join(shape.projections)}."
        )
    return found


# ------------------------------------------------------------------------------------------ activations
def _gpt2_block_bytes(
    config: PretrainedConfig,
    targets: dict[str, tuple[int, int, str]],
    *,
    attention_kernel: str,
    seq_len: int,
    precision: str,
    device: str,
    mode: str,
    lora_rank: int,
    lora_dropout: float,
) -> float:
    """Bytes one GPT-2 block saves for backward, per token (measured op by op with saved-tensor hooks).

    Residual stream (fp32 even under autocast): the inputs of ``ln_1`` and ``ln_2`` (2h). In the compute
    precision: the inputs of ``c_attn`` and ``c_fc`` (h each) and of the MLP's ``c_proj`` (4h); attention 6h
    (q, k, v, contiguous copies, output; SDPA's fused kernels never store the s × s matrix); GPT-2's ``gelu_new``
    is a Python formula that saves four 4h tensors. Frozen matrices (LoRA) save no input; each LoRA adapter saves
    its input (and with dropout the mask and the dropped input) and its rank-sized output. CPU's SDPA falls back to
    the plain-math kernel when attention dropout is on (as does ``attn_implementation='eager'``), which stores
    three s × s matrices per head.
    """
    h = config.n_embd
    inner = config.n_inner or 4 * h
    compute = COMPUTE_BYTES[precision]
    mask = 1 if device == "cuda" else compute  # CUDA dropout masks are bool; CPU's are in the compute dtype
    math_attention = attention_kernel == "eager" or (device == "cpu" and config.attn_pdrop > 0)
    attention = 4 * h if math_attention else 6 * h
    activation = 4 * inner if config.activation_function == "gelu_new" else inner
    saved = 4 * 2 * h + compute * (attention + activation)
    if math_attention:  # softmax output, dropout mask, dropped weights; softmax runs in fp32 under autocast
        saved += 4 * 3 * config.n_head * seq_len
    if mode == "lora":  # each adapter: its input (with dropout also the mask) and its rank-sized output
        saved += sum(compute * ((2 if lora_dropout else 1) * fan_in + lora_rank) for fan_in, _, _ in targets.values())
    else:
        saved += compute * (h + h + inner)  # inputs of c_attn, c_fc and the MLP's c_proj, for weight gradients
    if config.resid_pdrop > 0:
        saved += mask * 2 * h  # the residual dropouts after attention and after the MLP
    return saved


#: Which tensor each Llama projection reads: the first norm's output, the attention output, the second norm's
#: output, or the gated product.
_LLAMA_INPUTS = {
    "q_proj": "norm1",
    "k_proj": "norm1",
    "v_proj": "norm1",
    "o_proj": "attention",
    "gate_proj": "norm2",
    "up_proj": "norm2",
    "down_proj": "product",
}


def _llama_block_bytes(
    arch: Architecture,
    targets: dict[str, tuple[int, int, str]],
    *,
    precision: str,
    mode: str,
    lora_rank: int,
    lora_dropout: float,
) -> float:
    """Bytes one Llama-family block (RMSNorm, rotary positions, grouped-query SDPA attention, gated MLP) saves for
    backward, per token (measured op by op with saved-tensor hooks on CPU).

    Each RMSNorm saves its fp32 input, and its normalised value when its weight trains. Under autocast every
    linear layer casts its input for itself, so q, k and v each keep a 16-bit copy of the normalised input (fp32:
    one shared tensor). Attention keeps the rotated q and k, v (key-value width: they are not repeated for the
    query heads) and its output; the MLP keeps gate, up, SiLU(gate) and their product (down_proj's input).
    Frozen projections keep no input; an adapter keeps its input (a cast under autocast; with dropout the fp32
    mask and the dropped input) and its rank-sized output.
    """
    h, kv, inner, compute = arch.hidden_size, arch.kv_heads * arch.head_dim, arch.mlp_size, COMPUTE_BYTES[precision]
    half = compute == 2
    attention = compute * (2 * arch.heads * arch.head_dim + 2 * kv) + 4 * arch.heads  # q, k, v, output, log-sum-exp
    if mode != "lora":
        norms = 2 * (4 * h + 4 * h)
        inputs = compute * h * (3 + 2) if half else 4 * h * 2  # q/k/v and gate/up read the normalised inputs
        return norms + inputs + attention + compute * 4 * inner
    saved = 2 * 4 * h + attention + compute * 3 * inner  # norms' inputs; the frozen MLP keeps gate, SiLU(gate), up
    shared = set()
    for path, (fan_in, _, _) in targets.items():
        if lora_dropout:
            saved += 4 * fan_in + compute * fan_in + compute * lora_rank  # mask, dropped input (or its cast), output
        elif half:
            saved += compute * (fan_in + lora_rank)  # the adapter's own cast of its input
        else:
            saved += 4 * lora_rank
            shared.add(_LLAMA_INPUTS.get(path.split(".")[-1], path))
    widths = {"norm1": h, "norm2": h, "product": inner, "attention": 0}  # the attention output is kept anyway
    return saved + sum(4 * widths.get(source, h) for source in shared)


def activation_bytes(
    config: PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    mode: str = "full",
    backward_blocks: int | None = None,
    gradient_checkpointing: bool = False,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    lora_dropout: float = 0.0,
    device: str = "cuda",
) -> int:
    """Peak activation bytes of one training step with :func:`gpt_helpers.train`'s loss, for GPT-2 and Llama-family
    models.

    ``backward_blocks``: how many top blocks the backward pass goes through (all by default; a frozen lower
    part saves nothing). Gradient checkpointing keeps only each block's input and recomputes one block at a time.
    The loss adds ``batch × seq × vocab`` terms at the start of backward: the fp32 log-probabilities, their gradient
    and the logits' gradient (with 16-bit logits also that gradient cast back to 16 bits). The logits themselves are
    freed by then: the loop keeps only the summed loss.

    >>> from gpt_helpers.models import gpt2_family_config
    >>> activation_bytes(gpt2_family_config("gpt2"), batch_size=1, seq_len=1024) // 2**20
    1693
    """
    shape = _shape(config)
    arch = shape.arch
    blocks = arch.layers if backward_blocks is None else backward_blocks
    compute = COMPUTE_BYTES[precision]
    targets = _targeted(shape, lora_targets) if mode == "lora" else {}
    if arch.model_type == "gpt2":
        block = _gpt2_block_bytes(
            config,
            targets,
            attention_kernel=shape.attention,
            seq_len=seq_len,
            precision=precision,
            device=device,
            mode=mode,
            lora_rank=lora_rank,
            lora_dropout=lora_dropout,
        )
        head = 4 * arch.hidden_size + compute * arch.hidden_size  # inputs of ln_f and lm_head
        embeddings = 8 if mode == "full" else 0  # token ids, for the embedding gradient
        if mode == "full" and config.embd_pdrop > 0:
            embeddings += (1 if device == "cuda" else compute) * arch.hidden_size
    else:
        block = _llama_block_bytes(
            arch, targets, precision=precision, mode=mode, lora_rank=lora_rank, lora_dropout=lora_dropout
        )
        # the final norm's input (and, when it trains, its normalised value and the head's input)
        head = 4 * arch.hidden_size if mode == "lora" else (8 + compute) * arch.hidden_size
        embeddings = 8 if mode == "full" else 0
    loss_peak = arch.vocab_size * (3 * 4 + (compute if compute < 4 else 0))
    if gradient_checkpointing and blocks:
        # block inputs stay; one block is recomputed at a time, after the loss buffers but the logits are freed
        peak = blocks * 4 * arch.hidden_size + max(loss_peak, block + compute * arch.vocab_size)
    else:
        peak = blocks * block + loss_peak
    return int(batch_size * seq_len * (peak + head + embeddings))


#: ``gpt2_activation_bytes`` is the GPT-2 case of :func:`activation_bytes` (its earlier name).
gpt2_activation_bytes = activation_bytes


# ------------------------------------------------------------------------------------------ the estimate
#: Bytes per parameter of frozen weights by how they are stored: fp32, bf16, or 4-bit NF4 (QLoRA; bitsandbytes
#: keeps a 4-byte scale per 64 weights, so 0.5 + 4/64 bytes).
BASE_BYTES = {"fp32": 4.0, "bf16": 2.0, "4bit": 0.5625}


def _trainable(
    shape: _Shape,
    mode: str,
    trainable_fraction: float | None,
    trainable_blocks: int,
    lora_rank: int,
    lora_targets: Sequence[str] | None,
) -> int:
    if mode == "full":
        return shape.total
    if mode == "frozen":
        if trainable_fraction is not None:
            return int(round(trainable_fraction * shape.total))
        return trainable_blocks * shape.block + shape.final_norm
    targets = _targeted(shape, lora_targets)
    return shape.arch.layers * sum(lora_rank * (fan_in + fan_out) for fan_in, fan_out, _ in targets.values())


def _check_arguments(
    batch_size: int, seq_len: int, precision: str, mode: str, optimizer: str, device: str, base_precision: str
) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be at least 1, not {batch_size} and {seq_len}.")
    for name, value, choices in (
        ("precision", precision, COMPUTE_BYTES),
        ("mode", mode, MODES),
        ("optimizer", optimizer, OPTIMIZER_BYTES),
        ("device", device, ("cuda", "cpu")),
        ("base_precision", base_precision, BASE_BYTES),
    ):
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}.")
    if base_precision != "fp32" and mode == "full":
        raise ConfigError(
            "base_precision applies to the frozen weights of mode='lora' or 'frozen'; full training "
            "keeps fp32 master weights."
        )


def estimate_training_memory(
    model_or_config_or_name: Any,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    mode: str = "full",
    trainable_fraction: float | None = None,
    trainable_blocks: int = 1,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    lora_dropout: float = 0.0,
    base_precision: str = "fp32",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimate the memory of training a GPT-2 or Llama-family model (SmolLM2…) with :func:`gpt_helpers.train`.

    ``model_or_config_or_name``: a model, its config, a GPT-2 family name (``"gpt2-medium"``), a course model's
    name or a local folder (nothing is downloaded, no weights are loaded). ``mode``: ``"full"`` (every parameter
    trains), ``"frozen"`` (the top ``trainable_blocks`` blocks and the final norm train; ``trainable_fraction``
    overrides the count of trainable parameters) or ``"lora"`` (adapters of rank ``lora_rank`` on ``lora_targets``,
    by default every attention projection, as :func:`~gpt_helpers.strategies.apply_lora` does).
    ``base_precision`` is how the frozen weights are stored: ``"fp32"`` (as ``train`` keeps them), ``"bf16"``, or
    ``"4bit"`` (QLoRA's NF4). ``device`` matters only for details (CPU dropout masks and attention kernels).
    Counts eager PyTorch; ``torch.compile`` fuses operations and usually saves less, so there the estimate is an
    upper bound. Measured on CPU: within 15% of the peak of ``train`` for full, frozen, LoRA, checkpointed,
    dropout and bf16 runs of GPT-2 and Llama models, SmolLM2-135M included (``tests/test_memory.py``).

    >>> estimate = estimate_training_memory("gpt2", batch_size=8, seq_len=1024, precision="bf16")
    >>> round(estimate.total / 2**30, 1), estimate.fits(GPUS["T4 16 GB"])
    (12.1, True)
    """
    _check_arguments(batch_size, seq_len, precision, mode, optimizer, device, base_precision)
    config, label = _config_of(model_or_config_or_name)
    shape = _shape(config)
    layers = shape.arch.layers
    if not 1 <= trainable_blocks <= layers:
        raise ConfigError(
            f"trainable_blocks must be between 1 and {layers} (the model's blocks), not {trainable_blocks}."
        )
    if trainable_fraction is not None and not 0 < trainable_fraction <= 1:
        raise ConfigError(f"trainable_fraction must be in (0, 1], not {trainable_fraction}.")
    trainable = _trainable(shape, mode, trainable_fraction, trainable_blocks, lora_rank, lora_targets)
    backward_blocks = trainable_blocks if mode == "frozen" else layers
    if mode == "full":
        weights = 4 * shape.total
    elif mode == "frozen":
        weights = 4 * trainable + BASE_BYTES[base_precision] * (shape.total - trainable)
    else:  # the adapters in fp32 beside the whole base model
        weights = 4 * trainable + BASE_BYTES[base_precision] * shape.total
    if precision != "fp32" and base_precision == "fp32":  # autocast's 16-bit copies of the matrices backward uses
        weights += 2 * (backward_blocks * shape.block_matrices + shape.head_matrix)
    activations = activation_bytes(
        config,
        batch_size=batch_size,
        seq_len=seq_len,
        precision=precision,
        mode=mode,
        backward_blocks=backward_blocks,
        gradient_checkpointing=gradient_checkpointing,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        device=device,
    )
    return MemoryEstimate(
        model=label,
        parameters=shape.total,
        trainable_parameters=trainable,
        batch_size=batch_size,
        seq_len=seq_len,
        precision=precision,
        mode=mode,
        gradient_checkpointing=gradient_checkpointing,
        base_precision=base_precision,
        weights=int(weights),
        gradients=4 * trainable,
        optimizer_state=OPTIMIZER_BYTES[optimizer] * trainable,
        activations=activations,
    )


def gpt2_family_table(
    batch_size: int = 8, seq_len: int = 1024, precision: str = "bf16", *, lora_rank: int = 8, family: str = "gpt2"
) -> list[dict[str, Any]]:
    """Size every member of a model family offline (``"gpt2"`` or ``"smollm2"``): parameters, file size, and
    training memory per strategy.

    Each row: ``model``, ``parameters``, ``disk_fp32`` / ``disk_fp16`` (bytes of a safetensors file),
    ``full`` / ``frozen`` (top block trains) / ``lora`` (:class:`MemoryEstimate`), and ``fits_full`` /
    ``fits_frozen`` / ``fits_lora`` (the GPUs of :data:`GPUS` it fits on, 1 GiB kept free).

    >>> rows = gpt2_family_table(batch_size=8, seq_len=1024)
    >>> [row["model"] for row in rows][-1], rows[0]["parameters"]
    ('gpt2-xl', 81912576)
    """
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}.")
    rows = []
    for name in FAMILIES[family]:
        estimates = {
            mode: estimate_training_memory(
                name, batch_size=batch_size, seq_len=seq_len, precision=precision, mode=mode, lora_rank=lora_rank
            )
            for mode in MODES
        }
        parameters = estimates["full"].parameters
        row: dict[str, Any] = {
            "model": name,
            "parameters": parameters,
            "disk_fp32": 4 * parameters,
            "disk_fp16": 2 * parameters,
        }
        for mode, estimate in estimates.items():
            row[mode] = estimate
            row[f"fits_{mode}"] = [gpu for gpu, mib in GPUS.items() if estimate.fits(mib)]
        rows.append(row)
    return rows


def family_table_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`gpt2_family_table` as a Markdown table (memory in GiB, smallest GPU that fits)."""

    def smallest(gpus: list[str]) -> str:
        return gpus[0] if gpus else "none listed"

    lines = [
        "| model | parameters | file fp32 / fp16 | full | smallest GPU | frozen body | LoRA | smallest GPU (LoRA) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e6:,.0f}M | {format_bytes(row['disk_fp32'])} / "
            f"{format_bytes(row['disk_fp16'])} | {format_bytes(row['full'].total)} | {smallest(row['fits_full'])} | "
            f"{format_bytes(row['frozen'].total)} | {format_bytes(row['lora'].total)} | {smallest(row['fits_lora'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def _silenced_stderr():
    """Send file descriptor 2 to /dev/null for the duration (C++ code bypasses Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under PyTorch's profiler and replay every CPU allocation and free in time order.

    The profiler records each allocation of PyTorch's CPU allocator with its size (frees as negative sizes),
    so the running sum is exactly the bytes held by tensors, like CUDA's allocated-bytes counter — unlike
    the process's RSS, which also moves with malloc's caching and Python objects.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _silenced_stderr():  # the profiler's C++ side prints start/stop notices straight to file descriptor 2
        profiler.start()
    try:
        result = fn()
    finally:
        with _silenced_stderr():
            profiler.stop()
    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return result, peak


def measure_peak_memory(fn: Callable[[], Any], *, device: str | None = None) -> PeakMemory:
    """Run ``fn()`` and measure the peak of tensor memory above the level when it started.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the profiler's allocation events (see
    :func:`_cpu_peak`), which slow ``fn`` down a little. ``fn``'s return value is kept in ``.result``.

    >>> measure_peak_memory(lambda: torch.zeros(1024, 1024), device="cpu").peak_bytes
    4194304
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gc.collect()  # garbage of earlier work freed during the measurement would count against it
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return PeakMemory(torch.cuda.max_memory_allocated() - start, "cuda", "torch.cuda.max_memory_allocated", result)
    if device != "cpu":
        raise ConfigError(f"measure_peak_memory measures 'cuda' or 'cpu', not {device!r}.")
    result, peak = _cpu_peak(fn)
    return PeakMemory(peak, "cpu", "profiler allocation events", result)
