"""The OpenAI-compatible server (lmforge.inference.server) through the official ``openai`` client:
answers equal the engine's own, streaming, stop strings, OpenAI's error shapes, one generation at
a time under concurrent requests, client disconnects, failures inside generation, the API key."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
import uvicorn  # noqa: E402

from lmforge.inference.decoding import StaticGPTDecoder  # noqa: E402
from lmforge.inference.engine import Engine  # noqa: E402
from lmforge.inference.sampling import Sampling  # noqa: E402
from lmforge.inference.server import create_app  # noqa: E402
from lmforge.models.configuration_gpt import LmforgeGPTConfig  # noqa: E402
from lmforge.models.modeling_gpt import LmforgeGPTForCausalLM  # noqa: E402
from tests.finetune_fixtures import chat_tokenizer  # noqa: E402

KEY = "sekrit"
GREEDY = {"temperature": 0}
ERROR_KEYS = {"message", "type", "param", "code"}


class Flaky:
    """A decoder that can be slowed down (to overlap requests) or made to fail at a step."""

    def __init__(self, inner: StaticGPTDecoder):
        self.inner = inner
        self.delay = 0.0
        self.fail_at: int | None = None
        self.steps = 0  # in the current generation
        self.total = 0  # ever

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.steps = 0
        return self.inner.start(input_ids, attention_mask, max_new_tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.total += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        return self.inner.step(tokens)


def _start(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    return server, thread, sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup():
    """Two servers over one tiny GPT: ``plain`` (no key) and ``keyed`` (an API key, a Flaky
    decoder); ``ref`` is an engine of its own over the same model for the expected answers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = LmforgeGPTForCausalLM(LmforgeGPTConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128))
    plain = Engine(model, tok, name="tiny", decoder=StaticGPTDecoder(model))
    flaky = Flaky(StaticGPTDecoder(model))
    keyed = Engine(model, tok, name="tiny", decoder=flaky)
    ref = Engine(model, tok, name="tiny", decoder=StaticGPTDecoder(model))
    servers = [_start(create_app(plain)), _start(create_app(keyed, api_key=KEY))]
    yield {"ref": ref, "flaky": flaky, "port": servers[0][2], "keyed_port": servers[1][2]}
    for server, thread, _ in servers:
        server.should_exit = True
        thread.join(10)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{setup['port']}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def keyed(setup):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{setup['keyed_port']}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def flaky(setup):
    yield setup["flaky"]
    setup["flaky"].delay, setup["flaky"].fail_at = 0.0, None


def expected(ref: Engine, prompt: str | list[int], **sampling: Any):
    return ref.complete([prompt], Sampling(**sampling), stop_ids=None)[0]


def expected_chat(ref: Engine, messages: list[dict], **sampling: Any):
    return ref.complete([ref.chat_prompt(messages)], Sampling(**sampling), stop_ids=ref.chat_stop_ids)[0]


def raw(port: int, method: str, path: str, data: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A request without the openai client: (status, JSON body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_error(body: dict, code: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


# --------------------------------------------------------------------------- answers


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "lmforge"


def test_completion_equals_the_engines_answer(setup, client):
    got = client.completions.create(model="tiny", prompt="the king", max_tokens=12, **GREEDY)
    want = expected(setup["ref"], "the king", max_new_tokens=12, temperature=0)
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == "tiny"
    assert got.choices[0].text == want.text and got.choices[0].index == 0
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert got.usage.total_tokens == want.prompt_tokens + 12
    # max_tokens defaults to 16, as OpenAI's; a prompt as token ids
    assert client.completions.create(model="tiny", prompt="the king", **GREEDY).usage.completion_tokens == 16
    ids = setup["ref"].encode("the king")
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=12, **GREEDY).choices[0].text == want.text


def test_batched_prompts(setup, client):
    prompts = ["the king", "wherefore love"]
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, **GREEDY)
    want = setup["ref"].complete(prompts, Sampling(max_new_tokens=10, temperature=0))
    assert [(c.index, c.text) for c in got.choices] == [(w.index, w.text) for w in want]
    assert got.usage.completion_tokens == 20
    assert got.usage.prompt_tokens == sum(w.prompt_tokens for w in want)


def test_sampling_settings(setup, client):
    ref = setup["ref"]
    seeded = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 3}
    a, b = (client.completions.create(model="tiny", prompt="the king", **seeded).choices[0].text for _ in range(2))
    assert a == b == expected(ref, "the king", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3).text
    extras = {"top_k": 5, "repetition_penalty": 1.5}  # extensions, honoured
    got = client.completions.create(model="tiny", prompt="wherefore love", max_tokens=16, extra_body=extras, **GREEDY)
    want = expected(ref, "wherefore love", max_new_tokens=16, temperature=0, **extras).text
    assert got.choices[0].text == want != expected(ref, "wherefore love", max_new_tokens=16, temperature=0).text


def test_stop_strings(setup, client):
    full = expected(setup["ref"], "wherefore love", max_new_tokens=24, temperature=0).text
    assert " unspeakable" in full[1:]
    for stop in (" unspeakable", ["zzz", " unspeakable"]):
        got = client.completions.create(model="tiny", prompt="wherefore love", max_tokens=24, stop=stop, **GREEDY)
        assert got.choices[0].text == full[:full.index(" unspeakable")]
        assert got.choices[0].finish_reason == "stop"
        assert got.usage.completion_tokens < 24
    chunks = client.completions.create(model="tiny", prompt="wherefore love", max_tokens=24, stop=" unspeakable",
                                       stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(" unspeakable")]


def test_chat_completion(setup, client):
    messages = [{"role": "system", "content": "Answer as a lord."}, {"role": "user", "content": "thou art fair"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    want = expected_chat(setup["ref"], messages, max_new_tokens=12, temperature=0)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)
    # max_completion_tokens; content as text parts; the developer role is the system role
    parts = [{"role": "developer", "content": "Answer as a lord."},
             {"role": "user", "content": [{"type": "text", "text": "thou art "}, {"type": "text", "text": "fair"}]}]
    got = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=12, **GREEDY)
    assert got.choices[0].message.content == want.text


def test_streaming_completion(setup, client):
    whole = client.completions.create(model="tiny", prompt=["the king", "thou art fair"], max_tokens=14, **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt=["the king", "thou art fair"], max_tokens=14,
                                            stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    texts, reasons = ["", ""], [None, None]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in whole.choices] and reasons == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    plain = list(client.completions.create(model="tiny", prompt="the king", max_tokens=14, stream=True, **GREEDY))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_streaming_chat(setup, client):
    messages = [{"role": "user", "content": "wherefore love"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=14, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=14, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "stop"  # at <|end|>
    assert chunks[-2].choices[0].delta.content is None
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_sse_wire_format(setup):
    body = json.dumps({"model": "tiny", "prompt": "the king", "max_tokens": 3, "stream": True, **GREEDY}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{setup['port']}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


# --------------------------------------------------------------------------- errors


def test_errors_have_openais_shape_and_status(setup, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="the king")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert_error(e.value.response.json(), "model_not_found")
    bad = [({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
           ({"top_p": 0}, "top_p"), ({"n": 2}, "n"), ({"seed": 2**70}, "seed"), ({"prompt": "the king " * 100}, "prompt")]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", **{"prompt": "the king", **fields})
        assert e.value.param == param, fields
        assert_error(e.value.response.json())
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the king " * 100}])
    assert "context" in e.value.message and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "narrator", "content": "hi"}])
    assert "narrator" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[], max_completion_tokens=-3)
    assert e.value.param == "max_completion_tokens"
    assert client.completions.create(model="tiny", prompt="the king", max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_raw_request_errors(setup):
    port = setup["port"]
    status, body = raw(port, "POST", "/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert_error(body)
    status, body = raw(port, "POST", "/v1/completions", b'["not", "an", "object"]')
    assert status == 400
    assert_error(body)
    status, body = raw(port, "POST", "/v1/completions", json.dumps({"model": "tiny"}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    assert_error(body, "missing_required_parameter")
    status, body = raw(port, "POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw(port, "POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": 5}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = raw(port, "GET", "/v1/nothing")
    assert status == 404
    assert_error(body)
    status, body = raw(port, "GET", "/v1/completions")
    assert status == 405
    assert_error(body)
    status, body = raw(port, "POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                                    "user": "x", **GREEDY}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 2  # greedy: sampling may end at once


# --------------------------------------------------------------------------- concurrency, failures, auth


def test_concurrent_requests_are_not_interleaved(setup, keyed, flaky):
    flaky.delay = 0.005  # so that the requests overlap
    ref = setup["ref"]
    prompts = ["the king", "thou art fair", "wherefore love", "sweet death and night"]

    def ask(k: int) -> str:
        if k % 2:
            chunks = keyed.completions.create(model="tiny", prompt=prompts[k], max_tokens=20, stream=True, **GREEDY)
            return "".join(c.choices[0].text for c in chunks)
        return keyed.completions.create(model="tiny", prompt=prompts[k], max_tokens=20, **GREEDY).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    assert got == [expected(ref, p, max_new_tokens=20, temperature=0).text for p in prompts]


def test_disconnect_stops_generation_and_the_loop_stays_free(setup, keyed, flaky):
    flaky.delay = 0.02
    stream = keyed.completions.create(model="tiny", prompt="the king", max_tokens=100, stream=True, **GREEDY)
    next(iter(stream))
    began = time.monotonic()
    assert [m.id for m in keyed.models.list().data] == ["tiny"]  # answered while generating
    assert time.monotonic() - began < 1.0 and flaky.steps < 100
    stream.close()
    time.sleep(0.3)
    stopped = flaky.total
    time.sleep(0.2)
    assert flaky.total == stopped and flaky.steps < 60  # stopped soon after the client left
    # a client that gives up on a whole (not streamed) answer
    with pytest.raises(openai.APITimeoutError):
        keyed.completions.create(model="tiny", prompt="the king", max_tokens=100, timeout=0.3, **GREEDY)
    time.sleep(0.3)
    stopped = flaky.total
    time.sleep(0.2)
    assert flaky.total == stopped and flaky.steps < 60
    flaky.delay = 0.0
    got = keyed.completions.create(model="tiny", prompt="the king", max_tokens=8, **GREEDY)
    assert got.choices[0].text == expected(setup["ref"], "the king", max_new_tokens=8, temperature=0).text


def test_failure_inside_generation_is_a_500_and_the_server_goes_on(setup, keyed, flaky):
    flaky.fail_at = 1
    with pytest.raises(openai.InternalServerError) as e:
        keyed.completions.create(model="tiny", prompt="the king", max_tokens=8, **GREEDY)
    assert e.value.status_code == 500 and "boom" in e.value.message
    assert_error(e.value.response.json())
    flaky.fail_at = 4  # midway through a stream: an error event
    with pytest.raises(openai.APIError, match="boom"):
        for _ in keyed.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, stream=True, **GREEDY):
            pass
    flaky.fail_at = None
    assert keyed.completions.create(model="tiny", prompt="the king", max_tokens=3, **GREEDY).usage.completion_tokens == 3


def test_api_key(setup, keyed):
    port = setup["keyed_port"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, body = raw(port, "GET", "/v1/models", headers=headers)
        assert status == 401
        assert_error(body, "invalid_api_key")
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="the king", max_tokens=2)
    status, body = raw(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body["data"][0]["id"] == "tiny"
    assert keyed.completions.create(model="tiny", prompt="the king", max_tokens=2, **GREEDY).usage.completion_tokens == 2


SERVE_SCRIPT = """
import time, torch
from lmforge.inference.decoding import StaticGPTDecoder
from lmforge.inference.engine import Engine
from lmforge.inference import server
from lmforge.models.configuration_gpt import LmforgeGPTConfig
from lmforge.models.modeling_gpt import LmforgeGPTForCausalLM
from tests.finetune_fixtures import chat_tokenizer

class Slow(StaticGPTDecoder):
    def step(self, tokens):
        time.sleep(0.05)
        return super().step(tokens)

torch.set_num_threads(1)
tok = chat_tokenizer()
model = LmforgeGPTForCausalLM(LmforgeGPTConfig(
    vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=128))
server.SHUTDOWN_GRACE = 0.5
server.serve(Engine(model, tok, name="tiny", decoder=Slow(model)), port=0, log_level="warning")
print("serve returned", flush=True)
"""


def test_serve_stops_cleanly_on_ctrl_c(tmp_path):
    """``serve`` prints where it listens, answers, and on Ctrl-C ends the running stream (with an
    error event) and returns without a traceback."""
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    stderr = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    try:
        first = ""
        while "lmforge serve:" not in first:  # after any lines imported libraries print
            first = proc.stdout.readline()
            assert first, "serve printed no 'lmforge serve:' line"
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1) ", first)
        assert url, first
        assert "curl " + url.group(1) + "/chat/completions" in proc.stdout.readline()
        client = openai.OpenAI(base_url=url.group(1), api_key="unused", max_retries=0)
        for _ in range(100):  # uvicorn starts right after the line is printed
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = client.completions.create(model="tiny", prompt="the king", max_tokens=100, stream=True)
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in chunks:
                pass
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    stderr.seek(0)
    errors = stderr.read()
    assert proc.returncode == 0 and "serve returned" in out, errors
    assert "Traceback" not in errors and "ERROR" not in errors, errors
