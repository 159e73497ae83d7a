"""Token-summed next-token loss. The fast path projects only the trained positions to the vocabulary;
`reference_loss_sum` is the plain full-logits computation it must match (tests/unit/test_train_parts.py)."""

import torch
import torch.nn.functional as F

from lorakit.train.batches import IGNORE


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model is called with.

    A packed batch gives position ids and no attention mask, so transformers builds a block-diagonal
    causal mask (eager, sdpa, flex); flash-attention gets the segment offsets (cu_seq_lens) so its
    varlen kernel keeps examples apart with several rows too. use_cache=False matters: with a cache
    (created by default, even in train mode) transformers skips that packed-sequence detection and
    every token attends to the whole row.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    cu = batch["cu_seqlens"]
    longest = int((cu[1:] - cu[:-1]).max())
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropy over trained tokens. With assistant-only loss most positions are prompt,
    so skipping their vocabulary projection saves the largest matmul and softmax for them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):
        return reference_loss_sum(model, batch)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    hidden = base.get_decoder()(**model_inputs(batch))
    hidden = hidden.last_hidden_state[:, :-1][keep]
    return chunked_cross_entropy_sum(base.get_output_embeddings(), hidden, target[keep])


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
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i:i + chunk], target[i:i + chunk]
            logits = (h @ weight.to(h.dtype).t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            grad_logits = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax - onehot
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1
            grad_hidden[i:i + chunk] = (grad_logits.to(h.dtype) @ weight.to(h.dtype)).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
