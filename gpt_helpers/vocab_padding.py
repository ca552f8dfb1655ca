"""Pad a causal LM's vocabulary to a round size for faster output matmuls, without ever exposing the padding.

GPT-2's 50,257-token output layer is an awkward matrix shape for GPU kernels; padded to 50,304 (a multiple of 64)
the same layer runs markedly faster (nanoGPT's observation). The padding rows must never be predicted, so while
training:

- the padding rows start at zero and stay there (no token id looks them up, and their logits are cut off, so
  they get no gradient);
- a forward hook cuts the output layer's logits back to the real vocabulary, so the loss, evaluation and
  generation only ever see real tokens;
- model folders are saved with the real vocabulary, and :meth:`PaddedVocabulary.remove` restores the model's
  original size when training ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (unchanged when ``multiple`` is 0 or 1).

    >>> padded_size(50257, 64)
    50304
    >>> padded_size(8192, 64)
    8192
    """
    if multiple <= 1:
        return size
    return -(-size // multiple) * multiple


class PaddedVocabulary:
    """The vocabulary of ``model`` padded to a multiple of ``multiple`` until :meth:`remove` is called."""

    active = True

    def __init__(self, model: torch.nn.Module, multiple: int):
        self.model = model
        self.real_size = model.get_input_embeddings().num_embeddings
        self.size = padded_size(self.real_size, multiple)
        model.resize_token_embeddings(self.size, mean_resizing=False)
        with torch.no_grad():
            for parameter in self._vocabulary_parameters():
                parameter[self.real_size :].zero_()
        self._hook = model.get_output_embeddings().register_forward_hook(self._cut_logits)
        logger.info(
            "Vocabulary padded from %d to %d for faster output matmuls (the padding is never predicted).",
            self.real_size,
            self.size,
        )

    def _vocabulary_parameters(self) -> list[torch.nn.Parameter]:
        """The embedding and output weights (one object when tied) and any output bias, deduplicated."""
        output = self.model.get_output_embeddings()
        candidates = [self.model.get_input_embeddings().weight, output.weight, getattr(output, "bias", None)]
        unique: dict[int, torch.nn.Parameter] = {}
        for parameter in candidates:
            if parameter is not None:
                unique.setdefault(id(parameter), parameter)
        return list(unique.values())

    def _cut_logits(self, module, inputs, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.real_size]

    @contextlib.contextmanager
    def real_vocabulary(self) -> Iterator[None]:
        """Within the block the model shows its real vocabulary size (for saving); the same parameters are kept."""
        if self._hook is None:  # already removed: the model has its real size
            yield
            return
        parameters = self._vocabulary_parameters()
        full = [parameter.data for parameter in parameters]
        padded = self.model.config.vocab_size
        try:
            for parameter in parameters:
                parameter.data = parameter.data[: self.real_size]
            self._declare_size(self.real_size)
            yield
        finally:
            for parameter, data in zip(parameters, full):
                parameter.data = data
            self._declare_size(padded)

    def _declare_size(self, size: int) -> None:
        """Set the vocabulary size the config and the embedding modules report (their weights are set apart)."""
        self.model.config.vocab_size = size
        for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
            for name in ("num_embeddings", "out_features"):
                if hasattr(module, name):
                    setattr(module, name, size)

    def remove(self) -> None:
        """Remove the hook and shrink the model back to its real vocabulary (idempotent)."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.model.resize_token_embeddings(self.real_size, mean_resizing=False)


class NoPadding:
    """The stand-in when the vocabulary is not padded: the same methods, doing nothing."""

    active = False
    size = None

    @contextlib.contextmanager
    def real_vocabulary(self) -> Iterator[None]:
        yield

    def remove(self) -> None:
        pass


def pad_vocabulary(
    model: torch.nn.Module, multiple: int | None, device_type: str, *, custom_groups: bool = False
) -> PaddedVocabulary | NoPadding:
    """Pad ``model``'s vocabulary to ``multiple`` (None: 64 on CUDA, off elsewhere; 0: off) when it is safe to:
    not under custom parameter groups (they hold the embedding parameters that padding replaces), not on PEFT
    adapters (their base is frozen), and only with a plain output layer.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> pad_vocabulary(build_model_from_config(tiny_gpt2_config(vocab_size=500)), 64, "cpu").size
    512
    """
    wanted = (64 if device_type == "cuda" else 0) if multiple is None else multiple
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None or padded_size(embeddings.num_embeddings, wanted) == embeddings.num_embeddings:
        return NoPadding()
    if (
        custom_groups
        or hasattr(model, "peft_config")
        or getattr(model, "get_output_embeddings", lambda: None)() is None
    ):
        (logger.warning if multiple else logger.debug)(
            "Vocabulary padding skipped: it needs the model's own parameter groups and a plain output layer."
        )
        return NoPadding()
    return PaddedVocabulary(model, wanted)
