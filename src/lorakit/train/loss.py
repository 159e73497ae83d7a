"""Token-summed next-token loss. The fast path projects only the trained positions to the vocabulary;
`reference_loss_sum` is the plain full-logits computation it must match (tests/unit/test_train_parts.py)."""

import torch
import torch.nn.functional as F

from lorakit import plan
from lorakit.train import fast
from lorakit.train.batches import IGNORE, trained_index


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model is called with.

    A padded batch gives no attention mask: its rows are right-padded (batches.collate), so under
    causal attention no real token attends to a pad, and the pads' own outputs are never trained
    (tests/unit/test_train_parts.py compares with the mask). With a mask, transformers asks the GPU
    whether it is all ones before every forward, so the host waits and the GPU runs dry; without one,
    attention also takes the causal kernels.
    A packed batch gives position ids and no attention mask, so transformers builds a block-diagonal
    causal mask (eager, sdpa, flex); flash-attention gets the segment offsets (cu_seq_lens) so its
    varlen kernel keeps examples apart with several rows too. use_cache=False matters: with a cache
    (created by default, even in train mode) transformers skips that packed-sequence detection and
    every token attends to the whole row.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "use_cache": False}
    cu = batch["cu_seqlens"]
    if cu.is_cuda:  # compiled layers: its length (examples per batch) traced as a symbol from the first batch,
        torch._dynamo.maybe_mark_dynamic(cu, 0)  # not a constant recompiled for the next count (8B: 17 s)
    longest = batch["max_seqlen"] if "max_seqlen" in batch else int((cu[1:] - cu[:-1]).max())
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropy over trained tokens. With assistant-only loss most positions are prompt,
    so skipping their vocabulary projection saves the largest matmul and softmax for them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):
        return reference_loss_sum(model, batch)
    index = batch.get("trained_index")
    if index is None:  # collate's batches bring it from the CPU; found here, a GPU makes the host wait
        index = trained_index(batch["labels"])
    hidden = base.get_decoder()(**model_inputs(batch)).last_hidden_state
    hidden = hidden.flatten(0, 1).index_select(0, index)
    target = batch["labels"].flatten().index_select(0, index + 1)
    return chunked_cross_entropy_sum(base.get_output_embeddings(), hidden, target)


def chunked_cross_entropy_sum(head, hidden: torch.Tensor, target: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Σ cross-entropy of head(hidden) against target without materialising all the logits.

    Full fp32 logits for 16k tokens of a 128k-152k vocabulary take 8-10 GB, and as much again for
    their gradient. When the head is frozen (LoRA never adapts it) the gradient with respect to the
    hidden states is computed chunk by chunk during the forward pass, so only one chunk of logits is
    ever alive and nothing is recomputed. A trainable head falls back to the plain computation.
    """
    weight = getattr(head, "weight", None)
    if weight is None or weight.requires_grad or getattr(head, "bias", None) is not None:
        return F.cross_entropy(head(hidden).float(), target, reduction="sum")
    return _FrozenHeadCrossEntropy.apply(hidden, weight, target, chunk)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        grad_hidden = torch.empty_like(hidden)
        if hidden.is_cuda:
            total = _cuda_chunks(hidden, weight, target, chunk, grad_hidden)
        else:
            total = _cpu_chunks(hidden, weight, target, min(chunk, plan.cpu_chunk_tokens(weight.shape[0])), grad_hidden)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def _cuda_chunks(hidden, weight, target, chunk: int, grad_hidden) -> torch.Tensor:
    """The CUDA loop of `_FrozenHeadCrossEntropy`: the softmax and its gradient run as one compiled
    kernel pair over 16-bit logits (one read for the logsumexp, one read and one 16-bit write for the
    gradient) instead of five fp32 passes."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    loss_and_grad = fast.compiled(fused_chunk_loss_and_grad)
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], target[i:i + chunk]
        loss, grad_logits = loss_and_grad(h @ weight.to(h.dtype).t(), t)
        total += loss
        grad_hidden[i:i + chunk] = (grad_logits.to(h.dtype) @ weight.to(h.dtype)).to(hidden.dtype)
    return total


def _cpu_chunks(hidden, weight, target, chunk: int, grad_hidden) -> torch.Tensor:
    """The CPU loop of `_FrozenHeadCrossEntropy`: each chunk's logits laid out [vocab, tokens] in one
    fp32 buffer that every chunk reuses (plan.cpu_chunk_tokens sizes it), the gradient written over
    them (`columns_loss_and_grad`). MKL's sgemm runs the vocabulary projection 1.3x faster this way
    round (its inner dimension, the hidden size, is small), and a reused buffer is not mapped and
    faulted in again for every chunk: on the 2-core test machine, 1,280 trained tokens of SmolLM2
    went from 2.0 to 1.3 s against 128-token chunks the other way round (benchmarks/NOTES.md, session 7)."""
    w = weight.to(hidden.dtype)
    logits = torch.empty(weight.shape[0], min(chunk, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], target[i:i + chunk]
        part = logits[:, :h.shape[0]]
        if h.dtype == torch.float32:
            torch.mm(w, h.t(), out=part)
        else:
            part.copy_(w @ h.t())
        total += columns_loss_and_grad(part, t)
        grad_hidden[i:i + chunk] = (part.t().to(h.dtype) @ w).to(hidden.dtype)
    return total


def chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cross-entropy of one chunk of logits, and its gradient with respect to them (fp32)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
    grad = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax - onehot
    grad[torch.arange(target.shape[0], device=target.device), target] -= 1
    return loss, grad


def columns_loss_and_grad(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`chunk_loss_and_grad` for fp32 logits laid out [vocab, tokens] (the CPU loss, `_cpu_chunks`),
    with the gradient written over them; returns the loss. softmax as exp(logits - max) / sum, reusing
    the sum the loss's logsumexp needs: no second buffer of the chunk's size, and the rounding differs
    from torch.softmax in the last bits (tests/unit/test_fast.py)."""
    columns = torch.arange(target.shape[0], device=target.device)
    picked = logits[target, columns]
    top = logits.amax(0)
    grad = logits.sub_(top).exp_()
    total = grad.sum(0)
    loss = (top + total.log() - picked).sum()
    grad.div_(total)
    grad[target, columns] -= 1
    return loss


def fused_chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_loss_and_grad` written for the compiler: the gradient comes out in the logits' dtype and
    no step writes a full fp32 copy of the chunk, so inductor fuses it into a reduction and one
    elementwise pass."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = (lse.squeeze(1) - x.gather(1, target[:, None]).squeeze(1)).sum()
    onehot = torch.arange(x.shape[1], device=x.device) == target[:, None]
    return loss, (torch.exp(x - lse) - onehot.float()).to(logits.dtype)


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


class TokenLoss(torch.nn.Module):
    """The module the accelerator wraps: its forward is `loss_sum`. `loss_sum` calls the decoder past
    the model's own forward, so wrapping the model itself would hide that forward from DDP (which
    then never synchronises gradients) and from FSDP (which then never gathers the weights)."""

    def __init__(self, model, loss=loss_sum):
        super().__init__()
        self.model, self.loss = model, loss  # `loss`: reference_loss_sum for the plain path
        self._no_split_modules = model._no_split_modules  # FSDP shards each transformer block as a unit

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.model, batch)
