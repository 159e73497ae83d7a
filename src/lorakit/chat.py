"""`lorakit chat`: talk to a run (base + adapter, as trained) or a model in the terminal, tokens streamed.

In a terminal: /reset clears the history, /system TEXT sets the system prompt (and clears the history),
/exit quits. When stdin is not a terminal, all of it is one question: the answer is printed, chat exits.
`load_chat_model` and `Reply` are shared with `lorakit serve`.
"""

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from lorakit import console, models
from lorakit.data.render import eot_token_ids
from lorakit.errors import LorakitError
from lorakit.export.merge import encode_chat, load_trained, open_run

HELP = "/reset clears the history · /system TEXT sets the system prompt · /exit quits"


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    stop_ids: list[int]  # end-of-turn token(s), then eos
    name: str  # what /v1/models lists

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings


def load_chat_model(target: str | Path) -> ChatModel:
    """A run directory (its base + adapter, exactly as trained), a merged model directory, or any model
    name `models.resolve_model` accepts."""
    path = Path(target)
    device = models.default_device()
    if (path / "config.yaml").is_file():
        run = open_run(path)
        return ChatModel(load_trained(run, device), run.tokenizer, run.stop_ids, path.resolve().name)
    from transformers import AutoModelForCausalLM

    model_path = models.resolve_model(str(target))
    tokenizer = models.load_tokenizer(model_path)
    if tokenizer.chat_template is None:
        raise LorakitError(f"{target}: the tokenizer has no chat template, so there is no way to format a "
                           f"conversation. Chat with an instruct model, a run directory or a merged run.")
    dtype = models.resolve_precision("auto", device).dtype  # bf16 where the hardware runs it fast
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **models.weight_loading(model_path, False))
    model = model.to(device).eval()
    return ChatModel(model, tokenizer, eot_token_ids(tokenizer), path.name if path.exists() else str(target))


class _Cancelled(StoppingCriteria):
    """Stops generation once `event` is set: Ctrl-C in chat, a client gone in serve."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Reply:
    """One generated answer, iterated as text pieces while the model writes it. Afterwards `.text`,
    `.new_tokens` and `.finish_reason` ("stop": an end-of-turn token; "length": max_new_tokens) are set.
    Closing the iterator early (`contextlib.closing`) stops the generation at the next token."""

    def __init__(self, chat: ChatModel, messages: list[dict], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0):
        self.prompt = encode_chat(chat.tokenizer, messages)
        self.text, self.new_tokens, self.finish_reason = "", 0, None
        self._chat, self._cancelled, self._error = chat, threading.Event(), None
        self._streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        device = next(chat.model.parameters()).device
        self._kwargs = dict(input_ids=self.prompt.to(device), attention_mask=torch.ones_like(self.prompt).to(device),
                            max_new_tokens=max_new_tokens, eos_token_id=chat.stop_ids,
                            pad_token_id=chat.tokenizer.pad_token_id, streamer=self._streamer,
                            stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancelled)]),
                            **sampling)

    def __iter__(self):
        thread = threading.Thread(target=self._generate, daemon=True)
        thread.start()
        try:
            for piece in self._streamer:
                self.text += piece
                yield piece
        finally:  # also when the consumer stops early (closes this generator): stop and wait for the model
            self._cancelled.set()
            thread.join()
        if self._error is not None:
            raise self._error

    @torch.inference_mode()
    def _generate(self) -> None:
        try:
            out = self._chat.model.generate(**self._kwargs)[0, self.prompt.shape[1]:].tolist()
        except Exception as e:  # re-raised in the iterating thread, which would otherwise wait forever
            self._error = e
            self._streamer.end()
            return
        self.new_tokens = len(out)
        self.finish_reason = "stop" if out and out[-1] in self._chat.stop_ids else "length"


def chat(target: str | Path, max_new_tokens: int = 512) -> None:
    chat_model = load_chat_model(target)
    if not sys.stdin.isatty():
        _answer_stdin(chat_model, max_new_tokens)
        return
    console.info(f"chatting with {chat_model.name} · {HELP}")
    session = _Session()
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line.startswith("/"):
            session.command(line)
        elif line:
            messages = session.messages(line)
            try:
                reply = Reply(chat_model, messages, max_new_tokens=max_new_tokens)
            except LorakitError as e:  # the template refused it (say, a system prompt); the chat goes on
                console.error(str(e))
                continue
            answer = _stream(reply, prefix="bot> ")
            if answer is not None:  # an interrupted answer is not kept in the history
                session.history = messages[len(session.head):] + [{"role": "assistant", "content": answer}]


class _Session:
    """The conversation so far, and the system prompt (none: the template's default)."""

    def __init__(self):
        self.system: str | None = None
        self.history: list[dict] = []

    @property
    def head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self, question: str) -> list[dict]:
        return self.head + self.history + [{"role": "user", "content": question}]

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        if name == "/system":
            self.system = arg.strip() or None
        elif name != "/reset":
            console.info(HELP)
            return
        self.history = []
        console.info(f"history cleared; system prompt: {self.system or 'the template default'}")


def _answer_stdin(chat_model: ChatModel, max_new_tokens: int) -> None:
    question = sys.stdin.read().strip()
    if not question:
        raise LorakitError("chat: stdin was empty. Pipe a question, e.g.: echo 'Hello' | lorakit chat RUN_DIR")
    _stream(Reply(chat_model, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens))


def _stream(reply: Reply, prefix: str = "") -> str | None:
    """Print the reply as it is generated; Ctrl-C stops it (and returns None: it is not kept)."""
    sys.stdout.write(prefix)
    try:
        with contextlib.closing(iter(reply)) as pieces:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        print(" [stopped]")
        return None
    print()
    if reply.finish_reason == "length":
        console.warn("the answer reached the max_new_tokens limit without an end-of-turn token")
    return reply.text
