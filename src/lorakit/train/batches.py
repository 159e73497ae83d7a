"""Which rows each optimizer step trains on, and how a micro-batch of rows becomes tensors.

A row is one rendered example (padded batches) or a packed row of several (`lorakit.data.pack`).
The order is a pure function of (seed, step): epoch e shuffles the rows with seed + e, and step s
takes the next batch_size x grad_accum x world_size of them. Resuming at step s therefore needs only
s, and replays the exact samples an uninterrupted run would have seen. With several processes each
takes a disjoint share of every micro-step's rows, so N processes of batch_size B train on the same
rows per step as one process of batch_size N x B.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.render import Rendered

IGNORE = -100


@dataclass(frozen=True)
class Schedule:
    n_examples: int  # rows to draw from: examples, or packed rows when packing
    batch_size: int  # rows per process per micro-step
    grad_accum: int
    seed: int
    world_size: int = 1  # training processes, each on its own share of every micro-step

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.per_step)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def step_indices(self, step: int, rank: int = 0) -> list[list[int]]:
        """Row indices of process `rank`'s micro-batches in optimizer step `step` (0-based).

        Every process gets the same number of micro-batches, since under DDP and FSDP each forward
        and backward is a collective; in the last step of an epoch a process's share can be empty.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_examples, generator=g).tolist()
        chunk = order[k * self.per_step:(k + 1) * self.per_step]
        micro = self.batch_size * self.world_size
        return [chunk[i:i + micro][rank::self.world_size] for i in range(0, len(chunk), micro)]


def collate(rows: Sequence[Rendered | Sequence[Rendered]], pad_id: int,
            width: int | None = None) -> dict[str, torch.Tensor | int]:
    """Right-pad rows into input_ids / attention_mask / labels tensors.

    Rows that are single examples give the plain padded batch. Packed rows (sequences of examples)
    also get `position_ids` that restart at 0 for each example (and for the padding), and
    `cu_seqlens`, the offsets of each of those segments in the flattened batch, for varlen kernels.
    `width` (a fixed width, for CUDA graphs' one shape per recording) also pads the segments with empty
    ones to a power of two, so their count takes a few shapes instead of one per batch.
    The model must then get position_ids instead of the attention mask (see `loss.model_inputs`):
    transformers builds a block-diagonal causal mask from them, so no token attends across examples.
    The first label of each packed example is ignored: it would be predicted from the example
    before it. `attention_mask` marks real tokens either way.

    Values the GPU would otherwise have to report back are worked out here, on the CPU:
    `trained_index` (see `trained_index`) and, for packed rows, `max_seqlen`, the longest segment.
    """
    packed = not all(isinstance(row, Rendered) for row in rows)
    rows = [list(row) if packed and not isinstance(row, Rendered) else [row] for row in rows]
    width = max(width or 0, max(sum(len(e.input_ids) for e in row) for row in rows))  # `width`: pad to at least
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = []
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE
            positions[r, at:at + n] = torch.arange(n)
            segments.append(n)
            at += n
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)
        segments += [width - at] if at < width else []
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "trained_index": trained_index(labels)}
    if packed:
        if width is not None:  # one shape for CUDA graphs: empty segments up to a power of two
            segments += [0] * ((1 << (len(segments) - 1).bit_length()) - len(segments))
        cu = torch.tensor([0] + segments, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(position_ids=positions, cu_seqlens=cu, max_seqlen=max(segments))
    return batch


def padding_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """One attended pad token with no trained label: the micro-batch of a process whose share is
    empty, so it still joins the collective forward and backward; it adds nothing to loss or gradient."""
    labels = torch.full((1, 1), IGNORE, dtype=torch.long)
    return {"input_ids": torch.tensor([[pad_id]]), "attention_mask": torch.ones((1, 1), dtype=torch.long),
            "labels": labels, "trained_index": trained_index(labels)}


def trained_index(labels: torch.Tensor) -> torch.Tensor:
    """Positions in the flattened batch (row x length + column) whose next token is trained: the
    hidden states the loss projects; position + 1 holds each one's target label. Picking them with
    a boolean mask on the GPU would make the host wait for the GPU to count them."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`, other values as they are. To a GPU they go from pinned memory
    without blocking: a copy from pageable memory first waits for the GPU to finish everything queued,
    which would leave it idle while the host launches the next micro-batch."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: label positions 1.. that are not ignored (shifted)."""
    return int((labels[:, 1:] != IGNORE).sum())
