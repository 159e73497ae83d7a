"""Teacher-forced loss of the base and the tuned model on the reference answers.

Each held-out example is rendered and masked by the data stage exactly as training renders it, and
scored with the training loss, so the tuned loss here is the run's final eval_loss on the same file.
"""

import contextlib

import torch

from lorakit.data.render import Rendered
from lorakit.train.batches import collate, trained_tokens
from lorakit.train.loss import loss_sum


@torch.inference_mode()
def reference_losses(model, rendered: list[Rendered], pad_id: int, *, adapter: bool) -> list[tuple[float, int]]:
    """(summed token loss, trained tokens) of each example; `adapter=False` scores the base model."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    with model.disable_adapter() if not adapter else contextlib.nullcontext():
        for example in rendered:  # one at a time: loss_sum sums over its batch, we need each example's
            batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
            out.append((loss_sum(model, batch).item(), trained_tokens(batch["labels"])))
    return out
