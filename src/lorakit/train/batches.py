"""Which examples each optimizer step trains on, and how a micro-batch becomes tensors.

The order is a pure function of (seed, step): epoch e shuffles with seed + e, and step s takes the
next batch_size x grad_accum examples. Resuming at step s therefore needs only s, and replays the
exact samples an uninterrupted run would have seen.
"""

import math
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Schedule:
    n_examples: int
    batch_size: int
    grad_accum: int
    seed: int

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.per_step)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def step_indices(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_examples, generator=g).tolist()
        chunk = order[k * self.per_step:(k + 1) * self.per_step]
        return [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rendered examples into input_ids / attention_mask / labels tensors."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: label positions 1.. that are not ignored (shifted)."""
    return int((labels[:, 1:] != IGNORE).sum())
