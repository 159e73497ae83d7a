"""Batched generation from token prompts, with the adapter on or off in the same model, and the
teacher-forced loss of each prompt's reference answer from the same prompt pass.

A small decode loop instead of `model.generate`, for savings that keep greedy results the same (up to
float rounding: the same tokens computed in another batch shape or summation order):
- each prompt is run once for both the loss and the generation: its reference follows it in the same
  forward (those logits give the loss), in groups of rows of about the same length, so little padding
  is computed;
- the reference is a draft for decoding: a pick made after a reference token equal to the next one is
  the token decoding would have picked there, so a row whose answer starts like its reference skips
  those steps and keeps their keys and values; the other reference tokens leave its cache;
- keys and values are written in place into buffers allocated once; a row that ends stops costing
  compute once the ended rows are an eighth of the batch (they then leave it);
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
    the weights (`_adapter`). Prompts are sorted by length with their references, so each batch wastes
    little.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids) + len(_draft(prompts[i])))
    results: list[Generation | None] = [None] * len(prompts)
    pick = _picker(sampling, next(model.parameters()).device)
    model.eval()
    with _adapter(model, adapter):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = _Batch(model.get_base_model(), [prompts[i] for i in idx], tokenizer.pad_token_id, max_new_tokens)
            for i, (ids, stopped, (loss, n)) in zip(idx, batch.run(set(stop_ids), max_new_tokens, pick)):
                results[i] = Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids), stopped, loss, n)
    return results


class _Batch:
    """Prompts decoded together: the prefill, which gives the reference losses and each row's first
    tokens, then decoding until every row has stopped.

    Cache columns during the prefill: [0, shared) the tokens every prompt starts with, run once; then
    each row's rest of prompt and its draft but the last token (`fed`), right-aligned to column `end`,
    padding before them. Decoding first packs each row's kept columns to end at one column, and writes
    on from there. `mask` marks the columns each cache row attends to.
    """

    def __init__(self, model, prompts: list[Prompt], pad_id: int, max_new_tokens: int):
        self.model, self.prompts, self.pad_id = model, prompts, pad_id
        self.device = next(model.parameters()).device
        ids = [p.ids for p in prompts]
        self.shared = _shared_prefix(ids, max(min(map(len, ids)) - 1, 0))
        self.drafts = [_draft(p) for p in prompts]
        self.fed = [p.ids[self.shared:] + draft[:-1] for p, draft in zip(prompts, self.drafts)]
        self.end = self.shared + max(map(len, self.fed))
        self.cache = _Cache(model.config.num_hidden_layers, len(prompts), self.end + max_new_tokens)
        self.mask = torch.zeros(len(prompts), self.end + max_new_tokens, dtype=torch.bool, device=self.device)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.stopped = [False] * len(prompts)
        self.next: list[tuple[int, int] | None] = [None] * len(prompts)

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)

    def _forward(self, ids: torch.Tensor, rows: slice, start: int, positions: torch.Tensor,
                 keep: int | torch.Tensor = 1):
        """Run `ids` for cache rows `rows`, writing their keys and values from column `start` on."""
        self.cache.window(rows, start)
        return self.model(input_ids=ids, attention_mask=self.mask[rows, :start + ids.shape[1]],
                          position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=keep).logits

    def run(self, stop: set[int], max_new_tokens: int, pick):
        """(new token ids without the stop token, stopped, (reference loss, reference tokens)) per row."""
        if self.shared:
            head = self._tensor([self.prompts[0].ids[:self.shared]])
            self.mask[:, :self.shared] = True
            self._forward(head, slice(0, 1), 0, torch.arange(self.shared, device=self.device)[None])
            self.cache.spread(self.shared)
        losses, going = [], []
        for rows in _groups(list(map(len, self.fed)), _PREFILL_TOKENS):
            losses += self._prefill(rows, stop, max_new_tokens, pick)
            going += [row for row in range(rows.start, rows.stop) if self.next[row]]
        if going:
            self._decode(going, stop, max_new_tokens, pick)
        return list(zip(self.tokens, self.stopped, losses))

    def _prefill(self, rows: slice, stop: set[int], max_new_tokens: int, pick) -> list[tuple[float, int]]:
        """Run `rows` (a slice of rows, `fed` ascending) up to column `end`: their reference losses and
        first tokens; self.next[row] = (next input, its position) for each row that goes on decoding."""
        fed = self.fed[rows]
        width = max(map(len, fed))
        ids = self._tensor([[self.pad_id] * (width - len(f)) + f for f in fed])
        real = self._tensor([[False] * (width - len(f)) + [True] * len(f) for f in fed])
        self.mask[rows, self.end - width:self.end] = real
        positions = self.shared + (real.cumsum(-1) - 1).clamp(min=0)  # padding does not shift them
        drafts = self.drafts[rows]
        keep = max(max(len(d), 1) for d in drafts)  # the prompt's end and the draft's tokens
        # positions as a tensor: the lm_head then gets a contiguous input (one matmul, not one per row)
        logits = self._forward(ids, rows, self.end - width, positions,
                               keep=torch.arange(width - keep, width, device=self.device))
        picks = pick(logits.flatten(0, 1)).view(len(fed), keep).tolist()
        losses = []
        for i, (row, draft) in enumerate(zip(range(rows.start, rows.stop), drafts)):
            at = max(len(draft), 1)
            losses.append(_loss(logits[i, -at:], draft, self.prompts[row].trained) if draft else (0.0, 0))
            tokens, self.stopped[row], goes = _accept(picks[i][-at:], draft, stop, max_new_tokens)
            self.tokens[row] = tokens
            # the last token taken is the next input; the draft tokens before it keep their cache
            self.next[row] = (tokens[-1], len(self.prompts[row].ids) + len(tokens) - 1) if goes else None
        return losses

    def _decode(self, rows: list[int], stop: set[int], max_new_tokens: int, pick):
        """Decode `rows` from self.next until each stops or has max_new_tokens tokens."""
        column = self._pack(rows)
        owner: list[int | None] = list(rows)  # the row each cache row decodes; None once it has stopped
        chosen = self._tensor([self.next[row][0] for row in rows])
        positions = self._tensor([self.next[row][1] for row in rows])
        while True:
            self.mask[:len(owner), column] = True
            logits = self._forward(chosen[:, None], slice(0, len(owner)), column, positions[:, None])[:, -1]
            column, positions, chosen = column + 1, positions + 1, pick(logits)
            for i, token in enumerate(chosen.tolist()):
                row = owner[i]
                if row is not None and token in stop:
                    self.stopped[row], owner[i] = True, None
                elif row is not None:
                    self.tokens[row].append(token)
                    owner[i] = None if len(self.tokens[row]) == max_new_tokens else row
            finished = owner.count(None)
            if finished == len(owner):
                return
            if finished * _COMPACT >= len(owner):  # compacting copies the cache: not at every stop
                keep = self._tensor([i for i, row in enumerate(owner) if row is not None])
                self.cache.gather(keep, torch.arange(column, device=self.device).expand(len(keep), -1))
                self.mask[:len(keep)] = self.mask[keep]
                owner = [owner[i] for i in keep.tolist()]
                chosen, positions = chosen[keep], positions[keep]

    def _pack(self, rows: list[int]) -> int:
        """Move `rows` to the front of the cache, each row's columns after the shared ones that decoding
        keeps (its prompt, the draft tokens taken) moved to end at one column, which it returns: padding
        and draft tokens not taken leave the columns decoding attends to."""
        lengths = [self.next[row][1] - self.shared for row in rows]
        column = self.shared + max(lengths)
        source = torch.arange(column, device=self.device).repeat(len(rows), 1)
        self.mask[:len(rows)] = False
        self.mask[:len(rows), :self.shared] = True
        for i, (row, length) in enumerate(zip(rows, lengths)):
            start = self.end - len(self.fed[row])
            source[i, column - length:] = torch.arange(start, start + length, device=self.device)
            self.mask[i, column - length:column] = True
        self.cache.gather(self._tensor(rows), source)
        return column


# Tokens (rows × padded length) per prefill forward: its activations stay under glibc's 32 MiB mmap
# threshold, so their memory is reused instead of mapped and faulted in anew.
_PREFILL_TOKENS = 1024
# Stopped rows leave the decoding batch once they are at least 1/_COMPACT of it (on the demo, 1/8 beat
# 1/4 and 1/16 in a cost model from the rows' stopping steps).
_COMPACT = 8


def _groups(lengths: list[int], budget: int) -> list[slice]:
    """Consecutive rows (lengths ascending) in slices of at most `budget` tokens once padded; at least
    one row each."""
    groups, first = [], 0
    for row, length in enumerate(lengths):
        if row > first and (row - first + 1) * length > budget:
            groups.append(slice(first, row))
            first = row
    return groups + [slice(first, len(lengths))]


def _draft(prompt: Prompt) -> list[int]:
    """The reference up to its last trained token: the loss needs no logits after it, and decoding stops
    at the end-of-turn token a trained answer ends with. Its tokens are fed after the prompt."""
    last = max((i for i, trained in enumerate(prompt.trained) if trained), default=len(prompt.reference) - 1)
    return prompt.reference[:last + 1]


def _loss(logits: torch.Tensor, draft: list[int], trained: list[bool]) -> tuple[float, int]:
    """Σ cross-entropy of the draft's trained tokens; `logits` at the prompt's end and the draft but its last."""
    nll = F.cross_entropy(logits.float(), torch.tensor(draft, device=logits.device), reduction="none")
    mask = torch.tensor(trained[:len(draft)], device=logits.device)
    return float(nll[mask].sum()), int(mask.sum())


def _accept(picks: list[int], draft: list[int], stop: set[int], limit: int) -> tuple[list[int], bool, bool]:
    """A row's first tokens, from its picks at the prompt's end and after each draft token fed: while a
    pick equals the draft token fed next, it is the token decoding would have picked and fed there, so
    picks are taken up to the first that differs (or stops, or the last). At most `limit` tokens;
    returns (tokens without a stop token, stopped, decoding goes on from the last token)."""
    n = 0
    while n < len(picks) - 1 and picks[n] == draft[n] and picks[n] not in stop:
        n += 1
    made = picks[:n + 1][:limit]
    if made and made[-1] in stop:
        return made[:-1], True, False
    return made, False, len(made) < limit


class _Cache(Cache):
    """Keys and values in buffers allocated once (rows × heads × columns × head dim per layer) and written
    in place: the next forward's tokens go to cache rows `rows` from column `start` (`window`) and attend
    to the columns before them, as the 2D attention mask the forward gets allows. Instead of
    DynamicCache's concatenation at every step and row selection at every stopped row."""

    def __init__(self, layers: int, rows: int, columns: int):
        super().__init__(layers=[_Layer(self) for _ in range(layers)])
        self.size, self.rows, self.start = (rows, columns), slice(0, rows), 0

    def window(self, rows: slice, start: int) -> None:
        self.rows, self.start = rows, start

    def spread(self, width: int) -> None:
        """Copy row 0's first `width` columns to every row."""
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                buffer[1:, :, :width] = buffer[:1, :, :width]

    def gather(self, rows: torch.Tensor, columns: torch.Tensor) -> None:
        """Row i, column j becomes what row rows[i], column columns[i, j] held."""
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                buffer[:len(rows), :, :columns.shape[1]] = buffer[rows[:, None], :, columns].permute(0, 2, 1, 3)


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
        self.keys[rows, :, start:end] = key_states
        self.values[rows, :, start:end] = value_states
        return self.keys[rows, :, :end], self.values[rows, :, :end]

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
