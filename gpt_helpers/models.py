"""Load causal language models and tokenizers, read their architecture, count parameters, size the GPT-2 family.

One call loads a model by its hub name (``"gpt2"``), a local folder, the short name of the model that ships
with the course (``"tiny-gpt2-base"``) or of a real model converted from an installed package
(``"smollm2-135m-instruct"``, see :mod:`gpt_helpers.packaged`). Nothing here reaches a model hub unless you
name a hub model.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import ModelLoadError
from .packaged import PACKAGED, ensure_converted

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

#: Models and tokenizers that ship inside the package, by short name.
BUNDLED = {
    "tiny-gpt2-base": ASSETS_DIR / "tiny-gpt2-base",
    "gpt2-tokenizer": ASSETS_DIR / "gpt2-tokenizer",
}

DEFAULT_MODEL = "tiny-gpt2-base"

#: The GPT-2 family's published architectures (from the models' config.json files on the hub).
GPT2_FAMILY: dict[str, dict[str, int]] = {
    "distilgpt2": {"n_layer": 6, "n_embd": 768, "n_head": 12},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
}


#: Every short name the course loads offline: the bundled models and the packaged (converted) ones.
OFFLINE_MODELS = ("tiny-gpt2-base", *PACKAGED)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn a short name into its folder (converting a packaged model the first time); return anything else unchanged.

    >>> resolve_model_path("tiny-gpt2-base").endswith("tiny-gpt2-base")
    True
    """
    name = str(name_or_path)
    if name in PACKAGED:
        return str(ensure_converted(name))
    if name in BUNDLED:
        folder = BUNDLED[name]
        if not (folder / "config.json").exists() and not (folder / "tokenizer.json").exists():
            raise ModelLoadError(
                f"The bundled model '{name}' is missing from {folder}. Reinstall the package "
                "(pip install -e .) or rebuild it with: python scripts/pretrain_base.py"
            )
        return str(folder)
    return name


def _is_local(name: str) -> bool:
    return os.path.isdir(name) or name.startswith((".", "/", "~")) or os.sep in name and os.path.exists(name)


def _hub_error(name: str, what: str, cause: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load the {what} '{name}': it is not a local folder, not a bundled model "
        f"({', '.join(OFFLINE_MODELS)}), and the model hub could not provide it ({type(cause).__name__}: "
        f"{str(cause).splitlines()[0] if str(cause) else 'no details'}). "
        f"Offline? Use the bundled base model instead: load_model('{DEFAULT_MODEL}') "
        "(or --model tiny-gpt2-base on the command line), or pass the path of a folder that holds "
        "config.json and model.safetensors."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection within ``timeout`` seconds (False when HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(loader, name: str, what: str, **kwargs):
    """Load from the local cache if present, else from the hub — failing fast (no retries) when it is unreachable."""
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise _hub_error(name, what, ConnectionError("the hub is unreachable and the model is not in the local cache"))
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error(name, what, error) from None


#: Files of which a tokenizer folder holds at least one (fast, BPE, SentencePiece, WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
)


def _check_local_folder(path: str, what: str) -> None:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"The {what} folder '{path}' does not exist. Check the path, or use '{DEFAULT_MODEL}'.")
    if not folder.is_dir():
        raise ModelLoadError(f"'{path}' is a file, not a {what} folder. Pass the folder that contains config.json.")
    if what == "tokenizer" and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # Without this check transformers builds an empty tokenizer that turns every text into no tokens.
        raise ModelLoadError(
            f"The folder '{path}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Save the tokenizer "
            "next to the model with tokenizer.save_pretrained(folder) (gpt_helpers.train does this)."
        )
    if what == "model" and not (folder / "config.json").exists():
        raise ModelLoadError(
            f"The model folder '{path}' has no config.json, so it is not a saved Hugging Face model. "
            "Save models with model.save_pretrained(folder) (gpt_helpers.train does this), or point at the "
            "folder that has config.json."
        )
    if what == "model":
        _check_config_json(folder / "config.json")
        has_safe = any(folder.glob("*.safetensors"))
        has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
        if not has_safe and has_pickle:
            raise ModelLoadError(
                f"The model folder '{path}' holds only pickle-based weights (.bin/.pt), which can run code when "
                "loaded, so they are refused. Convert them where you trust the source: "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)."
            )
        if not has_safe:
            raise ModelLoadError(
                f"The model folder '{path}' has config.json but no model.safetensors. "
                "Copy the weights file into it, or use build_model_from_config() for a randomly initialised model."
            )


def _check_config_json(file: Path) -> None:
    """Refuse a damaged config.json by name (transformers would blame the tokenizer, which reads it first)."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"'{file}' is not valid JSON ({error}). The file is damaged or was cut short: copy or save the model again."
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"'{file}' holds a JSON {type(config).__name__}, not the object of a model configuration. "
            "Copy or save the model again."
        )


def load_tokenizer(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a fast tokenizer and give it a pad token if it has none.

    GPT-2 has no pad token; we reuse EOS as pad *and* mask padding by the attention mask (never by id),
    so EOS stays a learned label. See :func:`gpt_helpers.data.labels_from_attention_mask`.

    >>> tok = load_tokenizer("tiny-gpt2-base")
    >>> tok.pad_token is not None
    True
    """
    path = resolve_model_path(name_or_path)
    options = dict(use_fast=True, trust_remote_code=trust_remote_code)
    if not _is_local(path):
        return ensure_pad_token(_from_hub(AutoTokenizer.from_pretrained, path, "tokenizer", **options))
    _check_local_folder(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"The folder '{path}' does not hold a usable tokenizer ({error}). It needs tokenizer.json "
            "(or vocab.json + merges.txt). Save one with tokenizer.save_pretrained(folder)."
        ) from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set ``pad_token = eos_token`` when the tokenizer has no pad token; return the tokenizer.

    Safe only because the course masks padding with the attention mask: see
    :func:`gpt_helpers.data.labels_from_attention_mask`.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                "The tokenizer has neither a pad nor an EOS token; add one with tokenizer.add_special_tokens()."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    random_init: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in one call.

    ``name_or_path`` is a bundled short name (``"tiny-gpt2-base"``), a local folder, or a hub name
    (``"gpt2"``, ``"distilgpt2"``, …) when the hub is reachable. ``random_init=True`` builds the same
    architecture with fresh random weights: the from-scratch baseline. Weights load as float32 by default
    (master weights for mixed precision). Only safetensors weights are loaded.

    A folder of LoRA adapters (``adapter_config.json``, as ``train`` saves for a LoRA run) loads its base model
    by the name the adapters recorded and folds the adapters in: the result is a plain model.

    >>> model, tokenizer = load_model("tiny-gpt2-base")
    >>> model.config.model_type
    'gpt2'
    """
    path = resolve_model_path(name_or_path)
    local = _is_local(path)
    if local and is_adapter_folder(path):
        return _load_adapter_folder(Path(path), dtype=dtype, trust_remote_code=trust_remote_code)
    if local:
        _check_local_folder(path, "model")
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if random_init:
        load_config = AutoConfig.from_pretrained
        options: dict = dict(trust_remote_code=trust_remote_code)
    else:
        load_config = AutoModelForCausalLM.from_pretrained
        options = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if local:
        try:
            loaded = load_config(path, **options)
        except (OSError, ValueError, SafetensorError) as error:
            raise ModelLoadError(
                f"The model folder '{path}' could not be loaded: {str(error).rstrip('.')}. If a file was damaged or cut short "
                "(an interrupted copy or download), copy or save the model again."
            ) from None
    else:
        loaded = _from_hub(load_config, path, "model", **options)
    model = build_model_from_config(loaded, seed=seed, dtype=dtype) if random_init else loaded
    if (
        str(name_or_path) in OFFLINE_MODELS
    ):  # recorded by adapters and histories: the short name, not this machine's path
        model.config.name_or_path = model.name_or_path = str(name_or_path)
    check_tokenizer_matches(model, tokenizer, source=str(name_or_path))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds LoRA adapters only (``adapter_config.json``, no ``config.json``)."""
    folder = Path(path)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def _load_adapter_folder(folder: Path, *, dtype: torch.dtype, trust_remote_code: bool):
    from peft import PeftModel

    try:
        base_name = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(
            f"'{folder / 'adapter_config.json'}' is damaged or names no base model "
            "(base_model_name_or_path). Save the adapters again with model.save_pretrained(folder)."
        ) from None
    if not base_name:
        raise ModelLoadError(
            f"The adapters in '{folder}' do not say which base model they belong to (their base was "
            "built from a config, not loaded by name). Load that base yourself and attach them: "
            "peft.PeftModel.from_pretrained(base_model, folder)."
        )
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelLoadError(
            f"The adapter folder '{folder}' has no adapter_model.safetensors (pickle-based adapter "
            "weights are refused). Save the adapters again with model.save_pretrained(folder)."
        )
    model, tokenizer = load_model(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return merged, tokenizer


def model_context_length(model_or_config: Any) -> int | None:
    """The longest sequence a model's positions allow (None when unlimited or unknown), whatever the architecture:
    GPT-2's ``n_positions``, Llama's and most others' ``max_position_embeddings``.

    >>> model_context_length(tiny_gpt2_config(n_positions=64))
    64
    """
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_model_from_config(
    config: PretrainedConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture (deterministic for a seed).

    >>> model = build_model_from_config(tiny_gpt2_config())
    >>> count_parameters(model).total > 0
    True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def tiny_gpt2_config(
    vocab_size: int = 512, n_positions: int = 64, n_embd: int = 32, n_layer: int = 2, n_head: int = 2
) -> GPT2Config:
    """A very small GPT-2 configuration for tests and quick experiments."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )


def check_tokenizer_matches(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, source: str = "model"
) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelLoadError(
            f"The tokenizer of '{source}' has {len(tokenizer)} tokens but the model's embedding table has only "
            f"{embeddings} rows, so they do not belong together. Load the tokenizer saved with this model, or call "
            "model.resize_token_embeddings(len(tokenizer)) if you added tokens on purpose."
        )


@dataclass(frozen=True)
class ParameterCount:
    """Total and trainable parameters of a model (shared tensors counted once)."""

    total: int
    trainable: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} ({100 * self.trainable_fraction:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Count parameters once each, even when weights are tied (GPT-2's embedding and head).

    >>> count_parameters(torch.nn.Linear(3, 2))
    ParameterCount(total=8, trainable=8)
    """
    seen: set[int] = set()
    total = trainable = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return ParameterCount(total, trainable)


#: SmolLM2's published architectures (Hugging Face's config.json files): Llama blocks, tied embeddings.
SMOLLM2_FAMILY: dict[str, dict[str, int]] = {
    "HuggingFaceTB/SmolLM2-135M": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "HuggingFaceTB/SmolLM2-360M": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
    },
    "HuggingFaceTB/SmolLM2-1.7B": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
}
FAMILIES = {"gpt2": tuple(GPT2_FAMILY), "smollm2": tuple(SMOLLM2_FAMILY)}


def family_config(name: str) -> PretrainedConfig:
    """The configuration of a GPT-2 or SmolLM2 family member, built offline (no weights).

    >>> family_config("HuggingFaceTB/SmolLM2-360M").num_key_value_heads
    5
    """
    if name in GPT2_FAMILY:
        return gpt2_family_config(name)
    if name not in SMOLLM2_FAMILY:
        raise ModelLoadError(
            f"Unknown family member '{name}'. Choose one of: {', '.join(GPT2_FAMILY)}, {', '.join(SMOLLM2_FAMILY)}."
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        **SMOLLM2_FAMILY[name],
    )


def gpt2_family_config(name: str) -> GPT2Config:
    """The configuration of a GPT-2 family member, built offline."""
    if name not in GPT2_FAMILY:
        raise ModelLoadError(f"Unknown GPT-2 family member '{name}'. Choose one of: {', '.join(GPT2_FAMILY)}.")
    return GPT2Config(vocab_size=50257, n_positions=1024, **GPT2_FAMILY[name])
