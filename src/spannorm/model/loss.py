"""Next-token cross-entropy through the LM head, computed in chunks of tokens so that the logits are never
all held at once.

The plain loss builds the (tokens, vocab) logits, upcasts all of them to fp32 and keeps them for backward:
at batch 256, T = 1024 and a 50k vocabulary that is 26 GB of bf16 logits plus 53 GB in fp32.
:func:`chunked_cross_entropy` walks the tokens ``chunk`` at a time. For each chunk it computes the head
matmul, the fp32 log-sum-exp and, when a gradient will be needed, the gradient of the loss with respect to
the chunk's hidden states and the head weight (softmax minus one-hot, two matmuls), then drops the chunk's
logits. Backward only scales the stored gradients, so no matmul is recomputed: the FLOPs equal the plain
path's, and the peak memory holds one chunk of logits instead of all of them.
"""

from __future__ import annotations

import torch


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, ``chunk`` tokens at a time.

    ``hidden`` is (..., d), ``weight`` (vocab, d), ``targets`` the leading shape of ``hidden``. Under autocast
    the head matmul runs in the autocast dtype and the softmax in fp32, as in
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets)``, which this equals up to summation order
    (targets equal to ``ignore_index`` are left out of the mean, as there)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(flat, weight, targets.reshape(-1), int(chunk), ignore_index,
                                            need_grad)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when asked, its gradients; backward scales them by the incoming
    gradient (the loss is a scalar, so that is all the chain rule asks of it)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                ignore_index: int, need_grad: bool) -> torch.Tensor:
        device = flat.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
        valid_all = targets != ignore_index
        n_valid = valid_all.sum()
        loss_sum = torch.zeros((), device=flat.device, dtype=torch.float32)
        grad_flat = torch.empty_like(flat) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for start in range(0, flat.shape[0], chunk):
                x = flat[start:start + chunk].to(dtype)
                logits = (x @ w.T).float()
                lse = logits.logsumexp(dim=-1)
                valid = valid_all[start:start + chunk]
                tgt = targets[start:start + chunk].masked_fill(~valid, 0)
                loss_sum += ((lse - logits.gather(1, tgt.unsqueeze(1)).squeeze(1)) * valid).sum()
                if not need_grad:
                    continue
                assert grad_flat is not None and grad_weight is not None  # made above when need_grad
                # d(mean loss)/d(logits) = (softmax - one_hot) / n_valid, zero on ignored rows; in place on
                # the chunk's logits, which are not needed any more.
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs.scatter_add_(1, tgt.unsqueeze(1), -valid.unsqueeze(1).float())
                probs.mul_((valid.float() / n_valid).unsqueeze(1))
                g = probs.to(dtype)
                grad_flat[start:start + chunk] = (g @ w).to(flat.dtype)
                grad_weight += (g.T @ x).float()
        if need_grad:
            assert grad_weight is not None  # made above when need_grad
            ctx.save_for_backward(grad_flat, grad_weight.to(weight.dtype))
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_flat, grad_weight = ctx.saved_tensors
        return (grad_flat * grad_loss.to(grad_flat.dtype) if ctx.needs_input_grad[0] else None,
                grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None,
                None, None, None, None)
