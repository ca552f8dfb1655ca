"""Measure a language model: token-weighted loss, perplexity, next-token accuracy, and generated text.

Perplexity is ``exp`` of the mean loss *per predicted token* over the whole dataset — not the mean of
per-batch perplexities, and not a mean over batches that weights a short batch like a long one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import document_attention
from .errors import ConfigError, GPTHelpersError
from .models import model_context_length


@dataclass(frozen=True)
class EvalResult:
    """Validation numbers: mean token loss, its perplexity, next-token accuracy and the tokens they cover."""

    loss: float
    perplexity: float
    accuracy: float
    tokens: int

    def __str__(self) -> str:
        if math.isnan(self.perplexity):  # a classifier's: per example, no perplexity
            return f"loss {self.loss:.4f} | accuracy {100 * self.accuracy:.1f}% | {self.tokens:,} examples"
        return (
            f"loss {self.loss:.4f} | perplexity {self.perplexity:.2f} | next-token accuracy "
            f"{100 * self.accuracy:.1f}% | {self.tokens:,} tokens"
        )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of next-token prediction and the mask of tokens that count, both ``(batch, seq - 1)``.

    Position ``t`` predicts label ``t + 1``; labels of -100 (padding) are ignored. The labels are shifted rather
    than the logits, so the largest tensor of a small-model step (batch × seq × vocab) is never copied.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # the last position predicts nothing
    scores = logits.flatten(0, 1)
    if scores.dtype not in (torch.float32, torch.float64):  # 16-bit logits: the softmax in fp32
        scores = scores.float()
    losses = F.cross_entropy(scores, targets.flatten(), ignore_index=-100, reduction="none")
    return losses.view_as(targets)[:, :-1], (targets != -100)[:, :-1]


def target_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of every target and the mask of targets that count: next tokens for a language model (``labels``
    of shape batch × seq, see :func:`token_losses`), or one class per example for a classifier (``labels`` of shape
    batch, ``logits`` batch × classes).

    >>> losses, mask = target_losses(torch.zeros(2, 3), torch.tensor([0, 2]))
    >>> losses.shape, mask.tolist()
    (torch.Size([2]), [True, True])
    """
    if labels.ndim == 1:
        scores = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        return F.cross_entropy(scores, labels, ignore_index=-100, reduction="none"), labels != -100
    return token_losses(logits, labels)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many targets ``labels`` holds: predicted tokens (all but each row's first, and not -100), or examples."""
    return (labels != -100).sum() if labels.ndim == 1 else (labels[:, 1:] != -100).sum()


#: Losses from here on give the same (capped) perplexity, exp(27.6) ≈ 9.7e11: "no idea", not a measurement.
PERPLEXITY_CAP_LOSS = 27.6


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)``, capped at ``exp(PERPLEXITY_CAP_LOSS)`` to avoid overflow (such a model has no idea)."""
    return math.exp(min(mean_loss, PERPLEXITY_CAP_LOSS))


@torch.no_grad()
def evaluate(
    model,
    dataset,
    *,
    batch_size: int = 16,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    document_eos_id: int | None = None,
) -> EvalResult:
    """Token-weighted loss, perplexity and next-token accuracy of ``model`` on ``dataset`` (for a classifier's
    dataset: the mean loss per example and the accuracy; perplexity is NaN).

    ``dataset`` yields dicts with ``input_ids``, ``attention_mask`` and ``labels`` (an :class:`~gpt_helpers.data.LMDataset`).
    ``max_batches`` bounds the work (batches in order, so the number is repeatable). ``document_eos_id`` scores
    packed blocks with per-document attention (:func:`gpt_helpers.data.document_attention`): each document sees
    only itself, as when it is evaluated alone.

    >>> from gpt_helpers.models import load_model
    >>> from gpt_helpers.data import prepare_dataset
    >>> model, tok = load_model()
    >>> data, _ = prepare_dataset(tok, ["A short text to score."] * 8, block_size=16)
    >>> evaluate(model, data).perplexity > 1
    True
    """
    if len(dataset) == 0:
        raise GPTHelpersError("The evaluation dataset is empty: nothing to measure. Check the validation split.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    random_state = torch.get_rng_state()  # a DataLoader draws a seed: keep training's random stream untouched
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        batch = {key: value.to(device) for key, value in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if document_eos_id is not None:
            inputs["attention_mask"], inputs["position_ids"] = document_attention(batch["input_ids"], document_eos_id)
        logits = model(**inputs).logits
        labels = batch["labels"]
        losses, mask = target_losses(logits, labels)
        loss_sum += losses.sum(dtype=torch.float64)
        count += mask.sum()
        classifier = labels.ndim == 1
        predictions = logits.argmax(dim=-1) if classifier else logits[:, :-1, :].argmax(dim=-1)
        correct += ((predictions == (labels if classifier else labels[:, 1:])) & mask).sum()
    model.train(was_training)
    torch.set_rng_state(random_state)
    tokens = int(count)
    if tokens == 0:
        raise GPTHelpersError("No tokens to score: every label is masked. Check the attention masks of the data.")
    mean = float(loss_sum) / tokens
    # a classifier's loss has no perplexity (it predicts classes, not tokens)
    return EvalResult(
        loss=mean,
        perplexity=math.nan if classifier else perplexity(mean),
        accuracy=int(correct) / tokens,
        tokens=tokens,
    )


@torch.no_grad()
def perplexity_interval(
    model, dataset, *, batch_size: int = 16, confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``(perplexity, low, high)``: the perplexity of ``model`` on ``dataset`` and a percentile bootstrap interval
    over its examples (blocks or conversations drawn with replacement, token-weighted), so a test number on a few
    hundred tokens comes with its uncertainty. Blocks of one text are not independent: read it as a lower bound.

    >>> from gpt_helpers.models import load_model
    >>> from gpt_helpers.data import prepare_dataset
    >>> model, tok = load_model()
    >>> data, _ = prepare_dataset(tok, ["A short text to score, and another one to go with it."] * 8, block_size=8)
    >>> value, low, high = perplexity_interval(model, data, resamples=100)
    >>> low <= value <= high
    True
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        losses, mask = target_losses(logits, batch["labels"].to(device))
        sums += losses.sum(dim=-1).double().cpu().tolist() if losses.ndim > 1 else losses.double().cpu().tolist()
        counts += mask.sum(dim=-1).cpu().tolist() if mask.ndim > 1 else mask.long().cpu().tolist()
    model.train(was_training)
    sums_t, counts_t = torch.tensor(sums), torch.tensor(counts, dtype=torch.float64)
    if counts_t.sum() == 0:
        raise GPTHelpersError("No tokens to score: every label is masked.")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(sums), (resamples, len(sums)), generator=generator)
    means = sums_t[picks].sum(1) / counts_t[picks].sum(1).clamp(min=1)
    tail = (1 - confidence) / 2
    low, high = means.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return perplexity(float(sums_t.sum() / counts_t.sum())), perplexity(low), perplexity(high)


@dataclass(frozen=True)
class BitsPerByte:
    """How well a model predicts raw text, in a unit that does not depend on its tokenizer."""

    bits_per_byte: float
    bytes: int
    tokens: int

    @property
    def bytes_per_token(self) -> float:
        """How much text one token covers: a larger vocabulary usually covers more."""
        return self.bytes / self.tokens if self.tokens else math.nan

    def __str__(self) -> str:
        return (
            f"{self.bits_per_byte:.3f} bits per byte over {self.bytes:,} bytes ({self.tokens:,} tokens, "
            f"{self.bytes_per_token:.2f} bytes per token)"
        )


@torch.no_grad()
def bits_per_byte(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    window: int = 256,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> BitsPerByte:
    """Bits per UTF-8 byte of ``texts``: the model's total surprise (in bits) over every token of every text,
    divided by the texts' bytes. Perplexity per token cannot be compared across tokenizers (a token of a
    49k-entry vocabulary covers more text than one of an 8k vocabulary); bits per byte can.

    Each text starts after an EOS (as documents do in packed training data), so its every token is predicted;
    a text longer than ``window`` tokens is scored in consecutive windows that overlap by one token.

    >>> from gpt_helpers.models import load_model
    >>> model, tok = load_model()
    >>> 0 < bits_per_byte(model, tok, ["A short text to score."]).bits_per_byte < 10
    True
    """
    from .data import pad_sequences

    if not texts:
        raise GPTHelpersError("No texts to score: the list is empty.")
    if tokenizer.eos_token_id is None:
        raise GPTHelpersError("bits_per_byte starts each text after EOS; this tokenizer has no EOS token.")
    context = model_context_length(model)
    window = min(window, context) if context else window
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, not {window}.")
    windows, tokens = [], 0
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids = [tokenizer.eos_token_id, *ids]
        tokens += len(ids) - 1
        windows += [ids[start : start + window] for start in range(0, max(len(ids) - 1, 1), window - 1)]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64)
    windows.sort(key=len)  # similar lengths together: little padding
    for start in range(0, len(windows), batch_size):
        part = windows[start : start + batch_size]
        ids, mask, _ = pad_sequences(part, max(len(w) for w in part), tokenizer.pad_token_id or 0)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        losses, counted = token_losses(logits, ids.masked_fill(mask == 0, -100))
        nats += losses[counted].sum(dtype=torch.float64).cpu()
    model.train(was_training)
    size = sum(len(text.encode("utf-8")) for text in texts)
    return BitsPerByte(bits_per_byte=float(nats) / math.log(2) / size, bytes=size, tokens=tokens)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str | Sequence[str],
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    do_sample: bool = True,
    repetition_penalty: float = 1.0,
    seed: int | None = 0,
) -> list[str]:
    """Continue one prompt or several; returns the generated continuations (prompt not included).

    ``do_sample=False`` gives greedy decoding; ``seed`` makes sampling repeatable (``None``: fresh draws);
    ``top_k=None`` / ``top_p=None`` turn those filters off. An empty prompt starts a new text from the EOS token.

    >>> from gpt_helpers.models import load_model
    >>> model, tok = load_model()
    >>> len(generate(model, tok, "The ship", max_new_tokens=5))
    1
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(prompts) and tokenizer.eos_token is None:
        raise GPTHelpersError("An empty prompt needs a tokenizer with an EOS token to start from. Give a prompt text.")
    prompts = [text or tokenizer.eos_token for text in prompts]  # empty: start a new text, as after EOS in training
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the last real token
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = previous_side
    _check_generation_length(model, encoded["input_ids"].shape[1], max_new_tokens)
    was_training = model.training
    model.eval()
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=repetition_penalty,
    )
    if do_sample:  # None turns a filter off (transformers would fall back to its own default of top-k 50)
        options.update(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(**encoded, **options)
    model.train(was_training)
    new_tokens = output[:, encoded["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]


def _check_generation_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (GPT-2 would fail deep inside with an IndexError)."""
    context = model_context_length(model)
    if context is not None and prompt_tokens + max_new_tokens > context:
        fix = f"Use max_new_tokens <= {context - prompt_tokens}" if prompt_tokens < context else "Shorten the prompt"
        raise ConfigError(
            f"The prompt ({prompt_tokens} tokens) plus max_new_tokens={max_new_tokens} exceed the model's context of "
            f"{context} tokens. {fix} (--max-new-tokens on the command line)."
        )


def compare_generations(models: dict[str, tuple], prompts: Sequence[str], **generate_options) -> list[dict[str, str]]:
    """A before/after table: for each prompt, each named model's continuation.

    ``models`` maps a label (``"before"``, ``"after"``) to a ``(model, tokenizer)`` pair.
    """
    rows = []
    for prompt in prompts:
        row = {"prompt": prompt}
        for label, (model, tokenizer) in models.items():
            row[label] = generate(model, tokenizer, prompt, **generate_options)[0]
        rows.append(row)
    return rows
