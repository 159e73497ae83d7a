"""Token-summed next-token loss. The fast path projects only the trained positions to the vocabulary;
`reference_loss_sum` is the plain full-logits computation it must match (tests/unit/test_loss.py)."""

import torch
import torch.nn.functional as F

from lorakit.train.batches import IGNORE


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropy over trained tokens. With assistant-only loss most positions are prompt,
    so skipping their vocabulary projection saves the largest matmul and softmax for them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):
        return reference_loss_sum(model, batch)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1][keep]
    logits = base.get_output_embeddings()(hidden).float()
    return F.cross_entropy(logits, target[keep], reduction="sum")


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
