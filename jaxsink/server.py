"""`jaxsink serve`: an OpenAI-compatible HTTP server over the batch engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (each with `stream: true` as
server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /v1/sessions/{name}`,
`GET /health`, `GET /metrics` (Prometheus text, `jaxsink.metrics`), and a chat page at `GET /`
(static files from `jaxsink/web/`). Requests run on
`jaxsink.scheduler.Scheduler`: continuous batching over `--max-batch` rows, chunked prefill
between decode blocks, sessions whose stream never resets.

Why Starlette on uvicorn: the server needs routing, request bodies read with a size cap,
streamed responses with disconnect detection, and an ASGI server with a connection limit
(uvicorn's `limit_concurrency` answers 503 beyond it). Starlette gives exactly those and is
FastAPI's own core; FastAPI's extra layer (pydantic models, its 422 validation format) would
have to be overridden to answer in OpenAI's error format, so it is not used.

With an API key, every `/v1/...` endpoint and `/metrics` need `Authorization: Bearer KEY`;
`/health` and the page stay open. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from pathlib import Path

from jaxsink import settings
from jaxsink.engine import RowSampling
from jaxsink.metrics import CountRequests, RequestTimer, ServerMetrics
from jaxsink.scheduler import Event, Job, RequestError, Scheduler, check_session_name
from jaxsink.stream_state import StreamFileError
from jaxsink.traced.rows import TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask: body bytes, new tokens per request (prompt tokens are the
    scheduler's `max_prompt_tokens`), stop strings."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_stop: int = 4


# --- request fields -------------------------------------------------------------------------

# OpenAI request fields (chat and completions) that would change what a reply means and that
# jaxsink does not implement: a request giving one with other than its neutral value gets 400
# naming it, never a reply that ignored it. Value: (is it neutral, what is not supported).
REFUSED_FIELDS = {
    "response_format": (lambda v: v == {"type": "text"}, "JSON mode and structured outputs"),
    "tools": (lambda v: v == [], "tool calls"),
    "tool_choice": (lambda v: v == "none", "tool calls"),
    "functions": (lambda v: v == [], "function calls"),
    "function_call": (lambda v: v == "none", "function calls"),
    "logit_bias": (lambda v: v == {}, "logit biases"),
    "frequency_penalty": (lambda v: v == 0, "frequency penalties"),
    "presence_penalty": (lambda v: v == 0, "presence penalties"),
    "modalities": (lambda v: v == ["text"], "output modalities other than text"),
    "audio": (lambda v: False, "audio output"),
    "reasoning_effort": (lambda v: False, "reasoning effort"),
    "verbosity": (lambda v: False, "verbosity"),
    "web_search_options": (lambda v: False, "web search"),
    "best_of": (lambda v: v == 1, "best_of other than 1"),
    "echo": (lambda v: v is False, "echoing the prompt"),
    "suffix": (lambda v: v == "", "a suffix (insertion)"),
}
# Fields that change nothing a reply says, accepted and ignored (the README lists both):
# model (one model per server), user, metadata, store, service_tier, safety_identifier,
# prompt_cache_key, prompt_cache_retention, parallel_tool_calls, prediction.


def refuse_unsupported(body: dict) -> None:
    """RequestError naming the first field of REFUSED_FIELDS the body gives a value to."""
    for name, (neutral, what) in REFUSED_FIELDS.items():
        value = body.get(name)
        if value is not None and not neutral(value):
            raise RequestError(f"{name}: jaxsink does not support {what}", param=name)


def _field(body: dict, name: str, kind, default, check=None, why: str = ""):
    value = body.get(name, default)
    if value is None:
        value = default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok or (check is not None and not check(value)):
        raise RequestError(f"{name} {why or 'is not valid'}, got {value!r}", param=name)
    return value


def sampling_of(body: dict, limits: Limits, default_max_tokens: int) -> RowSampling:
    """The request's sampling settings, each checked (RequestError naming the field)."""
    max_tokens = default_max_tokens
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when given
        max_tokens = _field(
            body,
            name,
            int,
            max_tokens,
            lambda v: 1 <= v <= limits.max_tokens,
            f"must be an integer in [1, {limits.max_tokens}]",
        )
    temperature = _field(
        body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"
    )
    nucleus = settings.SETTINGS["top_p"]
    top_p = _field(body, "top_p", (int, float), 1.0, nucleus.valid, nucleus.rule)
    seed = _field(body, "seed", int, 0, lambda v: -(2**63) <= v < 2**64, "must be a 64-bit integer")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > limits.max_stop
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(
            f"stop must be a string or a list of at most {limits.max_stop} non-empty strings",
            param="stop",
        )
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("n must be 1: each request gives one choice", param="n")
    return RowSampling(
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed % 2**32,
        max_tokens=max_tokens,
        stop=tuple(stop),
    )


def _prompt_of(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise RequestError(
        "prompt must be a non-empty string or a list of token ids (one prompt per request)",
        param="prompt",
    )


def _messages_of(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(
                "each message needs a role: system, user or assistant", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or not parts:
                raise RequestError("only text content parts are supported", param="messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError("each message's content must be text", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


# --- responses ------------------------------------------------------------------------------


def error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {
        "error": {"message": str(error), "type": kind, "param": error.param, "code": error.code}
    }


class Reply:
    """The pieces of one completion, in OpenAI's shapes for completions or chat."""

    def __init__(self, chat: bool, model_id: str, tokenizer, logprobs: int, want_logprobs: bool):
        self.chat, self.model_id, self.tok = chat, model_id, tokenizer
        self.top, self.want_logprobs = logprobs, want_logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_lists: list[list[tuple[int, float]]] = []

    def add(self, event: Event) -> None:
        self.text += event.text
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        self.top_lists += event.top

    def _token(self, t: int) -> str:
        return self.tok.decode([t])

    def logprobs_of(self, tokens, logprobs, tops, offset: int = 0):
        if not self.want_logprobs:
            return None
        tops = tops or [[] for _ in tokens]
        if self.chat:
            return {
                "content": [
                    {
                        "token": self._token(t),
                        "logprob": lp,
                        "bytes": list(self._token(t).encode()),
                        "top_logprobs": [
                            {
                                "token": self._token(i),
                                "logprob": v,
                                "bytes": list(self._token(i).encode()),
                            }
                            for i, v in top[: self.top]
                        ],
                    }
                    for t, lp, top in zip(tokens, logprobs, tops, strict=False)
                ]
            }
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(self._token(t))
        return {
            "tokens": [self._token(t) for t in tokens],
            "token_logprobs": logprobs,
            "top_logprobs": [{self._token(i): v for i, v in top[: self.top]} for top in tops],
            "text_offset": offsets,
        }

    def _envelope(self, choices, chunk: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }

    def chunk(self, event: Event | None, finish: str | None = None, first=False) -> dict:
        """One server-sent event's object: a text piece, or the last one with `finish`."""
        text = event.text if event else ""
        lp = self.logprobs_of(event.tokens, event.logprobs, event.top) if event else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, usage: dict) -> dict:
        """The last server-sent event of a stream that asked for usage (`stream_options`:
        `include_usage`): no choices, the request's usage."""
        return {**self._envelope([], chunk=True), "usage": usage}

    def whole(self, finish: str, usage: dict) -> dict:
        lp = self.logprobs_of(self.tokens, self.logprobs, self.top_lists)
        if self.chat:
            message = {"role": "assistant", "content": self.text}
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": lp, "finish_reason": finish}
        return {**self._envelope([choice], chunk=False), "usage": usage}


def usage_of(prompt_tokens: int, done: Event) -> dict:
    """OpenAI's `usage` of a finished request: its prompt tokens (and how many of them a cached
    stream state spared), completion and total tokens."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


# --- the API key ----------------------------------------------------------------------------


def needs_key(path: str) -> bool:
    """Whether a request to `path` needs the API key (when the server has one): the API and the
    metrics; the chat page and /health stay open."""
    return path.startswith("/v1/") or path == "/metrics"


def bearer_matches(authorization: bytes | None, key: str) -> bool:
    """Whether an Authorization header's value is `Bearer KEY`, compared in constant time."""
    scheme, _, given = (authorization or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode())


class RequireKey:
    """ASGI middleware: a request that `needs_key` without `Authorization: Bearer KEY` gets 401
    with an OpenAI-style error (which never repeats what it was sent)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if bearer_matches(given, self.key):
            await self.app(scope, receive, send)
            return
        why = "no API key: send Authorization: Bearer KEY" if given is None else "wrong API key"
        body = json.dumps(error_body(RequestError(why, 401, code="invalid_api_key"))).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# --- the chat page --------------------------------------------------------------------------

WEB = Path(__file__).parent / "web"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page runs only its own script and talks only to this server: a reply that slipped into
# the page as HTML could still run nothing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def web_files() -> dict[str, tuple[bytes, str]]:
    """The chat page's files (`jaxsink/web/`) by name, with their media types."""
    return {
        p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix])
        for p in sorted(WEB.iterdir())
        if p.suffix in MEDIA_TYPES
    }


# --- the application ------------------------------------------------------------------------


def make_app(
    scheduler: Scheduler,
    model_id: str,
    limits: Limits = Limits(),
    on_ready=None,
    api_key: str | None = None,
):
    """The Starlette application serving `scheduler`'s model as `model_id` (`on_ready()` is
    called once it accepts requests); with `api_key`, the API and metrics need it."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Match, Route

    tokenizer = scheduler.tokenizer
    metrics = ServerMetrics(scheduler.stats)
    files = web_files()

    def error_response(error: RequestError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(
                f"the request body has {declared} bytes, more than {limits.max_body_bytes}", 413
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise RequestError(f"the request body exceeds {limits.max_body_bytes} bytes", 413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        return data

    async def run(request: Request, chat: bool):
        if scheduler.failure is not None:
            return error_response(RequestError("the server has failed: restart it", 503))
        timer = RequestTimer(metrics, time.monotonic())
        try:
            body = await read_json(request)
            refuse_unsupported(body)
            default_max_tokens = min(512 if chat else 16, limits.max_tokens)
            sampling = sampling_of(body, limits, default_max_tokens)
            stream = _field(body, "stream", bool, False, why="must be true or false")
            options = _field(body, "stream_options", dict, {}, why="must be an object")
            if options and not stream:
                raise RequestError("stream_options needs stream: true", param="stream_options")
            include_usage = _field(
                options, "include_usage", bool, False, why="must be true or false"
            )
            if chat:
                want = _field(body, "logprobs", bool, False, why="must be true or false")
                top = _field(
                    body,
                    "top_logprobs",
                    int,
                    0,
                    lambda v: 0 <= v <= TOP_LOGPROBS,
                    f"must be in [0, {TOP_LOGPROBS}]",
                )
            else:
                top = _field(
                    body,
                    "logprobs",
                    int,
                    -1,
                    lambda v: -1 <= v <= TOP_LOGPROBS,
                    f"must be an integer in [0, {TOP_LOGPROBS}]",
                )
                want, top = top >= 0, max(top, 0)
            session = body.get("session")
            if session is not None:
                check_session_name(session)
            job_args = {"messages": _messages_of(body)} if chat else {"prompt": _prompt_of(body)}
        except RequestError as e:
            return error_response(e)
        except ClientDisconnect:
            return None

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(sampling=sampling, emit=emit, session=session, logprobs=top, **job_args)
        scheduler.submit(job)
        first = await events.get()
        if first.kind == "error":
            return error_response(first.error)
        reply = Reply(chat, model_id, tokenizer, top, want)
        prompt_tokens = first.prompt_tokens
        timer.accepted(prompt_tokens)

        if stream:

            async def sse():
                try:
                    if chat:
                        yield _sse(reply.chunk(None, first=True))
                    while True:
                        event = await events.get()
                        if event.kind == "text":
                            timer.generated(len(event.tokens), time.monotonic())
                            if event.text or (event.tokens and want):
                                yield _sse(reply.chunk(event))
                        elif event.kind == "done":
                            timer.done(event.cached_tokens, time.monotonic())
                            yield _sse(reply.chunk(None, finish=event.finish_reason))
                            if include_usage:
                                yield _sse(reply.usage_chunk(usage_of(prompt_tokens, event)))
                            yield "data: [DONE]\n\n"
                            return
                        else:
                            yield _sse(error_body(event.error))
                            return
                finally:
                    job.cancelled.set()  # a no-op once done; frees the row if the client left

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        async def watch_disconnect():
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            job.cancelled.set()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            while True:
                event = await events.get()
                if event.kind == "text":
                    timer.generated(len(event.tokens), time.monotonic())
                    reply.add(event)
                elif event.kind == "done":
                    timer.done(event.cached_tokens, time.monotonic())
                    usage = usage_of(prompt_tokens, event)
                    return JSONResponse(reply.whole(event.finish_reason, usage))
                else:
                    return error_response(event.error)
        finally:
            watcher.cancel()
            job.cancelled.set()

    async def completions(request: Request):
        return await run(request, chat=False)

    async def chat_completions(request: Request):
        return await run(request, chat=True)

    async def models(request: Request):
        entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "jaxsink"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request):
        ok = scheduler.failure is None
        body = {"status": "ok" if ok else "failed", "model": model_id, **scheduler.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def session_info(request: Request):
        name = request.path_params["name"]
        try:
            info = scheduler.session_info(name)
        except RequestError as e:
            return error_response(e)
        except StreamFileError as e:
            return error_response(RequestError(str(e), 409, "session"))
        if info is None:
            return error_response(RequestError(f"no session {name!r}", 404, "session"))
        return JSONResponse({"id": name, "object": "session", **info})

    async def metrics_text(request: Request):
        body, media_type = metrics.exposition()
        return Response(body, media_type=media_type)

    async def page(request: Request):
        return web_file("index.html")

    async def asset(request: Request):
        name = request.path_params["name"]
        if name not in files:
            return error_response(RequestError(f"GET {request.url.path}: no such file", 404))
        return web_file(name)

    def web_file(name: str) -> Response:
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        message = f"{request.method} {request.url.path}: " + (
            "no such endpoint" if status == 404 else "method not allowed"
        )
        return error_response(RequestError(message, status))

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/sessions/{name}", session_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/web/{name}", asset, methods=["GET"]),
    ]

    def endpoint_of(scope: dict) -> str:
        """The route a request matched, as its path template (a bounded label)."""
        return next((r.path for r in routes if r.matches(scope)[0] != Match.NONE), "other")

    middleware = [Middleware(CountRequests, metrics=metrics, endpoint=endpoint_of)]
    if api_key is not None:
        middleware.append(Middleware(RequireKey, key=api_key))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_ready is not None:
            on_ready()
        yield

    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def check_port_free(host: str, port: int) -> None:
    """Fail before loading anything when `host:port` cannot be listened on."""
    import socket

    from jaxsink.config import JaxsinkError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise JaxsinkError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise JaxsinkError(
                f"cannot listen on {host}:{port} ({e.strerror}): choose another --port"
            ) from None


def serve(
    scheduler: Scheduler,
    model_id: str,
    host: str,
    port: int,
    limits: Limits,
    max_connections: int,
    on_ready=None,
    api_key: str | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM; the scheduler is stopped (parked sessions saved)
    on the way out. Beyond `max_connections` open connections uvicorn answers 503. With
    `api_key`, the API and metrics need it (`RequireKey`)."""
    import uvicorn

    app = make_app(scheduler, model_id, limits, on_ready, api_key)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.stop()
