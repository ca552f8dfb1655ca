"""What a causal language model is made of, read from its modules rather than assumed to be GPT-2.

The course treats every decoder-only model the same way: token (and maybe position) embeddings, a stack of
transformer blocks, and a head (final norm, and an output layer when it is not tied to the token embeddings).
Each block has an attention part and an MLP part made of linear projections. The helpers here find those parts
in GPT-2 (``transformer.h``, ``c_attn``…), Llama-family models such as SmolLM2 (``model.layers``, ``q_proj``…),
GPT-NeoX and others, so freezing, discriminative learning rates, LoRA targets and the memory planner work on any
of them.

>>> from gpt_helpers.models import tiny_gpt2_config
>>> print(architecture(tiny_gpt2_config(n_layer=2)))
gpt2: 2 layers, width 32, 2 heads, MLP 128, LayerNorm, learned positions, vocabulary 512, context 64 tokens, tied embeddings, 43,904 parameters
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError
from .models import count_parameters, model_context_length

#: Words that mark a block's attention and MLP sub-modules in the architectures transformers ships.
ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "feed_forward", "ffn")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under a PEFT (LoRA) wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks, bottom first (GPT-2 ``transformer.h``, Llama ``model.layers``…).

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> len(transformer_blocks(build_model_from_config(tiny_gpt2_config(n_layer=3))))
    3
    """
    base = base_model(model)
    layers = getattr(base.config, "num_hidden_layers", None)
    for _, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers and layers:
            return module
    raise ConfigError(
        f"Could not find the transformer blocks of {type(base).__name__}: no list of {layers} layers (the config's "
        "num_hidden_layers). The course supports decoder-only models such as GPT-2, GPT-NeoX and Llama."
    )


def model_levels(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Every parameter once, grouped bottom to top: embeddings, block 0 … block L-1, head.

    A tied output layer (GPT-2's ``lm_head`` is ``wte``) belongs to ``embeddings``.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> [name for name, _ in model_levels(build_model_from_config(tiny_gpt2_config()))]
    ['embeddings', 'block 0', 'block 1', 'head']
    """
    base = base_model(model)
    blocks = transformer_blocks(base)
    seen: set[int] = set()

    def take(parameters) -> list[torch.nn.Parameter]:
        fresh = [p for p in parameters if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        return fresh

    block_params = [take(block.parameters()) for block in blocks]
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    embedding_modules = [m for m in base.modules() if isinstance(m, torch.nn.Embedding) and id(m) not in in_blocks]
    embeddings = take(p for module in embedding_modules for p in module.parameters())
    head = take(base.parameters())
    levels = [("embeddings", embeddings)] + [(f"block {i}", params) for i, params in enumerate(block_params)]
    return levels + [("head", head)]


def head_is_tied(model: torch.nn.Module) -> bool:
    """True when the output layer shares its weight with the token embeddings (GPT-2, SmolLM2, many small models)."""
    base = base_model(model)
    output = base.get_output_embeddings()
    return output is not None and output.weight is base.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------ projections
def _is_projection(module: torch.nn.Module) -> bool:
    """A linear layer, or a PEFT adapter layer wrapping one (it keeps the original as ``base_layer``)."""
    return isinstance(module, (torch.nn.Linear, Conv1D)) or isinstance(
        getattr(module, "base_layer", None), (torch.nn.Linear, Conv1D)
    )


def _part_of(name: str) -> str | None:
    """``"attention"`` or ``"mlp"`` for a module path inside a block, by the words of its path."""
    words = name.lower().split(".")[:-1]
    if any(word in part for part in words for word in ATTENTION_WORDS):
        return "attention"
    if any(word in part for part in words for word in MLP_WORDS):
        return "mlp"
    return None


def block_projections(model: torch.nn.Module) -> dict[str, str]:
    """The linear projections of one block: ``{path inside the block: "attention" or "mlp"}``.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> block_projections(build_model_from_config(tiny_gpt2_config()))
    {'attn.c_attn': 'attention', 'attn.c_proj': 'attention', 'mlp.c_fc': 'mlp', 'mlp.c_proj': 'mlp'}
    """
    block = transformer_blocks(model)[0]
    found = {}
    for name, module in block.named_modules():
        if _is_projection(module) and "lora_" not in name and "base_layer" not in name:
            part = _part_of(name)
            if part:
                found[name] = part
    if not any(part == "attention" for part in found.values()):
        raise ConfigError(
            f"Found no attention projections in the blocks of {type(base_model(model)).__name__}. "
            "Name the modules to adapt yourself (target_modules=[...], see print(model))."
        )
    return found


def _short_names(paths: list[str]) -> list[str]:
    """Each path by its last component where that is unique among ``paths``'s block, else by its last two."""
    last = [path.split(".")[-1] for path in paths]
    return [name if last.count(name) == 1 else ".".join(path.split(".")[-2:]) for path, name in zip(paths, last)]


def lora_target_modules(model: torch.nn.Module, *, include_mlp: bool = False) -> list[str]:
    """The module names LoRA adapts by default: every attention projection (query, key, value, output), and with
    ``include_mlp=True`` the MLP's projections too. Names are suffixes that PEFT matches in every block.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> lora_target_modules(build_model_from_config(tiny_gpt2_config()))
    ['c_attn', 'attn.c_proj']
    >>> lora_target_modules(build_model_from_config(tiny_gpt2_config()), include_mlp=True)
    ['c_attn', 'attn.c_proj', 'c_fc', 'mlp.c_proj']
    """
    projections = block_projections(model)
    paths = list(projections)
    names = dict(zip(paths, _short_names(paths)))
    return [names[path] for path, part in projections.items() if part == "attention" or include_mlp]


# ------------------------------------------------------------------------------------------ the facts
@dataclass(frozen=True)
class Architecture:
    """The facts of a causal LM that sizes, memory and lessons need, the same names for every architecture."""

    model_type: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_size: int
    gated_mlp: bool
    norm: str
    positions: str
    vocab_size: int
    context_length: int | None
    tied_embeddings: bool
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        heads = (
            f"{self.heads} heads"
            if self.kv_heads == self.heads
            else f"{self.heads} query / {self.kv_heads} key-value heads"
        )
        context = f"context {self.context_length:,} tokens" if self.context_length else "no fixed context"
        return (
            f"{self.model_type}: {self.layers} layers, width {self.hidden_size}, {heads}, "
            f"{'gated ' if self.gated_mlp else ''}MLP {self.mlp_size:,}, {self.norm}, {self.positions} positions, "
            f"vocabulary {self.vocab_size:,}, {context}, {'tied' if self.tied_embeddings else 'separate'} embeddings, "
            f"{self.parameters:,} parameters"
        )


@functools.lru_cache(maxsize=32)
def _meta_model(config_json: str, config_class: type) -> torch.nn.Module:
    config = config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # some versions leave a tied head untied on the meta device
    return model


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The architecture of ``config`` on PyTorch's 'meta' device: every module and shape, no memory for weights."""
    return _meta_model(config.to_json_string(), type(config))


def architecture(model_or_config: Any) -> Architecture:
    """Read the :class:`Architecture` of a model or a config (a config is instantiated on the meta device).

    >>> from gpt_helpers.models import tiny_gpt2_config
    >>> architecture(tiny_gpt2_config()).positions
    'learned'
    """
    if isinstance(model_or_config, PretrainedConfig):
        config, model = model_or_config, meta_model(model_or_config)
    else:
        model = base_model(model_or_config)
        config = model.config
    blocks = transformer_blocks(model)
    projections = block_projections(model)
    gated = any(
        part == "mlp" and path.split(".")[-1] in ("gate_proj", "w1", "gate_up_proj")
        for path, part in projections.items()
    )
    norms = [type(m).__name__ for m in blocks[0].modules() if "norm" in type(m).__name__.lower()]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and id(m) not in in_blocks]
    rotary = any("rotary" in type(m).__name__.lower() for m in model.modules())
    heads = config.num_attention_heads
    hidden = config.hidden_size
    mlp_size = next(
        (
            getattr(config, name)
            for name in ("intermediate_size", "n_inner", "ffn_dim")
            if isinstance(getattr(config, name, None), int)
        ),
        4 * hidden,
    )
    return Architecture(
        model_type=config.model_type,
        layers=len(blocks),
        hidden_size=hidden,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        mlp_size=mlp_size,
        gated_mlp=gated,
        norm="RMSNorm" if norms and "rms" in norms[0].lower() else "LayerNorm",
        positions="learned" if len(embeddings) > 1 else "rotary" if rotary else "no",
        vocab_size=model.get_input_embeddings().num_embeddings,
        context_length=model_context_length(config),
        tied_embeddings=head_is_tied(model),
        parameters=count_parameters(model).total,
    )
