"""gpt_helpers.models: loading by short name and folder, refusals, random init, parameter counts, presets."""

from __future__ import annotations

import time

import pytest
import torch

from gpt_helpers import BUNDLED, count_parameters, load_model, load_tokenizer
from gpt_helpers.errors import ModelLoadError
from gpt_helpers.models import build_model_from_config, gpt2_family_config, tiny_gpt2_config

from conftest import make_tiny_gpt2, make_tiny_llama


def test_load_bundled_model_by_short_name():
    model, tokenizer = load_model("tiny-gpt2-base")
    assert model.config.model_type == "gpt2"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 8192
    assert model.dtype == torch.float32 and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_load_model_from_a_saved_folder(tmp_path, tokenizer, tiny_model):
    folder = tmp_path / "my-model"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, loaded_tokenizer = load_model(str(folder))
    assert len(loaded_tokenizer) == len(tokenizer)
    for (name, expected), (_, actual) in zip(tiny_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(expected, actual), name
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(ids).logits, tiny_model(ids).logits)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_with_only_pickle_weights_is_refused(tmp_path, tokenizer, tiny_model):
    tiny_model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pickle-based weights \(.bin/.pt\)"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer_is_refused_not_given_an_empty_tokenizer(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)  # weights and config, but no tokenizer files
    with pytest.raises(ModelLoadError, match="holds no tokenizer.*tokenizer.save_pretrained"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*tiny-gpt2-base"):
        load_model(str(tmp_path / "missing"))


def test_hub_name_offline_fails_fast_and_names_the_bundled_model():
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model("distilgpt2")
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert "'distilgpt2'" in message and "tiny-gpt2-base" in message


def test_tokenizer_model_mismatch_is_refused(tmp_path, tokenizer):
    small = build_model_from_config(tiny_gpt2_config(vocab_size=512))  # 512 rows, tokenizer has 8,192
    small.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="8192 tokens but the model's embedding table has only 512"):
        load_model(str(tmp_path))


def test_random_init_same_shapes_different_weights():
    pretrained, _ = load_model("tiny-gpt2-base")
    fresh, _ = load_model("tiny-gpt2-base", random_init=True, seed=1)
    again, _ = load_model("tiny-gpt2-base", random_init=True, seed=1)
    pretrained_state, fresh_state = pretrained.state_dict(), fresh.state_dict()
    assert pretrained_state.keys() == fresh_state.keys()
    assert all(pretrained_state[k].shape == fresh_state[k].shape for k in pretrained_state)
    weight = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(pretrained_state[weight], fresh_state[weight])
    assert torch.equal(fresh_state[weight], again.state_dict()[weight])  # deterministic for a seed


def test_count_parameters_counts_tied_weights_once(tokenizer):
    tied = build_model_from_config(tiny_gpt2_config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    d, layer = 32, 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + 2 * 32 + (32 * 128 + 128) + (128 * 32 + 32)
    expected = 512 * d + 64 * d + 2 * layer + 2 * d
    assert count_parameters(tied).total == expected == 43_904
    untied_config = tiny_gpt2_config(vocab_size=512)
    untied_config.tie_word_embeddings = False
    assert count_parameters(build_model_from_config(untied_config)).total == expected + 512 * d
    for parameter in tied.transformer.h.parameters():
        parameter.requires_grad_(False)
    counts = count_parameters(tied)
    assert counts.trainable == expected - 2 * layer and counts.total == expected


def test_gpt2_preset_has_124m_parameters_on_meta_device():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpt2_family_config("gpt2"))
    model.tie_weights()  # transformers 5.0 leaves the head untied on the meta device
    assert count_parameters(model).total == 124_439_808
    with pytest.raises(ModelLoadError, match="Unknown GPT-2 family member 'gpt5'"):
        gpt2_family_config("gpt5")


def test_llama_from_config_runs(tokenizer):
    model = make_tiny_llama(tokenizer)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))


def test_bundled_names_resolve():
    assert set(BUNDLED) >= {"tiny-gpt2-base", "gpt2-tokenizer"}
    assert len(load_tokenizer("gpt2-tokenizer")) == 50257
    assert make_tiny_gpt2(load_tokenizer()).config.vocab_size == 8192
