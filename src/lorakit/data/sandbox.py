"""Chat templates are code from whoever published the model: render them sandboxed and bounded.

The environment is transformers' own chat-template environment (an `ImmutableSandboxedEnvironment`
with the same extensions, filters and globals, so the text is exactly what `apply_chat_template`
gives) with limits added: no rendering may produce more than MAX_OUTPUT characters, build a string or
list that big through `*`, `%` or a call, raise a number to a huge power, or loop more than
MAX_LOOPS times in all. `lipsum`, the usual door to `__globals__`, is removed. A template that breaks
a limit or reaches for an unsafe attribute raises a `jinja2.TemplateError` (`SecurityError`), which
render.py reports as a RenderError naming the example.
"""

from __future__ import annotations

import copy
import functools
import math
import re

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

MAX_OUTPUT = 4 * 2**20  # characters of one rendering (a long conversation is a few hundred thousand)
MAX_LOOPS = 1_000_000  # items all `range()` calls of one rendering may yield together
_REASONING = ("reasoning_content", "thinking", "reasoning")  # names transformers aliases to each other


class TemplateTooLarge(jinja2.exceptions.SecurityError):
    """The template went past a bound on its output or its work."""


class _Bounded(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and \
                right * math.log2(abs(left)) > 4096:
            raise TemplateTooLarge(f"the chat template computes {left} ** {right}, a number too large to print")
        if operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        if operator == "%" and isinstance(left, str):
            _check_widths(left)
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs):
        _check_counts([*args, *kwargs.values()])
        if isinstance(getattr(obj, "__self__", None), str):  # 'x'.ljust(n), '{:>99999999}'.format(x)
            _check_widths(obj.__self__)
        return super().call(context, obj, *args, **kwargs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_repeat(seq, times) -> None:
    if isinstance(seq, (str, list, tuple)) and _is_int(times) and len(seq) * times > MAX_OUTPUT:
        raise TemplateTooLarge(f"the chat template builds a sequence of {len(seq) * times} items "
                               f"(limit {MAX_OUTPUT})")


def _check_counts(args) -> None:
    """Widths, counts and repeats passed to a filter or method (`center(n)`, `ljust(n)`, `indent(n)`)."""
    for arg in args:
        if _is_int(arg) and abs(arg) > MAX_OUTPUT:
            raise TemplateTooLarge(f"the chat template passes {arg} to a filter or method (limit {MAX_OUTPUT})")


def _check_widths(fmt: str) -> None:
    """Field widths in a format string (`'%099999999d'`, `'{:>99999999}'`)."""
    if any(len(digits) > 7 or int(digits) > MAX_OUTPUT for digits in re.findall(r"\d+", fmt)):
        raise TemplateTooLarge(f"the chat template formats with a field width over {MAX_OUTPUT}")


def _bounded_filter(f):
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # the context (if passed) and the value itself

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment mark
    def checked(*args, **kwargs):
        _check_counts([*args[skip:], *kwargs.values()])
        if f is _FORMAT and isinstance(args[0], str):
            _check_widths(args[0])
        return f(*args, **kwargs)

    return checked


_FORMAT = jinja2.filters.FILTERS["format"]


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # transformers' setup (extensions, filters, globals), taken from an empty template: compiling the
    # template itself there would fold its constant expressions, `'x' * 10**9` included, unbounded.
    like = _compile_jinja_template("").environment
    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[type(e) for e in like.extensions.values()])
    env.filters.update(like.filters)
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(like.globals)
    del env.globals["lipsum"]
    return env.from_string(template)


class _Loops:
    """`range` for one rendering: jinja's safe range, with a budget shared by every call."""

    def __init__(self):
        self.left = MAX_LOOPS

    def __call__(self, *args):
        r = safe_range(*args)
        self.left -= len(r)
        if self.left < 0:
            raise TemplateTooLarge(f"the chat template loops more than {MAX_LOOPS} times")
        return r


def render_chat(tokenizer, messages: list[dict], template: str | None, add_generation_prompt: bool) -> str:
    """What `tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, ...)` returns,
    rendered within the bounds above. Raises jinja2.TemplateError for a template error or a bound hit."""
    return render_chats(tokenizer, [messages], template, add_generation_prompt)[0]


def render_chats(tokenizer, conversations: list[list[dict]], template: str | None,
                 add_generation_prompt: bool) -> list[str]:
    """`render_chat` of each conversation (apply_chat_template's batched form), each one bounded."""
    compiled = _compile(tokenizer.get_chat_template(template))
    out = []
    for messages in conversations:
        variables = {**tokenizer.special_tokens_map, "messages": [_as_transformers_sees_it(m) for m in messages],
                     "tools": None, "documents": None, "add_generation_prompt": add_generation_prompt,
                     "range": _Loops()}
        size, parts = 0, []
        for part in compiled.generate(**variables):
            size += len(part)
            if size > MAX_OUTPUT:
                raise TemplateTooLarge(f"the chat template's output passed {MAX_OUTPUT} characters")
            parts.append(part)
        out.append("".join(parts))
    return out


def _as_transformers_sees_it(message: dict) -> dict:
    """A copy without null keys, the reasoning under each of its names (as apply_chat_template does)."""
    message = {k: copy.deepcopy(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message
