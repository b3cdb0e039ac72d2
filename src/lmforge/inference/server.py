"""The OpenAI-compatible HTTP server behind ``lmforge serve`` (needs the ``serve`` extra: fastapi
and uvicorn).

Under ``/v1``: ``GET models`` (the one model, named ``engine.name``), ``GET models/{id}``,
``POST completions`` and ``POST chat/completions`` with OpenAI's request fields (``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options``; ``top_k`` and
``repetition_penalty`` as extensions; fields the server has no use for, such as ``user``, are
ignored) and OpenAI's response, stream-chunk and error shapes, so the official clients work.

The engine holds one batch's state and is not thread-safe, so one worker thread owns it and runs
one request at a time from a queue; each request waits on its own asyncio queue for the worker's
output, so the event loop never blocks (other requests are accepted, and wait their turn, while a
generation runs). A request whose client goes away is cancelled between two decoding steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Completion, Delta, Engine, InferenceError
from lmforge.inference.sampling import Sampling

logger = logging.getLogger(__name__)

COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI
CHAT_MAX_TOKENS = 4096  # /v1/chat/completions without max_tokens, for a model with no context limit
SHUTDOWN_GRACE = 5  # seconds running requests may go on after Ctrl-C


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """A request answered with OpenAI's error body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The client disconnected: its generation was stopped (or never started)."""


class ShuttingDown(Exception):
    """The server stopped while the request waited or ran."""


def _api_error(e: BaseException, param: str | None) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InferenceError):
        return APIError(400, str(e), param=param, code="invalid_value")
    if isinstance(e, ClientGone):
        return APIError(400, "the client disconnected", code="client_disconnected")
    if isinstance(e, ShuttingDown):
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    return APIError(500, f"the server failed while generating ({type(e).__name__}: {e}); it is logged "
                    "on the server", type="server_error")


# --------------------------------------------------------------------------- the generation worker

_STARTED, _END = object(), object()  # markers on a job's queue


class _Job:
    """One request's generation on ``engine``: ``prepare`` (run on the worker thread, the only one
    that touches the engine and its tokenizer) gives the prompts' token ids and the stop token ids;
    the worker pushes ``_STARTED`` once they are valid, then each step's deltas, then ``_END`` (or
    an exception) onto ``items``, which the request's coroutine awaits. ``param``: the request
    field an InferenceError is about."""

    def __init__(self, engine: Engine, prepare: Callable[[], tuple[list[list[int]], Sequence[int] | None]],
                 sampling: Sampling, param: str):
        self.engine, self.prepare, self.sampling, self.param = engine, prepare, sampling, param
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item: Any) -> None:
        """Hand an item to the request (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            self.cancelled.set()

    async def started(self) -> None:
        """Wait until the prompts are encoded and generation begins; raise what stopped it."""
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Each step's deltas until the generation ends; raise what stopped it."""
        while (item := await self.items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class _Worker:
    """The thread that owns an engine and runs queued jobs one at a time (started on first use,
    restarted if used after ``stop``: the new thread waits for the old one to end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped: threading.Thread | None = None  # the last thread stopped (may still be ending)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._pending = 0  # jobs submitted and not yet answered

    @property
    def idle(self) -> bool:
        return self._pending == 0

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                previous = self._thread or self._stopped
                self._jobs, self._stopping = queue.Queue(), threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._jobs, self._stopping, previous),
                                                name="lmforge-generate", daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, fail the queued ones and end the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopped = thread or self._stopped
            self._stopping.set()
            self._jobs.put(None)
        if thread is not None:
            thread.join(timeout)

    def _run(self, jobs: queue.Queue[_Job | None], stopping: threading.Event,
             previous: threading.Thread | None) -> None:
        if previous is not None:  # never two threads on one engine
            previous.join()
        while (job := jobs.get()) is not None:
            if stopping.is_set():
                job.put(ShuttingDown())
            elif job.cancelled.is_set():
                job.put(ClientGone())
            else:
                self._generate(job, stopping)
            with self._lock:
                self._pending -= 1

    def _generate(self, job: _Job, stopping: threading.Event) -> None:
        try:
            prompts, stop_ids = job.prepare()
            job.put(_STARTED)
            for deltas in job.engine.stream(prompts, job.sampling, stop_ids=stop_ids):
                if stopping.is_set():
                    raise ShuttingDown()
                if job.cancelled.is_set():
                    logger.info("a client disconnected: its generation was stopped")
                    raise ClientGone()
                job.put(deltas)
            job.put(_END)
        except (InferenceError, ClientGone, ShuttingDown) as e:
            job.put(e)
        except Exception as e:
            logger.exception("generation failed")
            job.put(e)


_WORKERS: weakref.WeakKeyDictionary[Engine, _Worker] = weakref.WeakKeyDictionary()


def _worker(engine: Engine) -> _Worker:
    """The engine's one worker: apps over one engine share it, so they never run two batches."""
    if engine not in _WORKERS:
        _WORKERS[engine] = _Worker()
    return _WORKERS[engine]


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Common(BaseModel):
    """Fields shared by both endpoints (None: the default; unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``: a prompt, a batch of prompts, or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


def _sampling(body: _Common, max_tokens: int | None, param: str, default: int) -> Sampling:
    """The request's sampling settings; 400 for values out of range."""
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{param}={max_tokens}: must be at least 1", param=param, code="invalid_value")
    if body.n not in (None, 1):
        raise APIError(400, f"n={body.n}: this server gives one choice per prompt (n=1)", param="n",
                       code="invalid_value")
    if body.seed is not None and not -(2**63) <= body.seed < 2**64:
        raise APIError(400, f"seed={body.seed}: must fit in 64 bits", param="seed", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return Sampling(
            max_new_tokens=default if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # 0: greedy
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=body.seed,
            stop=tuple(stop),
        )
    except ValueError as e:
        name = str(e).partition("=")[0]
        raise APIError(400, str(e), param=param if name == "max_new_tokens" else name,
                       code="invalid_value") from None


def _chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template takes them: text content parts joined, the
    ``developer`` role as ``system``."""
    out = []
    for k, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"messages[{k}]: only text content parts are supported, got {part!r:.80}",
                                   param=f"messages.{k}.content", code="invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        role = "system" if message.get("role") == "developer" else message.get("role")
        out.append({**message, "role": role, "content": content})
    return out


# --------------------------------------------------------------------------- responses


class _Shape:
    """OpenAI's bodies for one request: the whole response, stream chunks, the usage chunk."""

    def __init__(self, chat: bool, model: str, n: int):
        self.chat, self.model, self.n = chat, model, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tokens = [0, 0]  # prompt and completion tokens of the choices finished so far

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _usage(self) -> dict[str, int]:
        prompt, completion = self.tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, results: list[Completion]) -> dict[str, Any]:
        self.tokens = [sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)]
        if self.chat:
            choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text, "refusal": None},
                        "logprobs": None, "finish_reason": r.finish_reason} for r in results]
        else:
            choices = [{"text": r.text, "index": r.index, "logprobs": None, "finish_reason": r.finish_reason}
                       for r in results]
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self._usage()}

    def _chunk(self, choice: dict[str, Any], usage: bool) -> dict[str, Any]:
        chunk = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        return {**chunk, "usage": None} if usage else chunk

    def opening(self, usage: bool) -> list[dict[str, Any]]:
        """Chat's first chunks: the assistant role."""
        if not self.chat:
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}, usage) for i in range(self.n)]

    def chunks(self, d: Delta, usage: bool) -> list[dict[str, Any]]:
        """A delta as chunks (chat: the text, then the finish reason with an empty delta)."""
        if d.finish_reason is not None:
            self.tokens[0] += d.prompt_tokens
            self.tokens[1] += d.completion_tokens
        if not self.chat:
            return [self._chunk({"text": d.text, "index": d.index, "logprobs": None,
                                 "finish_reason": d.finish_reason}, usage)]
        out = []
        if d.text:
            out.append(self._chunk({"index": d.index, "delta": {"content": d.text}, "logprobs": None,
                                    "finish_reason": None}, usage))
        if d.finish_reason is not None:
            out.append(self._chunk({"index": d.index, "delta": {}, "logprobs": None,
                                    "finish_reason": d.finish_reason}, usage))
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self._usage()}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, job: _Job) -> AsyncIterator[None]:
    """Cancel ``job`` if the client disconnects before the response starts."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancelled.set()

    task = asyncio.create_task(wait())
    try:
        yield
    finally:
        task.cancel()


async def _run(worker: _Worker, job: _Job, request: Request, body: _Common, shape: _Shape) -> Response:
    """Queue the job; answer with the whole response, or once it has started, with the stream."""
    worker.submit(job)
    try:
        async with _watch_disconnect(request, job):
            await job.started()
            if not body.stream:
                results = [Completion(i) for i in range(shape.n)]
                async for deltas in job.deltas():
                    for d in deltas:
                        results[d.index].text += d.text
                        if d.finish_reason is not None:
                            results[d.index].finish_reason = d.finish_reason
                            results[d.index].prompt_tokens = d.prompt_tokens
                            results[d.index].completion_tokens = d.completion_tokens
                return JSONResponse(shape.response(results))
    except Exception as e:
        job.cancelled.set()
        return _api_error(e, job.param).response()
    except BaseException:  # cancelled
        job.cancelled.set()
        raise
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(job, shape, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(job: _Job, shape: _Shape, usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the chunks, the usage chunk if asked for, ``[DONE]``; an error midway
    is sent as an ``{"error": ...}`` event, as OpenAI does. Ending early cancels the job."""
    try:
        for chunk in shape.opening(usage):
            yield _event(chunk)
        async for deltas in job.deltas():
            for d in deltas:
                for chunk in shape.chunks(d, usage):
                    yield _event(chunk)
        if usage:
            yield _event(shape.usage_chunk())
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _event(_api_error(e, job.param).body)
    finally:
        job.cancelled.set()


# --------------------------------------------------------------------------- the app


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible API over ``engine`` (see the module docstring). With ``api_key``,
    every ``/v1`` endpoint needs ``Authorization: Bearer <api_key>``."""
    worker = _worker(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="lmforge", summary=f"OpenAI-compatible API serving {engine.name}", lifespan=lifespan)
    app.state.engine, app.state.worker = engine, worker

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization")
        if not given:
            raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(model: str) -> None:
        if model != engine.name and model.rstrip("/").rsplit("/", 1)[-1] != engine.name:
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{engine.name}`.",
                           param="model", code="model_not_found")

    card = {"id": engine.name, "object": "model", "created": int(time.time()), "owned_by": "lmforge"}
    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @router.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return card

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if isinstance(body.prompt, str):
            prompts: list[str | list[int]] = [body.prompt]
        elif body.prompt and all(isinstance(p, int) for p in body.prompt):
            prompts = [list(body.prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list: give a string, a list of strings or token ids",
                           param="prompt", code="invalid_value")
        sampling = _sampling(body, body.max_tokens, "max_tokens", COMPLETION_MAX_TOKENS)
        vocab = getattr(getattr(engine.model, "config", None), "vocab_size", None)

        def prepare() -> tuple[list[list[int]], None]:
            for p in prompts:
                if not isinstance(p, str) and vocab and any(not 0 <= t < vocab for t in p):
                    raise InferenceError(f"prompt: token ids must be in [0, {vocab})")
            return [engine.encode(p) for p in prompts], None

        job = _Job(engine, prepare, sampling, "prompt")
        return await _run(worker, job, request, body, _Shape(False, engine.name, len(prompts)))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        limit, param = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            limit, param = body.max_completion_tokens, "max_completion_tokens"
        sampling = _sampling(body, limit, param, engine.context or CHAT_MAX_TOKENS)
        messages = _chat_messages(body.messages)

        def prepare() -> tuple[list[list[int]], list[int]]:
            return [engine.chat_prompt(messages)], engine.chat_stop_ids

        job = _Job(engine, prepare, sampling, "messages")
        return await _run(worker, job, request, body, _Shape(True, engine.name, 1))

    app.include_router(router)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _invalid_request(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {404: f"Invalid URL ({where})",
                   405: f"Method not allowed ({where})"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message).response(headers=e.headers)

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return _api_error(e, None).response()

    return app


def _invalid_request(e: RequestValidationError) -> APIError:
    """FastAPI's validation error (422) as OpenAI's 400."""
    errors = e.errors()
    first = errors[0] if errors else {}
    kind = first.get("type")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if kind == "json_invalid":
        error = first.get("ctx", {}).get("error", "")
        return APIError(400, f"We could not parse the JSON body of your request ({error}): send valid JSON "
                        "with 'Content-Type: application/json'.", code="invalid_json")
    if param is None:
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    given = repr(first.get("input"))
    given = given if len(given) <= 80 else given[:80] + "..."
    return APIError(400, f"Invalid value for '{param}' ({'.'.join(loc)}): {first.get('msg')}; got {given}.",
                    param=param, code="invalid_type")


# --------------------------------------------------------------------------- serve


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port); LmforgeError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LmforgeError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server using "
                           "the port? pick another with --port)") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server that, on Ctrl-C, stops listening, lets the running and queued requests
    finish for up to ``SHUTDOWN_GRACE`` seconds (a second Ctrl-C: not at all), then stops the
    generation worker, so the rest end at once (streams with an error event, others with a 503)
    instead of uvicorn cancelling them with a traceback."""

    def __init__(self, config: uvicorn.Config, worker: _Worker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in getattr(self, "servers", []):
            listener.close()
        if not self.worker.idle:
            logger.warning("lmforge serve: letting running requests finish (at most %s s; Ctrl-C again to "
                           "stop them now)", SHUTDOWN_GRACE)
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while not (self.worker.idle or self.force_exit) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(self.worker.stop)
        await super().shutdown(sockets)
        if self.force_exit:  # uvicorn skips the app's shutdown then, and its task dies with a traceback
            await self.lifespan.shutdown()


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve ``engine`` on host:port until Ctrl-C (then return without a traceback)."""
    app = create_app(engine, api_key=api_key)
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE)
    server = _Server(config, _worker(engine))
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else (
        f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{port}/v1"
    if getattr(engine.tokenizer, "chat_template", None):
        path, request = "chat/completions", {"model": engine.name, "messages": [{"role": "user", "content": "Hello"}]}
    else:
        path, request = "completions", {"model": engine.name, "prompt": "Once upon a time", "max_tokens": 32}
    auth = " -H 'Authorization: Bearer KEY'" if api_key else ""
    print(f"lmforge serve: {engine.name} at {url} (OpenAI-compatible; Ctrl-C to stop)\n"
          f"  curl {url}/{path} -H 'Content-Type: application/json'{auth} -d '{json.dumps(request)}'",
          flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the signal
        pass
    finally:
        sock.close()
        _worker(engine).stop()
