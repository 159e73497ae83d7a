"""`lorakit serve` on the embedded model, exercised with the official `openai` client and raw HTTP."""

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lorakit.chat import load_chat_model
from lorakit.serve import MAX_BODY, ChatServer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    """A server on a free loopback port, in a thread of this process."""
    srv = ChatServer(load_chat_model("smollm2-135m"), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                         max_retries=0, timeout=300)


def _post(server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=300)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    assert "Traceback" not in text
    return status, json.loads(text)


def test_non_streamed_completion(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"  # it ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in choice.message.content
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_sends_the_same_text_in_chunks(client):
    whole = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=16,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]


def test_malformed_requests_get_400_with_a_json_error(client, server):
    status, body = _post(server, b'{"messages": [{"role": "user", "content": "hi"}')
    assert status == 400 and "not valid JSON" in body["error"]["message"] and body["error"]["type"]
    status, body = _post(server, json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode())
    assert status == 400 and "messages[0]" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="m", messages=QUESTION, max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])


def test_oversized_body_is_refused_without_reading_it_into_a_request(server):
    status, body = _post(server, b" " * (MAX_BODY + 1))
    assert status == 413 and str(MAX_BODY) in body["error"]["message"]


def test_twenty_concurrent_requests_queue_and_all_get_answers(client, server):
    def ask(i: int) -> str:
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": f"Say the number {i}."}])
        return r.choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert len(answers) == 20 and all(answers)
    assert server.generating.acquire(blocking=False)  # nothing left holding the generation lock
    server.generating.release()


def test_a_client_leaving_mid_stream_stops_its_generation(client, server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=300)
    body = {"messages": [{"role": "user", "content": "Count from 1 to 1000, one number a line."}],
            "max_tokens": 4000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    assert conn.getresponse().read(200).startswith(b"data: ")
    conn.close()
    # Without the stop, the lock would stay held for up to 4000 tokens (minutes on CPU).
    assert server.generating.acquire(timeout=60)
    server.generating.release()
    assert client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2, temperature=0).choices
