"""gpt_helpers.evaluation: token-weighted loss and perplexity, accuracy, generation."""

from __future__ import annotations

import math

import pytest
import torch

from gpt_helpers import evaluate, generate, prepare_dataset
from gpt_helpers.errors import GPTHelpersError

from conftest import make_tiny_gpt2, make_tiny_llama

TEXTS = [
    "Great medicine.",
    "It helped my migraines within a week, but I had a dry mouth and trouble sleeping for the first few days.",
    "No effect at all.",
    "I would recommend it to anyone with anxiety; the side effects were mild and went away.",
    "Terrible.",
]


def _hand_loss_and_accuracy(model, dataset) -> tuple[float, float, int]:
    """Sum of -log p(next token) over every real target token, one token at a time."""
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            length = int(item["attention_mask"].sum())
            ids = item["input_ids"][:length].unsqueeze(0)
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for position in range(length - 1):
                target = int(item["labels"][position + 1])
                if target == -100:
                    continue
                total -= float(log_probs[position, target])
                correct += int(log_probs[position].argmax()) == target
                count += 1
    return total / count, correct / count, count


def test_perplexity_is_exp_of_token_weighted_mean_loss_with_padding(tokenizer):
    model = make_tiny_gpt2(tokenizer, seed=3).eval()
    dataset, report = prepare_dataset(tokenizer, TEXTS, block_size=24, mode="pad")
    assert report.rows_truncated == 1  # one row is cut at 24 tokens; the others are padded to unequal lengths
    loss, accuracy, count = _hand_loss_and_accuracy(model, dataset)
    result = evaluate(model, dataset, batch_size=2)
    assert result.tokens == count == sum(int(m.sum()) - 1 for m in dataset.attention_mask)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.accuracy == pytest.approx(accuracy)
    # The mean of per-batch means weights the short last batch like a full one: a different (wrong) number.
    batch_means = []
    for start in range(0, len(dataset), 2):
        part = torch.utils.data.Subset(dataset, range(start, min(start + 2, len(dataset))))
        batch_means.append(_hand_loss_and_accuracy(model, part)[0])
    assert abs(sum(batch_means) / len(batch_means) - result.loss) > 1e-3
    assert evaluate(model, dataset, batch_size=5).loss == pytest.approx(result.loss, rel=1e-5)  # batching-free


def test_perplexity_on_packed_blocks_and_other_architecture(tokenizer):
    model = make_tiny_llama(tokenizer).eval()
    dataset, _ = prepare_dataset(tokenizer, TEXTS * 2, block_size=16)
    loss, accuracy, count = _hand_loss_and_accuracy(model, dataset)
    result = evaluate(model, dataset, batch_size=3)
    assert result.tokens == count == len(dataset) * 15
    assert result.loss == pytest.approx(loss, rel=1e-5) and result.accuracy == pytest.approx(accuracy)
    assert result.loss == pytest.approx(math.log(len(tokenizer)), abs=0.5)  # an untrained model: about uniform


def test_max_batches_limits_tokens(tokenizer):
    model = make_tiny_gpt2(tokenizer)
    dataset, _ = prepare_dataset(tokenizer, TEXTS * 4, block_size=8)
    assert evaluate(model, dataset, batch_size=2, max_batches=3).tokens == 3 * 2 * 7


def test_accuracy_of_a_model_that_always_predicts_one_token(tokenizer):
    class Constant(torch.nn.Module):
        """Logits that always favour token 0 (EOS)."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., 0] = 10.0
            return type("Output", (), {"logits": logits})

    dataset, _ = prepare_dataset(tokenizer, ["one", "two words", "three more words"], block_size=8, mode="pad")
    targets = [int(t) for row in dataset.labels for t in row[1:] if t != -100]
    result = evaluate(Constant(), dataset)
    assert result.tokens == len(targets)
    assert result.accuracy == pytest.approx(targets.count(0) / len(targets)) and 0 < result.accuracy < 1


def test_empty_or_fully_masked_data_is_refused(tokenizer):
    model = make_tiny_gpt2(tokenizer)
    dataset, _ = prepare_dataset(tokenizer, ["a b c d e f g h i j"], block_size=4)
    dataset.labels[:] = -100
    with pytest.raises(GPTHelpersError, match="every label is masked"):
        evaluate(model, dataset)


def test_generate_returns_strings_and_greedy_is_deterministic(tokenizer):
    model = make_tiny_gpt2(tokenizer, seed=5)
    prompts = ["The side effects", "I took it for"]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, seed=None)
    assert isinstance(greedy, list) and len(greedy) == 2 and all(isinstance(t, str) for t in greedy)
    assert greedy == generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, seed=123)
    assert all(text for text in greedy)
    # A batch with padding gives each prompt the same continuation as alone (left padding).
    assert generate(model, tokenizer, prompts[1], max_new_tokens=6, do_sample=False) == greedy[1:]
    sampled = generate(model, tokenizer, prompts[0], max_new_tokens=8, seed=7)
    assert sampled == generate(model, tokenizer, prompts[0], max_new_tokens=8, seed=7)
    assert tokenizer.padding_side == "right" and model.training  # restored


def test_empty_prompt_starts_from_eos(tokenizer):
    model = make_tiny_gpt2(tokenizer, seed=5)
    from_empty = generate(model, tokenizer, ["", "I took it for"], max_new_tokens=5, do_sample=False)
    eos_prompt = torch.tensor([[tokenizer.eos_token_id]])
    expected = model.generate(
        eos_prompt,
        attention_mask=torch.ones_like(eos_prompt),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert from_empty[0] == tokenizer.decode(expected[0, 1:], skip_special_tokens=True) != ""
