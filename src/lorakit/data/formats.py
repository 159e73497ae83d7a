"""Turn a row of any accepted shape into an `Example`: detect the format, apply `data.columns`, check it.

Formats (TRL's dataset shapes, plus the two most common community ones):
  messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
  prompt_completion  {"prompt": "...", "completion": "..."}  or both as message lists (conversational)
  text               {"text": "..."}
  alpaca             {"instruction": "...", "input": "...", "output": "..."}  (+ optional system, history)
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lorakit.data.errors import DataError
from lorakit.data.readers import kind

ROLES = ("system", "user", "assistant", "tool")
FORMATS = {  # the keys that identify each format, in the order candidates are listed
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
}
FIELDS = ("messages", "prompt", "completion", "text", "instruction", "input", "output", "system", "history",
          "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
                  "function": "tool"}
_SHAPE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass
class Example:
    """One training example. `source` is `file:line` (or `file:row N`) as the user wrote the file name.

    A conversation has `messages`; plain prompt/completion data has `prompt` and `completion` instead,
    and plain text `text`. In a conversational prompt/completion, `messages[:train_from]` is the prompt.
    """

    source: str
    messages: list[dict] | None
    meta: dict = field(default_factory=dict)
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    train_from: int = 0
    format: str = "messages"

    def conversation(self) -> list[dict] | None:
        """The example as messages (plain prompt/completion as one user and one assistant turn)."""
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]
        return self.messages


def check_columns(columns: dict) -> None:
    """`data.columns` maps lorakit's field names to the user's column names."""
    unknown = [k for k in columns if k not in FIELDS]
    if unknown:
        raise DataError(f"data.columns: unknown field {unknown[0]!r}; its keys are lorakit's fields "
                        f"({', '.join(FIELDS)}) and its values your column names, e.g. "
                        "{prompt: question, completion: answer}")


def rename(row: dict, columns: dict, where: str) -> dict:
    """The row with the user's columns renamed to lorakit's fields; other columns are kept."""
    if not columns:
        return row
    missing = [(ours, theirs) for ours, theirs in columns.items() if theirs not in row]
    if missing:
        ours, theirs = missing[0]
        raise DataError(f"{where}: no column {theirs!r} (data.columns maps {ours} to it); columns found: "
                        f"{_keys(row)}")
    theirs = set(columns.values())
    return {**{k: v for k, v in row.items() if k not in theirs}, **{ours: row[t] for ours, t in columns.items()}}


def detect(row: dict, where: str) -> str:
    """The format whose identifying keys the row has; a DataError when none or several fit."""
    candidates = [name for name, keys in FORMATS.items() if all(k in row for k in keys)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise DataError(f"{where}: the keys ({_keys(row)}) fit several formats: {', '.join(candidates)}; say which "
                        f"with data.format: {candidates[0]} (or {' | '.join(candidates[1:])}); other keys are kept "
                        "as metadata")
    if "role" in row and "content" in row:
        raise DataError(f"{where}: this row is a single message; each row must be a whole conversation like "
                        f"{_SHAPE}")
    raise DataError(f"{where}: cannot tell the data format from the keys ({_keys(row)}); lorakit reads "
                    "messages, prompt/completion, text, alpaca (instruction/input/output) and sharegpt "
                    f"(conversations). Map your columns to one of them, e.g. data.columns: {_suggest(row)}")


def normalize(row: dict, fmt: str, where: str) -> Example:
    """The row as an Example of format `fmt`; a DataError naming `where` when it does not fit."""
    example = {"messages": _messages_row, "sharegpt": _sharegpt_row, "alpaca": _alpaca_row,
               "prompt_completion": _prompt_completion_row, "text": _text_row}[fmt](row, where)
    example.format = fmt
    return example


# --- each format ----------------------------------------------------------------------------------------


def _messages_row(row: dict, where: str) -> Example:
    if "messages" not in row:
        raise DataError(f'{where}: no "messages" key (keys found: {_keys(row)}); each line must look like {_SHAPE}')
    meta = {k: v for k, v in row.items() if k != "messages"}
    messages = _message_list(row["messages"], where, "messages")
    _require_assistant(messages, where)
    return Example(where, messages, meta)


def _sharegpt_row(row: dict, where: str) -> Example:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "conversations" must be a non-empty list of turns like '
                        f'{{"from": "human", "value": "..."}}, got {kind(turns)}')
    messages = [_sharegpt_turn(t, f"{where}: conversations[{i}]") for i, t in enumerate(turns)]
    if isinstance(row.get("system"), str) and row["system"].strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})
    _require_assistant(messages, where)
    return Example(where, messages, {k: v for k, v in row.items() if k not in ("conversations", "system")})


def _sharegpt_turn(turn: object, where: str) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f'{where}: must be an object {{"from": ..., "value": "..."}}, got {_short(turn)}')
    speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if speaker not in SHAREGPT_ROLES:
        raise DataError(f"{where}: unknown speaker {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
    if not isinstance(text, str):
        raise DataError(f'{where}: "value" must be a string, got {kind(text)}')
    return _checked({"role": SHAREGPT_ROLES[speaker], "content": text}, where)


def _alpaca_row(row: dict, where: str) -> Example:
    for key in ("instruction", "input", "output", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {kind(row[key])}')
    messages = [{"role": "system", "content": row["system"]}] if (row.get("system") or "").strip() else []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f'{where}: history[{i}] must be a [question, answer] pair of strings, got {_short(pair)}')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = row["instruction"] + (f"\n\n{row['input']}" if (row.get("input") or "").strip() else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    for i, m in enumerate(messages):
        _checked(m, f"{where}: {'output' if i == len(messages) - 1 else 'instruction/history'}")
    meta = {k: v for k, v in row.items() if k not in ("instruction", "input", "output", "system", "history")}
    return Example(where, messages, meta)


def _prompt_completion_row(row: dict, where: str) -> Example:
    prompt, completion = row["prompt"], row["completion"]
    meta = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise DataError(f"{where}: the completion is empty, so there is nothing to train on; fill it in or "
                            "remove the row")
        return Example(where, None, meta, prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _message_list(prompt, where, "prompt")
        tail = _message_list(completion, where, "completion")
        if not any(m["role"] == "assistant" for m in tail):
            raise DataError(f"{where}: the completion has no assistant message, so there is nothing to train on")
        return Example(where, head + tail, meta, train_from=len(head))
    raise DataError(f'{where}: "prompt" and "completion" must both be strings or both lists of messages, got '
                    f"{kind(prompt)} and {kind(completion)}")


def _text_row(row: dict, where: str) -> Example:
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" must be a string, got {kind(text)}')
    if not text.strip():
        raise DataError(f"{where}: the text is empty; fill it in or remove the row")
    return Example(where, None, {k: v for k, v in row.items() if k != "text"}, text=text)


# --- messages ------------------------------------------------------------------------------------------


def _message_list(messages: object, where: str, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "{key}" must be a non-empty list of messages, got {kind(messages)}')
    return [_message(m, f"{where}: {key}[{i}]") for i, m in enumerate(messages)]


def _message(message: object, where: str) -> dict:
    """A checked copy: text parts joined, tool calls written into the content as JSON text, null keys
    (Arrow and Parquet fill absent struct fields with null) dropped."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f'{where}: must be an object {{"role": ..., "content": "..."}}, got {_short(message)}')
    if message["role"] not in ROLES:
        raise DataError(f"{where}: unknown role {message['role']!r}; allowed roles: {', '.join(ROLES)}")
    out = {k: v for k, v in message.items() if v is not None and k != "tool_calls"}
    out["content"] = _content(message, where)
    return _checked(out, where)


def _content(message: dict, where: str) -> str:
    content, calls = message["content"], message.get("tool_calls")
    if isinstance(content, list):
        content = _text_parts(content, where)
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise DataError(f'{where}: "content" must be a string, got {kind(content)}')
    if calls:
        # Kept as text so that every template renders them and the mask can be verified.
        content = "\n".join([content.rstrip()] * bool(content.strip()) + [_call_text(c, where) for c in calls])
    return content


def _text_parts(parts: list, where: str) -> str:
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise DataError(f'{where}: "content" parts must all be {{"type": "text", "text": "..."}}; images and '
                        "other media are not supported")
    return "".join(p["text"] for p in parts)


def _call_text(call: object, where: str) -> str:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f'{where}: each tool call must be {{"function": {{"name": ..., "arguments": ...}}}}, '
                        f"got {_short(call)}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass  # arguments that are not JSON are kept as the string they are
    return json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)


def _checked(message: dict, where: str) -> dict:
    if message["role"] == "assistant" and not message["content"].strip():
        raise DataError(f"{where}: the assistant turn is empty, so the model would learn to answer nothing; "
                        "fill it in or remove the row")
    return message


def _require_assistant(messages: list[dict], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so there is nothing to train on; add the assistant's "
                        "reply or remove the line")


# --- messages text -------------------------------------------------------------------------------------


def _keys(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def _suggest(row: dict) -> str:
    text = [k for k, v in row.items() if isinstance(v, str)]
    if len(text) >= 2:
        return f"{{prompt: {text[0]}, completion: {text[1]}}}"
    return f"{{text: {text[0]}}}" if text else "{messages: YOUR_COLUMN}"


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
