"""Batched generation from token prompts, with the adapter on or off in the same model, and the
teacher-forced loss of each prompt's reference answer from the same prompt pass.

A small decode loop instead of `model.generate`, for savings that keep greedy results the same:
- the prompt is run once for both the loss and the generation: after the prefill, the reference
  tokens are fed after the prompt (their logits give the loss), then cut from the KV cache again
  before decoding starts, so decoding sees exactly the prompt's cache;
- a row that emits an end-of-turn token leaves the batch at once (its KV-cache row is dropped),
  so finished answers cost nothing while the rest of the batch keeps generating;
- with the adapter on, plain LoRA on fp32 weights is folded into them for the call (`_folded`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin


@dataclass
class Prompt:
    """Token ids ending with the generation prompt; optionally the reference answer that follows them
    in the rendered example, and which of its tokens the training mask trains (they make the loss)."""

    ids: list[int]
    reference: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended on an end-of-turn token before max_new_tokens
    loss: float = 0.0  # summed cross-entropy over the reference's trained tokens
    loss_tokens: int = 0


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; otherwise softmax(logits / temperature) restricted to the top_p
    nucleus, drawn from a generator seeded with `seed` (the same settings give the same outputs)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[Prompt], *, stop_ids: list[int], max_new_tokens: int,
             batch_size: int, adapter: bool = True, sampling: Sampling = Sampling()) -> list[Generation]:
    """One Generation per prompt, in input order.

    `model` is a PeftModel; `adapter=False` disables its adapter, so base and tuned share one copy of
    the weights (`_adapter`). Prompts are sorted by length and left-padded so each batch wastes little.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    results: list[Generation | None] = [None] * len(prompts)
    pick = _picker(sampling, next(model.parameters()).device)
    model.eval()
    with _adapter(model, adapter):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = _Batch(model.get_base_model(), [prompts[i] for i in idx], tokenizer.pad_token_id, max_new_tokens)
            for i, (ids, stopped, loss, n) in zip(idx, batch.run(stop_ids, max_new_tokens, pick)):
                results[i] = Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids), stopped, loss, n)
    return results


class _Batch:
    """One left-padded batch: prefill, the reference loss, then decoding until every row has stopped."""

    def __init__(self, model, prompts: list[Prompt], pad_id: int, max_new_tokens: int):
        self.model, self.prompts, self.pad_id = model, prompts, pad_id
        self.device = next(model.parameters()).device
        longest = max(len(p.ids) + max(len(p.reference) - 1, max_new_tokens) for p in prompts)
        self.cache = _Cache(model.config.num_hidden_layers, len(prompts), longest)

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int = 1):
        """Run `ids` after the cache's first mask.shape[1] - ids.shape[1] columns, writing their keys and
        values there; `mask` marks which columns each row attends to."""
        self.cache.window(len(ids), mask.shape[1] - ids.shape[1])
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                          use_cache=True, logits_to_keep=keep).logits

    def run(self, stop_ids: list[int], max_new_tokens: int, pick):
        """(new token ids without the stop token, stopped, reference loss, reference tokens) per row."""
        logits = self._prefill()
        losses = self._reference_loss(logits) if any(p.reference for p in self.prompts) else [(0.0, 0)] * len(
            self.prompts)
        tokens, stopped = self._decode(logits, stop_ids, max_new_tokens, pick)
        return [(t, s, loss, n) for t, s, (loss, n) in zip(tokens, stopped, losses)]

    def _prefill(self) -> torch.Tensor:
        """Fill the cache with the prompts; the logits after each prompt's last token.

        The tokens every prompt starts with (system prompt, template header: often a third of a prompt)
        are run once and their cache repeated for each row; each row's rest follows, left-padded, so
        the padding sits between the shared part and the rest, masked out, with positions that skip it.
        """
        prompts = [p.ids for p in self.prompts]
        shared = _shared_prefix(prompts, max(min(map(len, prompts)) - 1, 0))
        if shared:
            head = self._tensor([prompts[0][:shared]])
            self._forward(head, torch.ones_like(head), torch.arange(shared, device=self.device)[None])
            self.cache.spread(shared)
        rest = [ids[shared:] for ids in prompts]
        width = max(map(len, rest))
        ids = self._tensor([[self.pad_id] * (width - len(r)) + r for r in rest])
        mask = self._tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest])
        self.positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)  # as generate(): padding does not shift them
        self.mask = torch.cat([mask.new_ones(len(rest), shared), mask], dim=1)
        return self._forward(ids, self.mask, self.positions)[:, -1]

    def _reference_loss(self, first: torch.Tensor) -> list[tuple[float, int]]:
        """Feed each row's reference after its prompt; Σ cross-entropy over its trained tokens. The
        prompt's last logits predict the first reference token. The cache is cut back to the prompt."""
        refs = [p.reference for p in self.prompts]
        length = max(len(r) for r in refs)
        ids = self._tensor([r + [self.pad_id] * (length - len(r)) for r in refs])
        trained = self._tensor([p.trained + [False] * (length - len(p.trained)) for p in self.prompts])
        logits = first[:, None]
        if length > 1:
            real = self._tensor([[1] * len(r) + [0] * (length - len(r)) for r in refs])
            steps = torch.arange(1, length, device=self.device)
            rest = self._forward(ids[:, :-1], torch.cat([self.mask, real[:, :-1]], dim=1),
                                 self.positions[:, -1:] + steps, keep=0)
            logits = torch.cat([logits, rest], dim=1)
        out = []
        for row in range(len(refs)):  # row by row: one row's fp32 logits at a time
            nll = F.cross_entropy(logits[row].float(), ids[row], reduction="none")
            out.append((float(nll[trained[row]].sum()), int(trained[row].sum())))
        return out

    def _decode(self, logits: torch.Tensor, stop_ids: list[int], max_new_tokens: int, pick):
        n = len(self.prompts)
        stop = self._tensor(stop_ids)
        mask, positions = self.mask, self.positions[:, -1:]
        live: list[int | None] = list(range(n))  # the batch row each cache row decodes; None once it stopped
        tokens, stopped = [[] for _ in range(n)], [False] * n
        for step in range(max_new_tokens):
            chosen = pick(logits)
            for i, (token, ended) in enumerate(zip(chosen.tolist(), torch.isin(chosen, stop).tolist())):
                row = live[i]
                if row is not None and ended:
                    stopped[row], live[i] = True, None
                elif row is not None:
                    tokens[row].append(token)
            finished = live.count(None)
            if finished == len(live) or step == max_new_tokens - 1:
                break
            if finished * _COMPACT >= len(live):  # compacting copies the cache: not at every row that stops
                keep = self._tensor([i for i, row in enumerate(live) if row is not None])
                self.cache.keep(keep, mask.shape[1])
                live = [live[i] for i in keep.tolist()]
                chosen, mask, positions = chosen[keep], mask[keep], positions[keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = positions + 1
            logits = self._forward(chosen[:, None], mask, positions)[:, -1]
        return tokens, stopped


# Stopped rows leave the decoding batch once they are at least 1/_COMPACT of it.
_COMPACT = 4


class _Cache(Cache):
    """Keys and values in buffers allocated once (rows × heads × columns × head dim per layer) and written
    in place: the next forward's tokens go to rows [0, rows) from column `start` (`window`), and attend to
    the columns before them, masked by the 2D attention mask the forward gets. Instead of DynamicCache's
    concatenation at every step and row selection at every stopped row."""

    def __init__(self, layers: int, rows: int, columns: int):
        super().__init__(layers=[_Layer(self) for _ in range(layers)])
        self.size, self.rows, self.start = (rows, columns), rows, 0

    def window(self, rows: int, start: int) -> None:
        self.rows, self.start = rows, start

    def spread(self, width: int) -> None:
        """Copy row 0's first `width` columns to every row."""
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                buffer[1:, :, :width] = buffer[:1, :, :width]

    def keep(self, rows: torch.Tensor, width: int) -> None:
        """Move `rows` (ascending) to the front; only the first `width` columns hold anything."""
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                buffer[:len(rows), :, :width] = buffer[rows, :, :width]


class _Layer(CacheLayerMixin):
    def __init__(self, cache: _Cache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # zeros, not empty: masked columns still meet the values (0 × NaN would be NaN)
        rows, columns = self.cache.size
        self.keys = key_states.new_zeros(rows, key_states.shape[1], columns, key_states.shape[3])
        self.values = value_states.new_zeros(rows, value_states.shape[1], columns, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, start, end = self.cache.rows, self.cache.start, self.cache.start + key_states.shape[2]
        self.keys[:rows, :, start:end] = key_states
        self.values[:rows, :, start:end] = value_states
        return self.keys[:rows, :, :end], self.values[:rows, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.start

    def get_max_length(self) -> int:
        return self.cache.size[1]


def _adapter(model, on: bool):
    """The context generate runs in: adapter off; on, folded into the weights where that only changes
    rounding; else on through PEFT."""
    if not on:
        return model.disable_adapter()
    return _folded(model) if _foldable(model) else contextlib.nullcontext()


def _foldable(model) -> bool:
    """Whether the adapter can be added into the base weights with rounding the only change: plain LoRA
    on fp32 nn.Linear layers (not 4-bit ones: QLoRA keeps PEFT's path; nor 16-bit, where the sum would
    round the adapter's small update away)."""
    from peft.tuners.lora import LoraLayer

    name = model.active_adapter
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(
        type(m.get_base_layer()) is torch.nn.Linear and m.get_base_layer().weight.dtype == torch.float32
        and name not in m.lora_variant and not m.lora_bias[name] and not m.merged for m in layers)


@contextlib.contextmanager
def _folded(model):
    """The adapter added into the base weights while the body runs, with PEFT's adapter path off: its
    unmerged layers cost extra ops at every linear layer of every step. The sums are new tensors; the
    base's own are never written, and are put back after."""
    from peft.tuners.lora import LoraLayer

    name = model.active_adapter
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    bases = [m.get_base_layer() for m in layers]
    weights = [base.weight.data for base in bases]
    try:
        for layer, base, weight in zip(layers, bases, weights):
            base.weight.data = weight + layer.get_delta_weight(name)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in zip(bases, weights):
            base.weight.data = weight


def _shared_prefix(rows: list[list[int]], limit: int) -> int:
    """How many leading tokens all rows have in common, at most `limit`."""
    n = 0
    while n < limit and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return n


def _picker(sampling: Sampling, device: torch.device):
    """logits (rows × vocab) → the chosen token of each row."""
    if sampling.temperature == 0:
        return lambda logits: logits.argmax(-1)
    generator = torch.Generator(device).manual_seed(sampling.seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the more likely ones already cover top_p (the first always stays)
            sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        # argmax of p / Exp(1) noise draws token i with probability p_i: torch.multinomial, but much
        # faster over a whole vocabulary on CPU
        return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)

    return sample
