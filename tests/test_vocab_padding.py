"""Vocabulary padding: the same training as without it, and the padding never leaves train()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpt_helpers import prepare_dataset, train
from gpt_helpers.vocab_padding import PaddedVocabulary

from conftest import make_tiny_gpt2, make_tiny_llama, quick_config


class PaddingWatcher:
    """Records, during training, the logits' vocabulary size and whether the padding rows are still zero."""

    def __init__(self, sample_ids: torch.Tensor, real_size: int):
        self.sample_ids, self.real_size = sample_ids, real_size
        self.logit_sizes: list[int] = []
        self.embedding_rows: list[int] = []
        self.padding_is_zero: list[bool] = []

    def on_step_end(self, state) -> None:
        model = state.model
        weight = model.get_input_embeddings().weight
        self.embedding_rows.append(weight.shape[0])
        self.padding_is_zero.append(bool((weight[self.real_size :] == 0).all()))
        with torch.no_grad():
            self.logit_sizes.append(model(input_ids=self.sample_ids).logits.shape[-1])


def _train(model, tokenizer, data, tmp_path, name: str, callbacks=(), **changes):
    config = quick_config(tmp_path / name, max_steps=3, eval_every=3, save_best=True, save_final=True, **changes)
    return train(model, tokenizer, data, data, config, callbacks=list(callbacks))


def test_padded_training_equals_unpadded_and_hides_the_padding(tokenizer, drug_reviews, tmp_path):
    data, _ = prepare_dataset(tokenizer, drug_reviews["train"][:80], block_size=32)
    real = len(tokenizer)
    # In float64, so that equality means the same arithmetic: the padded and unpadded matrices sum in different
    # orders (another shape, other kernels), which in fp32 moves the weights by ~5e-6 after three Adam steps (Adam
    # divides tiny gradient differences by tiny square roots); in float64 such reassociation is ~1e-16 relative.
    plain = _train(make_tiny_gpt2(tokenizer).double(), tokenizer, data, tmp_path, "plain", pad_vocab_to_multiple_of=0)
    watcher = PaddingWatcher(data.input_ids[:1], real)
    padded = _train(
        make_tiny_gpt2(tokenizer).double(),
        tokenizer,
        data,
        tmp_path,
        "padded",
        [watcher],
        pad_vocab_to_multiple_of=1000,
    )

    assert padded.history.info["padded_vocabulary"] == 9000 and plain.history.info["padded_vocabulary"] is None
    assert watcher.embedding_rows == [9000] * 3, "the model trained with the padded matrix"
    assert watcher.logit_sizes == [real] * 3, "no caller ever sees the padding logits"
    assert all(watcher.padding_is_zero), "the padding rows get no gradient and stay zero"
    # The padding logits are cut off before the softmax, so the arithmetic is the same as without padding.
    for (name, a), b in zip(plain.model.state_dict().items(), padded.model.state_dict().values()):
        assert a.shape == b.shape, name
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert abs(padded.history.eval_records[-1].eval_loss - plain.history.eval_records[-1].eval_loss) < 1e-9

    # The returned model and both saved folders have the real vocabulary, and generation works.
    assert padded.model.config.vocab_size == real and padded.model.get_output_embeddings().weight.shape[0] == real
    for folder in (padded.best_dir, padded.model_dir):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert loaded.config.vocab_size == real and loaded.get_input_embeddings().weight.shape[0] == real
    generated = padded.model.generate(data.input_ids[:1, :8], max_new_tokens=5, do_sample=True, pad_token_id=0)
    assert int(generated.max()) < real


def test_untied_head_is_padded_and_restored(tokenizer):
    model = make_tiny_llama(tokenizer)
    before = model.lm_head.weight.detach().clone()
    padding = PaddedVocabulary(model, 1000)
    assert model.lm_head.weight.shape[0] == 9000 and model.get_input_embeddings().weight.shape[0] == 9000
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tokenizer)
    with padding.real_vocabulary():
        assert model.config.vocab_size == len(tokenizer) and model.lm_head.weight.shape[0] == len(tokenizer)
    assert model.lm_head.weight.shape[0] == 9000, "the padded parameters come back after saving"
    padding.remove()
    padding.remove()  # idempotent
    assert model.lm_head.weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(model.lm_head.weight, before)


def test_failed_run_still_gives_the_model_back_unpadded(tokenizer, drug_reviews, tmp_path):
    data, _ = prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=32)
    model = make_tiny_gpt2(tokenizer)

    class Boom:
        def on_step_end(self, state):
            raise RuntimeError("a callback failed")

    with pytest.raises(RuntimeError, match="a callback failed"):
        _train(model, tokenizer, data, tmp_path, "boom", [Boom()], pad_vocab_to_multiple_of=1000)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) and model.config.vocab_size == len(tokenizer)
