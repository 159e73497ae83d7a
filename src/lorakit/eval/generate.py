"""Batched generation from chat prompts, with the adapter on or off in the same model.

A small decode loop instead of `model.generate`: a row that emits an end-of-turn token leaves the
batch at once (its KV-cache row is dropped), so finished answers cost nothing while the rest of the
batch keeps generating. With `generate` they are computed to the end of the longest row: on the demo
task that is most of the tuned model's decode work. Greedy decoding gives the same tokens.
"""

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended on an end-of-turn token before max_new_tokens


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; otherwise softmax(logits / temperature) restricted to the top_p
    nucleus, drawn from a generator seeded with `seed` (the same settings give the same outputs)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], *, stop_ids: list[int], max_new_tokens: int,
             batch_size: int, template: str | None = None, adapter: bool = True,
             sampling: Sampling = Sampling()) -> list[Generation]:
    """One Generation per prompt (a message list ending before the answer), in input order.

    `model` is a PeftModel; `adapter=False` disables its adapter, so base and tuned share one copy of
    the weights. Prompts are sorted by length and left-padded so each batch wastes little.
    """
    texts = [tokenizer.apply_chat_template(p, chat_template=template, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    pick = _picker(sampling, next(model.parameters()).device)
    model.eval()
    with model.disable_adapter() if not adapter else contextlib.nullcontext():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = _decode(model.get_base_model(), [encoded[i] for i in idx], tokenizer.pad_token_id, stop_ids,
                           max_new_tokens, pick)
            for i, (ids, stopped) in zip(idx, rows):
                results[i] = Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids), stopped)
    return results


def _decode(model, batch: list[list[int]], pad_id: int, stop_ids: list[int], max_new_tokens: int, pick):
    """(new token ids without the stop token, stopped) for each row of `batch`."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(ids) for ids in batch)
    step = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate(): left padding does not shift positions
    cache, stop = DynamicCache(config=model.config), torch.tensor(stop_ids, device=device)
    live = list(range(len(batch)))  # the batch row each cache row belongs to
    tokens, stopped = [[] for _ in batch], [False] * len(batch)
    for _ in range(max_new_tokens):
        logits = model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        chosen = pick(logits)
        done = torch.isin(chosen, stop)
        for row, token, ended in zip(live, chosen.tolist(), done.tolist()):
            stopped[row] |= ended
            tokens[row] += [] if ended else [token]
        keep = (~done).nonzero().squeeze(1)
        if len(keep) == 0:
            break
        if len(keep) < len(live):
            cache.batch_select_indices(keep)
            live = [live[k] for k in keep.tolist()]
            chosen, mask, positions = chosen[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions, step = positions[:, -1:] + 1, chosen[:, None]
    return list(zip(tokens, stopped))


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
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample
