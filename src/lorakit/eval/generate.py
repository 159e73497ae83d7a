"""Batched greedy generation from chat prompts, with the adapter on or off in the same model."""

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended on an end-of-turn token before max_new_tokens


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], *, stop_ids: list[int], max_new_tokens: int,
             batch_size: int, template: str | None = None, adapter: bool = True) -> list[Generation]:
    """One Generation per prompt (a message list ending before the answer), in input order.

    Prompts are sorted by length and left-padded so each batch wastes little; `adapter=False` runs the
    same PEFT model with its adapter disabled, so base and tuned share one copy of the weights.
    """
    texts = [tokenizer.apply_chat_template(p, chat_template=template, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    disabled = model.disable_adapter() if not adapter else contextlib.nullcontext()
    model.eval()
    with disabled:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, gen in zip(idx, _generate_batch(model, tokenizer, [encoded[i] for i in idx], stop_ids,
                                                   max_new_tokens)):
                results[i] = gen
    return results


def _generate_batch(model, tokenizer, batch: list[list[int]], stop_ids: list[int], max_new_tokens: int):
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad,
                         use_cache=True)
    for row in out[:, width:].tolist():
        stop_at = next((k for k, t in enumerate(row) if t in stop_ids), None)
        kept = row if stop_at is None else row[:stop_at]
        yield Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept), stop_at is not None)
