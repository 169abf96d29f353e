"""The causal-LM loss without FP32 logits and without the whole logits: per chunk of tokens, the
lm_head GEMM, one kernel per token row that computes the row's loss and overwrites its logits with
their gradient, and the two GEMMs that turn that into the hidden states' and lm_head's gradients.

Why: transformers computes the logits in BF16, copies them to FP32 and runs log-softmax and NLL
forward and backward over that copy: at Llama-3's 128k vocabulary and 2,048 tokens that is
~1 GB per FP32 tensor, several of them alive at once, and ~9 GB of memory traffic per step.
Here the BF16 logits are written once by the GEMM, read twice and overwritten once with their
gradient (softmax minus one-hot, unscaled, in the logits' dtype), one chunk of at most
CHUNK_BYTES (1 GiB) at a time: the whole (tokens, vocab) logits never exist (4 GB at 16k tokens and a
128k vocabulary). The gradients are computed in the forward, where the chunk's logits are at
hand, and scaled by the incoming gradient in the backward.

Same loss as HF's `ForCausalLMLoss`: labels shifted left by one, -100 ignored, mean over the
remaining tokens. On CUDA with Triton the row pass is a Triton kernel; elsewhere it is plain
PyTorch (the CPU tests check both paths against HF's loss and gradients).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..availability import triton_available

IGNORE_INDEX = -100
BLOCK = 4096
"""Vocabulary columns a Triton program reads per iteration."""
CHUNK_BYTES = 2**30
"""Logits alive at once: 4,096 tokens of a 128k vocabulary in BF16, 16,384 of a 32k one. Larger
chunks mean fewer roundings of the BF16 lm_head gradient accumulated over them."""


def causal_lm_loss(model: nn.Module, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """`model(**inputs, labels=labels).loss` of an HF causal LM, computed by `linear_cross_entropy`.

    `inputs` go to the decoder (`model.base_model`: input_ids, position_ids, packed-layout kwargs).
    """
    hidden = model.base_model(**inputs).last_hidden_state  # (b, s, h)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (b, s): token t predicts t + 1
    return linear_cross_entropy(hidden.flatten(0, -2), model.get_output_embeddings().weight, targets.reshape(-1))


class LossModel(nn.Module):
    """An HF causal LM whose forward returns `causal_lm_loss`: the module DDP wraps and FSDP2's root
    shards when the fused loss is on.

    Why: the fused loss runs the model's body and reads the lm_head weight itself, around the HF
    model's forward. Wrapped in this module, that whole computation is the forward DDP and FSDP2
    hook into: DDP's reducer sees the lm_head's gradient, FSDP2 all-gathers the embeddings, final
    norm and lm_head before it and reduce-scatters their gradients after. It holds nothing of its
    own: checkpoints and exports are taken from `.model`, under the HF model's names.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs) -> torch.Tensor:
        return causal_lm_loss(self.model, labels, **inputs)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped).

    hidden (tokens, h), weight (vocab, h), targets (tokens,). Computes in the autocast dtype when
    autocast is on (as `nn.Linear` would), else in `hidden`'s dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or \
            targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: hidden (tokens, h), weight (vocab, h) and targets (tokens,) "
                         f"expected; got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, torch.is_grad_enabled())


def chunk_tokens(vocab: int, itemsize: int) -> int:
    """Tokens per chunk: logits of at most CHUNK_BYTES (at least 64 rows, so GEMMs keep some size)."""
    return max(64, CHUNK_BYTES // (vocab * itemsize))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_enabled: bool
                ) -> torch.Tensor:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        counted = (targets != IGNORE_INDEX).sum()
        want_hidden, want_weight = (grad_enabled and need for need in ctx.needs_input_grad[:2])  # eval: loss only
        # The mean's 1/N goes into the small operand, in FP32, before the (vocab, h) product. With no
        # counted token the loss is NaN (0 / 0, as in torch) and both gradients are zero.
        h_scaled = (h.float() / counted.clamp_min(1)).to(dtype) if want_weight else None
        grad_hidden = torch.empty_like(h) if want_hidden else None  # (tokens, h)
        # Accumulated in the compute dtype: one rounding per chunk in BF16 (few chunks: CHUNK_BYTES).
        grad_weight = torch.zeros_like(w) if want_weight else None  # (vocab, h)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        step = chunk_tokens(w.shape[0], w.element_size())
        with torch.autocast(device_type, enabled=False):  # operands are in `dtype` already; out= below
            for start in range(0, h.shape[0], step):
                rows = slice(start, start + step)
                logits = h[rows] @ w.t()  # (chunk, vocab); becomes its own gradient below
                loss += loss_and_grad_rows(logits, targets[rows]).sum()
                if want_hidden:
                    torch.matmul(logits, w, out=grad_hidden[rows])
                if want_weight:
                    grad_weight.addmm_(logits.t(), h_scaled[rows])
                del logits
        ctx.save_for_backward(grad_hidden, grad_weight, counted)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        return loss / counted

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, counted = ctx.saved_tensors
        scale = grad_loss.float()
        if grad_hidden is not None:  # the mean's 1/N and the incoming gradient, in FP32
            grad_hidden = (grad_hidden.float() * (scale / counted.clamp_min(1))).to(ctx.input_dtypes[0])
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.input_dtypes[1])
        return grad_hidden, grad_weight, None, None


def loss_and_grad_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row loss (FP32, 0 where ignored); overwrites `logits` with softmax(logits) - onehot(target)
    (0 on ignored rows)."""
    if triton_available(logits.device):
        return _rows_triton(logits, targets)
    return _rows_torch(logits, targets)


def _rows_torch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    counted = targets != IGNORE_INDEX
    safe = torch.where(counted, targets, 0)[:, None]
    losses = torch.where(counted, torch.logsumexp(x, -1) - x.gather(1, safe)[:, 0], 0.0)
    grad = torch.softmax(x, -1).scatter_add_(1, safe, torch.full_like(safe, -1, dtype=x.dtype))
    logits.copy_(grad * counted[:, None])
    return losses


def _rows_triton(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not logits.is_contiguous():
        raise ValueError("linear_cross_entropy: the logits must be contiguous")
    rows, vocab = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    _row_kernel()[(rows,)](logits, targets.contiguous(), losses, vocab, IGNORE_INDEX, BLOCK=BLOCK, num_warps=8)
    return losses


@functools.cache
def _row_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def loss_and_grad_row(logits_ptr, targets_ptr, losses_ptr, vocab, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * vocab
        target = tl.load(targets_ptr + row)
        counted = target != ignore_index
        columns = tl.arange(0, BLOCK)
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):  # pass 1: log-sum-exp, online
            x = tl.load(base + start + columns, mask=start + columns < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        picked = tl.load(base + tl.where(counted, target, 0)).to(tl.float32)  # read before pass 2 overwrites it
        tl.store(losses_ptr + row, tl.where(counted, lse - picked, 0.0))
        for start in range(0, vocab, BLOCK):  # pass 2: the gradient, in place
            mask = start + columns < vocab
            x = tl.load(base + start + columns, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + columns == target, 1.0, 0.0)
            grad = tl.where(counted, grad, 0.0)
            tl.store(base + start + columns, grad.to(logits_ptr.dtype.element_ty), mask=mask)

    return loss_and_grad_row
