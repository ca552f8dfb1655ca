"""The output layer and the cross-entropy in one pass over the sequence, chunk by chunk: the full
``batch × sequence × vocabulary`` logits never exist.

For a model with a large vocabulary the logits are the largest tensor of a training step: SmolLM2's 49,152-entry
vocabulary makes one 8 × 128 batch's logits 200 MB in fp32, and the usual path keeps several such tensors at once
(the logits, an fp32 copy, the log-probabilities, their gradient). Here the hidden states are multiplied by the
output matrix a chunk of rows at a time; each chunk's loss *and* its gradients (with respect to the hidden states
and, when it trains, the output matrix) are computed at once, and only those gradients are kept for the backward
pass. The arithmetic is the usual one (the same matmuls, the softmax in fp32), in another order.
"""

from __future__ import annotations

import torch

#: Bytes of fp32 logits computed at once (a chunk of rows × the vocabulary).
CHUNK_BYTES = 32 * 2**20


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over the targets of cross-entropy(hidden @ weightᵀ, target); targets of -100 are ignored."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        wide = torch.promote_types(torch.float32, hidden.dtype)  # the softmax and the sums: fp32, or float64
        compute_weight = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        want_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part = hidden[start : start + rows].to(dtype)
            target = targets[start : start + rows]
            keep = target != -100
            safe = target.clamp(min=0)
            logits = (part @ compute_weight.T).to(wide)
            log_norm = logits.logsumexp(-1)
            chosen = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((log_norm - chosen) * keep).sum()
            grad = torch.exp(logits - log_norm[:, None])  # softmax, in place of the logits
            grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1
            grad *= keep[:, None]
            grad = grad.to(dtype)
            grad_hidden[start : start + rows] = (grad @ compute_weight).to(hidden.dtype)
            if want_weight:
                grad_weight += (grad.T @ part).to(wide)
        ctx.save_for_backward(grad_hidden, grad_weight if want_weight else torch.empty(0))
        ctx.want_weight = want_weight
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        weight_grad = (grad_weight * grad_output).to(grad_output.dtype) if ctx.want_weight else None
        return grad_hidden * grad_output, weight_grad, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of hidden states ``(batch, seq, d)`` under the output matrix ``weight``
    ``(vocabulary, d)`` and ``labels`` ``(batch, seq)`` (position t predicts label t+1; -100 is ignored): the same
    number as ``token_losses(hidden @ weight.T, labels).sum()``, without the logits. The matmuls run in the autocast
    precision when autocast is on.

    >>> hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    >>> labels = torch.randint(0, 11, (2, 5))
    >>> from gpt_helpers.evaluation import token_losses
    >>> bool(torch.allclose(linear_cross_entropy(hidden, weight, labels), token_losses(hidden @ weight.T, labels)[0].sum()))
    True
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(
        -1
    )  # the last position predicts nothing
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, dtype)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The body that computes the last hidden states (Llama's ``model``, GPT-2's ``transformer``), under LoRA too."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(plain, "base_model", None)
    return body if body is not None and body is not plain else None


def supports_fused_loss(model: torch.nn.Module) -> bool:
    """Whether the output layer is a plain linear map (no bias) applied to the body's last hidden states."""
    output = getattr(model, "get_output_embeddings", lambda: None)()
    config = getattr(model, "config", None)
    return (
        isinstance(output, torch.nn.Linear)
        and output.bias is None
        and decoder_of(model) is not None
        and not getattr(config, "final_logit_softcapping", None)
        and not getattr(config, "logit_scale", None)
    )
