"""`lorakit serve`: an OpenAI-compatible endpoint for a run or a model, on the standard library alone.

POST /v1/chat/completions (streamed as server-sent events, or not) and GET /v1/models, enough for the
`openai` client and tools built on it to try a tuned model on real prompts. One generation runs at a
time (a lock): other requests wait their turn, up to MAX_WAITING, and beyond that get 503. Every
request is bounded (body size, message count, max_tokens) and every failure is a JSON error body; no
traceback reaches a client. It binds to loopback unless told otherwise: there is no authentication.
For production traffic serve the adapter with vLLM (docs/export.md).
"""

import contextlib
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lorakit import console
from lorakit.chat import ChatModel, Reply, load_chat_model
from lorakit.errors import LorakitError

MAX_BODY = 1 << 20  # bytes of JSON per request
MAX_MESSAGES = 256
MAX_TOKENS = 4096  # the largest max_tokens a request may ask for
DEFAULT_MAX_TOKENS = 512
MAX_WAITING = 64  # requests queued behind the one generating; more get 503
ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    """A request lorakit will not run; the message goes back to the client."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool


def parse_request(body: bytes) -> Request:
    """Validate a chat completion request body; raises BadRequest naming the field and the limit."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise BadRequest(f"'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    if messages[-1]["role"] == "assistant":
        raise BadRequest("the last message must be from the user (or system): the model answers it")
    if req.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    return Request(messages, _number(max_tokens, "max_tokens", 1, MAX_TOKENS, int),
                   _number(req.get("temperature", 1.0), "temperature", 0.0, 2.0, float),
                   _number(req.get("top_p", 1.0), "top_p", 0.0, 1.0, float), _flag(req.get("stream", False)))


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise BadRequest(f"messages[{i}] must be an object with 'role' one of {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # the content-parts form; only text parts mean anything here
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string")
    return {"role": m["role"], "content": content}


def _number(value, name: str, lo: float, hi: float, kind: type):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (kind is float or value == int(value))
    if not ok or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'} from {lo:g} to {hi:g}, "
                         f"got {json.dumps(value)}")
    return kind(value)


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"'stream' must be true or false, got {json.dumps(value)}")
    return value


def error_body(message: str, status: HTTPStatus) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class Handler(BaseHTTPRequestHandler):
    server: "ChatServer"
    timeout = 60  # seconds a client may take to send its request; a stalled one frees its thread

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.server.chat.name, "object": "model", "created": self.server.started, "owned_by": "lorakit"}]})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try /v1/models")

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try /v1/chat/completions")
            return
        try:
            req = parse_request(self._body())
            self._complete(req)
        except BadRequest as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; its generation was stopped
        except Exception as e:  # a bug or an exhausted device: the client gets a message, not a traceback
            console.warn(f"serve: {type(e).__name__}: {e}")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed ({type(e).__name__})")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
        if int(length) > MAX_BODY:
            self.close_connection = True
            if int(length) <= 4 * MAX_BODY:  # read it, so the client sees our answer instead of a reset
                self.rfile.read(int(length))
            raise BadRequest(f"the body is {length} bytes; the limit is {MAX_BODY}",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(int(length))

    def _complete(self, req: Request) -> None:
        chat = self.server.chat
        try:
            reply = Reply(chat, req.messages, max_new_tokens=req.max_tokens, temperature=req.temperature,
                          top_p=req.top_p)
        except LorakitError as e:  # the chat template refused the conversation
            raise BadRequest(str(e)) from None
        if reply.prompt.shape[1] + req.max_tokens > chat.context_length:
            raise BadRequest(f"the prompt is {reply.prompt.shape[1]} tokens; with max_tokens={req.max_tokens} it "
                             f"exceeds the model's context of {chat.context_length}")
        if not self.server.waiting.acquire(blocking=False):
            raise BadRequest(f"server busy: {MAX_WAITING} requests are already waiting", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            with self.server.generating:
                (self._stream if req.stream else self._whole)(reply)
        finally:
            self.server.waiting.release()

    def _whole(self, reply: Reply) -> None:
        for _ in reply:
            pass
        prompt_tokens = reply.prompt.shape[1]
        self._json(HTTPStatus.OK, {
            **self._envelope("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": reply.new_tokens,
                      "total_tokens": prompt_tokens + reply.new_tokens}})

    def _stream(self, reply: Reply) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        envelope = self._envelope("chat.completion.chunk")
        # A client that leaves raises here; closing `pieces` then stops the generation before the lock frees.
        with contextlib.closing(iter(reply)) as pieces:
            self._event({**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
            for piece in pieces:
                self._event({**envelope, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        self._event({**envelope, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def _envelope(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.server.chat.name}

    def _json(self, status: HTTPStatus, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, error_body(message, status))

    def log_message(self, format, *args):  # one line per request on our console, not raw stderr
        console.info(f"serve: {self.address_string()} {format % args}")


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections the OS holds before accept(); bursts of clients queue, not fail

    def __init__(self, chat: ChatModel, host: str, port: int):
        super().__init__((host, port), Handler)
        self.chat = chat
        self.generating = threading.Lock()
        self.waiting = threading.BoundedSemaphore(MAX_WAITING + 1)
        self.started = int(time.time())


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load `target` and answer requests until Ctrl-C."""
    chat = load_chat_model(target)
    server = ChatServer(chat, host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.warn(f"listening on {host}: anyone who can reach this port can use the model (no authentication)")
    console.info(f"serving {chat.name} at http://{host}:{server.server_address[1]}/v1 "
                 f"(OpenAI-compatible: /v1/chat/completions, /v1/models). Ctrl-C stops.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.info("stopped")
    finally:
        server.server_close()
