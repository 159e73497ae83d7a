"""Render a conversation with a chat template and mask the loss to exactly the assistant turns
(plain prompt/completion and text without a template: `render_plain`).

Works for any Jinja chat template, with or without `{% generation %}` markers, by rendering prefixes:
for the assistant message i, P = messages[:i] rendered with the generation prompt and
Q = messages[:i+1] must both be prefixes of the full rendering F, so F[len(P):len(Q)] is exactly
what turn i added (Q may also end in a closing tail of special tokens that F ends with too, as
Phi-3's eos after the last message). In that span we train the assistant content and the text after
it up to and including the end-of-turn marker (the first special token), nothing else. Every example
is checked by decoding its trained tokens back to that text; any doubt raises `RenderError`.

`render_examples` gives the same result for many examples at once, with the template and the
tokenizer called once per batch instead of once per text (a test holds it equal to `render_example`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Literal

import jinja2

from lorakit.data import sandbox
from lorakit.data.errors import DataError
from lorakit.data.formats import Example

IGNORE = -100
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


class RenderError(DataError):
    """The chat template and this example cannot give an exact loss mask; the message says why."""


@dataclass
class Rendered:
    """Token ids of one example; `labels` is the id where the loss is taken and -100 elsewhere.

    `turn_starts` holds the index of the first trained token of each trained answer (empty when the
    whole text is trained), so that truncation can tell when it would cut an answer off entirely.
    """

    input_ids: list[int]
    labels: list[int]
    turn_starts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Turn:
    index: int  # position of the assistant message in `messages`
    content: str  # the content as the template printed it (as given, or stripped)
    start: int  # character offsets in the full rendering: trained text is [start, end)
    content_end: int
    end: int
    eot: str | None  # the end-of-turn special token, None when the turn ends in plain text


def render(
    tokenizer,
    messages: list[dict],
    *,
    loss_on: Literal["assistant", "all"] = "assistant",
    template: str | None = None,
    source: str = "example",
    train_from: int = 0,
) -> Rendered:
    """Tokenize `messages` with the chat template (`template` overrides the tokenizer's).

    `loss_on="assistant"` trains each assistant content from `messages[train_from]` on, and its
    end-of-turn marker; `loss_on="all"` trains every token except a BOS that lorakit prepends.
    `source` (e.g. `train.jsonl:17`) names the example in errors.
    """
    if loss_on == "assistant":
        text, turns = _trace(tokenizer, messages, template, source, train_from)
    elif loss_on == "all":
        text, turns = _chat(tokenizer, messages, template, source, "the conversation"), None
    else:
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _tokens(tokenizer, text, turns, enc["input_ids"], enc["offset_mapping"], source)


def render_examples(
    tokenizer,
    examples: list[Example],
    *,
    loss_on: Literal["assistant", "completion", "all"] = "assistant",
    template: str | None = None,
) -> list[Rendered | DataError]:
    """`render_example` of each example, in order, with the error it raises in its place; the same
    token ids and labels, only faster: the chat template renders every text of the batch in one call
    and the tokenizer encodes them in one call (per-call overhead dominates short examples).

    Examples the batch cannot take as they are (plain text, a turn with nothing before it) and every
    example of a batch whose template raises go through `render_example` one by one, so that each
    error is the one it raises.
    """
    out: list[Rendered | DataError | None] = [None] * len(examples)
    jobs = []
    for k, example in enumerate(examples):
        job = _job(tokenizer, example, loss_on, template)
        if job is None:
            out[k] = _one(tokenizer, example, loss_on, template)
        else:
            jobs.append((k, job))
    try:
        texts = _chat_batch(tokenizer, [job for _, job in jobs], template)
    except jinja2.TemplateError:
        texts = None
    traced = []
    for (k, job), rendered in zip(jobs, texts or [None] * len(jobs)):
        if rendered is None:
            out[k] = _one(tokenizer, examples[k], loss_on, template)
            continue
        full = rendered[len(job.messages), False]
        try:
            turns = _turns(tokenizer, job.messages, full, lambda n, prompt: rendered[n, prompt], job.source,
                           job.train_from) if job.trace else None
        except DataError as e:
            out[k] = e
            continue
        traced.append((k, job, full, turns))
    if traced:
        enc = tokenizer([text for _, _, text, _ in traced], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False)
        for (k, job, text, turns), ids, offsets in zip(traced, enc["input_ids"], enc["offset_mapping"]):
            try:
                out[k] = _tokens(tokenizer, text, turns, ids, offsets, job.source)
            except DataError as e:
                out[k] = e
    return out


@dataclass(frozen=True)
class _Job:
    """A conversation to render: the (messages[:k], generation prompt) renderings it needs, in order."""

    messages: list[dict]
    needs: tuple[tuple[int, bool], ...]
    trace: bool  # loss on the assistant turns (else on everything)
    train_from: int
    source: str


def _job(tokenizer, example: Example, loss_on: str, template: str | None) -> _Job | None:
    """What `render_example` would render for a conversation; None when it takes another path."""
    if example.text is not None or (template is None and tokenizer.chat_template is None):
        return None
    messages = example.conversation()
    trace = loss_on != "all"
    train_from = example.train_from if loss_on == "completion" else 0
    needs = [(len(messages), False)]
    if trace:
        for i in _trained(messages, train_from):
            if i == 0:  # nothing to render before it: `render` reports it
                return None
            needs += [(i, True)] + ([(i + 1, False)] if i + 1 < len(messages) else [])
    return _Job(messages, tuple(needs), trace, train_from, example.source)


def _chat_batch(tokenizer, jobs: list[_Job], template: str | None) -> list[dict]:
    """For each job, its renderings keyed by (k, generation prompt): two template calls in all."""
    out: list[dict] = [{} for _ in jobs]
    for prompt in (False, True):
        keys = [(j, need) for j, job in enumerate(jobs) for need in job.needs if need[1] is prompt]
        if not keys:
            continue
        texts = sandbox.render_chats(tokenizer, [jobs[j].messages[: need[0]] for j, need in keys], template, prompt)
        for (j, need), text in zip(keys, texts):
            out[j][need] = text
    return out


def _one(tokenizer, example: Example, loss_on: str, template: str | None) -> Rendered | DataError:
    try:
        return render_example(tokenizer, example, loss_on=loss_on, template=template)
    except DataError as e:
        return e


def _tokens(tokenizer, text: str, turns: list[_Turn] | None, ids: list[int], offsets, source: str) -> Rendered:
    """The rendered text's token ids masked to `turns` (every token when None), checked, with BOS."""
    starts = []
    if turns is None:
        labels = list(ids)
    else:
        labels, groups = _mask(ids, offsets, text, turns, source)
        _verify(tokenizer, ids, text, turns, groups, source)
        starts = [group[0] for group in groups]
    # The template decides BOS. Only when it emits none and the tokenizer would add one on its own
    # (as the model saw in pretraining) do we add it, untrained; never a second one.
    if _adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
        ids, labels, starts = [tokenizer.bos_token_id, *ids], [IGNORE, *labels], [k + 1 for k in starts]
    return Rendered(ids, labels, starts)


def render_example(
    tokenizer,
    example: Example,
    *,
    loss_on: Literal["assistant", "completion", "all"] = "assistant",
    template: str | None = None,
) -> Rendered:
    """Render any normalized example.

    Conversations go through the chat template. Plain prompt/completion goes through it too, as one
    user and one assistant turn, when there is a template (the tokenizer's or `template`), so training
    matches how the model is prompted; without one it is plain text, prompt + completion + eos.
    Plain text trains every token whatever `loss_on` says. `loss_on="completion"` trains only the
    completion of prompt/completion data (for conversations it is the same as "assistant").
    """
    if example.text is not None:
        return render_plain(tokenizer, "", example.text, loss_on="all", source=example.source)
    has_template = template is not None or tokenizer.chat_template is not None
    if example.prompt is not None and not has_template:
        return render_plain(tokenizer, example.prompt, example.completion, loss_on=loss_on, source=example.source)
    messages = example.conversation()
    train_from = example.train_from if loss_on == "completion" else 0
    mode = "all" if loss_on == "all" else "assistant"
    return render(tokenizer, messages, loss_on=mode, template=template, source=example.source, train_from=train_from)


def render_plain(tokenizer, prompt: str, completion: str, *, loss_on: str = "completion",
                 source: str = "example") -> Rendered:
    """prompt + completion + eos, tokenized as one text (as a base model reads it); the completion and
    the eos are trained (everything with `loss_on="all"`). A token that spans the prompt/completion
    boundary cannot be split between untrained and trained, so it raises `RenderError`."""
    text = prompt + completion
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), list(enc["input_ids"])
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if loss_on != "all" and s < len(prompt):
            if e > len(prompt):
                raise RenderError(
                    f"{source}: the token {text[s:e]!r} is partly prompt and partly completion, so the loss "
                    "mask cannot be exact; tokenizers attach a space to the word after it, so end the prompt "
                    "without a trailing space and start the completion with it"
                )
            labels[k] = IGNORE
    if tokenizer.eos_token_id is not None:  # so that the model learns to stop
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    starts = [] if loss_on == "all" else [next(k for k, lab in enumerate(labels) if lab != IGNORE)]
    if starts:
        got = tokenizer.decode(ids[starts[0]:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if got != completion + (tokenizer.eos_token or ""):
            raise RenderError(f"{source}: the trained tokens decode to {_clip(got)!r}, not to the completion "
                              f"{_clip(completion)!r} + eos; the tokenizer's offsets disagree with its text")
    if _adds_bos(tokenizer):
        ids, labels, starts = [tokenizer.bos_token_id, *ids], [IGNORE, *labels], [k + 1 for k in starts]
    return Rendered(ids, labels, starts)


def eot_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """The end-of-turn token id(s) of the template, then the tokenizer's eos: the stop tokens."""
    _, (turn,) = _trace(tokenizer, _PROBE, template, "end-of-turn probe")
    ids = [] if turn.eot is None else [tokenizer.convert_tokens_to_ids(turn.eot)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _trace(tokenizer, messages: list[dict], template: str | None, source: str,
           train_from: int = 0) -> tuple[str, list[_Turn]]:
    """The full rendering and, for each assistant message from `train_from` on, the range to train."""

    def rendered(k: int, prompt: bool) -> str:
        what = f"messages[:{k}]" + (" + generation prompt" if prompt else "")
        return _chat(tokenizer, messages[:k], template, source, "the conversation" if k == len(messages) else what,
                     prompt)

    full = rendered(len(messages), False)
    return full, _turns(tokenizer, messages, full, rendered, source, train_from)


def _trained(messages: list[dict], train_from: int) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]


def _turns(tokenizer, messages: list[dict], full: str, rendered, source: str, train_from: int) -> list[_Turn]:
    """The range to train in the full rendering of each assistant message from `train_from` on;
    `rendered(k, prompt)` is the rendering of messages[:k], with the generation prompt when `prompt`."""
    specials = _specials(tokenizer)
    turns = []
    for i in _trained(messages, train_from):
        message = messages[i]
        where = f"{source}: assistant turn messages[{i}]"
        if i == 0:  # a chat template cannot render the empty prompt in front of it
            raise RenderError(f"{where}: the conversation starts with the assistant, so there is no prompt "
                              "to train an answer to; start it with a user (or system) message, or use "
                              "data.loss_on: all")
        before = rendered(i, True)
        if not full.startswith(before):
            raise RenderError(
                f"{where}: the template's generation prompt is not how it starts this turn inside the "
                f"conversation ({_divergence(before, full)}), so the model would be trained on other "
                "text than it sees when generating; use a template whose generation prompt matches "
                "(data.template: path to a .jinja file)"
            )
        last = i == len(messages) - 1  # then messages[:i + 1] is the whole conversation: no second rendering
        through = full if last else rendered(i + 1, False)
        hi = _shared_length(through, full, specials)
        if hi is None:
            raise RenderError(
                f"{where}: the chat template renders the conversation up to this turn differently once "
                f"later turns follow ({_divergence(through, full)}); it rewrites earlier turns (e.g. "
                "drops earlier reasoning), so an exact loss mask cannot be derived. Use a template that "
                "renders each turn the same whatever follows (data.template: path to a .jinja file), or "
                "split the conversation so that each example ends with the one assistant turn it trains"
            )
        if hi < len(before):
            raise RenderError(
                f"{where}: the generation prompt renders longer than the assistant turn itself, "
                "so the turn's text cannot be located"
            )
        turn = _locate(full, len(before), hi, message["content"], i, specials, where)
        if hi < len(through) and turn.eot is None:
            raise RenderError(
                f"{where}: the template ends this turn with {_clip(through[hi:])!r} only when it is the "
                "last one, and no end-of-turn token follows the content inside the conversation, so "
                "where the turn ends cannot be told"
            )
        turns.append(turn)
    if not turns:
        raise RenderError(f"{source}: no assistant message, so nothing would be trained")
    return turns


def _shared_length(part: str, full: str, specials: tuple[str, ...]) -> int | None:
    """How much of `part` the full rendering starts with: all of it, or all but a closing tail.

    A closing tail is special tokens and whitespace that the template writes only after the last
    message (Phi-3 appends eos) and that the full rendering ends with too. None when neither holds.
    """
    k = len(part)
    while True:
        if full.startswith(part[:k]) and full.endswith(part[k:]):
            return k
        if k and part[k - 1].isspace():
            k -= 1
            continue
        closing = next((t for t in specials if part.endswith(t, 0, k)), None)
        if closing is None:
            return None
        k -= len(closing)


def _locate(full: str, lo: int, hi: int, content: str, index: int, specials: tuple[str, ...], where: str) -> _Turn:
    """Find the assistant content in F[lo:hi] (the text turn `index` added) and its end of turn."""
    span = full[lo:hi]
    found = None
    for printed in dict.fromkeys((content, content.strip())):  # templates may trim the content
        at = _find_once(span, printed)
        if at == -2:
            raise RenderError(
                f"{where}: its content appears {span.count(printed)} times in what the template added "
                f"for the turn ({_clip(span)!r}), so which one to train is ambiguous"
            )
        if at >= 0:
            found = (at, printed)
            break
    if found is None:
        raise RenderError(
            f"{where}: the template changes the assistant content (it is not printed as given nor "
            f"stripped), so the trained text cannot be located; the turn rendered as {_clip(span)!r}"
        )
    at, printed = found
    content_end = at + len(printed)
    marker = _pattern(specials).search(span, content_end) if specials else None
    if marker:
        end, eot = marker.end(), marker.group()
    else:  # a template that ends turns in plain text: train it, not the whitespace before the next turn
        end, eot = max(content_end, len(span.rstrip())), None
    return _Turn(index, printed, lo + at, lo + content_end, lo + end, eot)


def _find_once(span: str, text: str) -> int:
    """Offset of `text` in `span`: at the start, or its only occurrence; -1 if absent, -2 if ambiguous."""
    if span.startswith(text):
        return 0
    count = span.count(text)
    return span.find(text) if count == 1 else (-1 if count == 0 else -2)


def _mask(ids, offsets, text: str, turns: list[_Turn], source: str):
    """Labels from character ranges, plus the trained token indices of each turn."""
    labels = [IGNORE] * len(ids)
    groups: list[list[int]] = [[] for _ in turns]
    r, turn = 0, turns[0]
    start, end, group = turn.start, turn.end, groups[0]  # of turns[r], read once: this loop is per token
    for k, (s, e) in enumerate(offsets):
        if end <= s:
            while r < len(turns) and turns[r].end <= s:
                r += 1
            if r == len(turns):
                break
            turn = turns[r]
            start, end, group = turn.start, turn.end, groups[r]
        if e <= start:
            continue
        if s < start or e > end:
            raise RenderError(
                f"{source}: assistant turn messages[{turn.index}]: token {k} ({text[s:e]!r}) is partly "
                f"template text and partly the trained text {_clip(text[turn.start:turn.end])!r}, so "
                "the loss mask cannot be exact. This happens when the content starts with whitespace "
                "that the tokenizer merges with the template's text before it (strip the content), "
                "or when the template glues the content to a word"
            )
        labels[k] = ids[k]
        group.append(k)
    return labels, groups


def _verify(tokenizer, ids, text: str, turns: list[_Turn], groups, source: str) -> None:
    """Each turn's trained tokens must decode to exactly its content + end-of-turn text."""
    for turn, group in zip(turns, groups):
        want = turn.content + text[turn.content_end : turn.end]
        got = tokenizer.decode(
            [ids[k] for k in group], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if got != want:
            raise RenderError(
                f"{source}: assistant turn messages[{turn.index}]: the trained tokens decode to "
                f"{_clip(got)!r} but should be {_clip(want)!r}; the tokenizer's offsets disagree with "
                "its text, so this mask cannot be trusted"
            )


def _chat(tokenizer, messages, template, source: str, what: str, generation_prompt: bool = False) -> str:
    if template is None and tokenizer.chat_template is None:
        raise RenderError(
            "the tokenizer has no chat template; set data.template to the path of a .jinja file"
        )
    try:
        return sandbox.render_chat(tokenizer, messages, template, generation_prompt)  # bounded output
    except jinja2.TemplateError as e:
        raise RenderError(f"{source}: the chat template failed rendering {what}: {e}") from e


@functools.lru_cache(maxsize=8)
def _specials(tokenizer) -> tuple[str, ...]:
    """The special token strings (and eos), longest first so that a match prefers the longest."""
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
    if tokenizer.eos_token:
        tokens.add(tokenizer.eos_token)
    return tuple(sorted(tokens, key=lambda t: (-len(t), t)))


@functools.lru_cache(maxsize=8)
def _pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, specials)))


@functools.lru_cache(maxsize=8)  # asked once per tokenizer, not once per example
def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _divergence(part: str, full: str) -> str:
    at = next((k for k, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
    alone, within = _clip(part[at:], 60), _clip(full[at:], 60)
    return f"at character {at}: alone {alone!r}, in the full conversation {within!r}"


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
