"""The HTTP API (FastAPI): OpenAI-compatible completions, predict, models, health, readiness, metrics.

Handlers never touch JAX: they validate, hand work to the scheduler or predictor thread, and await
its events. Every client mistake is a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`, and the server keeps serving.
"""
import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from errors import UserError
from serving import requests as req
from serving.scheduler import Choice, Job, QueueFull


@dataclass
class Service:
    model_id: str
    task: str
    family: str
    step: int
    metrics: Any
    limits: req.Limits
    max_body: int
    api_key: str | None
    scheduler: Any = None  # language models
    encode: Callable = None  # text -> token ids (UserError on unknown characters)
    predictor: Any = None  # classifiers and regressors
    to_rows: Callable = None  # inputs -> model rows
    ready: bool = False


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


async def read_json(request: Request, limit: int):
    """The body as JSON, at most `limit` bytes: BadRequest (400, or 413 when too large)."""
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise req.BadRequest(f"the body is over {limit:,} bytes", status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise req.BadRequest(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise req.BadRequest("the body's JSON is nested too deeply") from None


async def next_event(queue: asyncio.Queue, request: Request):
    """The scheduler's next event for this request; CancelledError once the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected") from None


class Guard:
    """Size and auth checks before any handler; status and latency counted for every request.

    Plain ASGI: starlette's BaseHTTPMiddleware costs a task group and a stream per request.
    """

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, service = time.perf_counter(), scope["path"], self.service
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0").decode("latin-1")
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if not length.isdigit():
            refusal = error(400, "content-length must be a number of bytes")
        elif int(length) > service.max_body:
            refusal = error(413, f"the body is over {service.max_body:,} bytes")
        elif service.api_key and path.startswith("/v1/") and not hmac.compare_digest(
                headers.get(b"authorization", b""), f"Bearer {service.api_key}".encode()):
            refusal = error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                            kind="authentication_error")
        else:
            refusal = None
        try:
            await (refusal or self.app)(scope, receive, send_status)
        finally:
            route = path if path in KNOWN_ROUTES else "other"
            service.metrics.requests.labels(route, str(status[0])).inc()
            service.metrics.latency.labels(route).observe(time.perf_counter() - start)


def create_app(service: Service) -> FastAPI:
    # no redirect from /v1/completions/ to /v1/completions: a client gets a JSON 404 naming the routes
    app = FastAPI(title="jaxlab", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    m = service.metrics

    app.add_middleware(Guard, service=service)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown routes, wrong methods
        detail = {404: f"no route {request.url.path}; the routes are {', '.join(sorted(KNOWN_ROUTES))}",
                  405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error(e.status_code, detail)

    @app.exception_handler(req.BadRequest)
    async def bad_request(request: Request, e: req.BadRequest):
        return error(e.status, str(e), e.param, e.kind)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return error(429, str(e), kind="rate_limit_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"status": "ready"} if service.ready else error(503, "compiling the model; retry shortly")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "jaxlab", "task": service.task, "family": service.family,
                                            "step": service.step}]}

    def check_model(body) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name is not None and name != service.model_id:
            raise req.BadRequest(f"model {name!r} is not served here; this server serves {service.model_id!r}",
                                 "model", 404)

    @app.post("/v1/completions")
    async def completions(request: Request):
        if service.scheduler is None:
            raise req.BadRequest(f"this server holds a task={service.task} model, which does not generate text; "
                                 f"use POST /v1/predict", status=404)
        body = await read_json(request, service.max_body)
        check_model(body)
        c = req.completion(body, service.limits)
        try:
            prompts = [service.encode(p) for p in c.prompts]
        except UserError as e:
            raise req.BadRequest(str(e), "prompt") from None
        too_long = max(len(p) for p in prompts)
        if too_long > service.limits.max_prompt_tokens:
            raise req.BadRequest(f"the prompt is {too_long} tokens; this server takes at most "
                                 f"{service.limits.max_prompt_tokens}", "prompt")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seed = c.seed if c.seed is not None else int.from_bytes(os.urandom(4), "little") >> 2
        choices = [Choice(i * c.n + j, p, seed + i * c.n + j) for i, p in enumerate(prompts)  # each its own seed
                   for j in range(c.n)]
        job = Job(choices, c.max_tokens, c.temperature, c.top_k, c.top_p, c.stop, c.stream,
                  emit=lambda *event: loop.call_soon_threadsafe(events.put_nowait, event))
        service.scheduler.submit(job)
        m.prompt_tokens.inc(sum(map(len, prompts)))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": service.model_id}
        echo = [c.prompts[ch.index // c.n] if c.echo else "" for ch in choices]
        if c.stream:
            return StreamingResponse(stream(job, events, request, head, echo, c.include_usage, prompts, c.n),
                                     media_type="text/event-stream")
        texts, finish, used = list(echo), [None] * len(choices), 0
        try:
            while None in finish:
                kind, i, payload = await next_event(events, request)
                if kind == "error":
                    return error(500, f"generation failed: {payload}", kind="server_error")
                if kind == "text":
                    texts[i] += payload
                else:
                    finish[i], used = payload[0], used + payload[1]
        finally:
            job.cancelled = None in finish  # a client gone (or a server stopping) frees its slots
        return {**head, "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                                    for i, (t, f) in enumerate(zip(texts, finish))],
                "usage": usage(prompts, c.n, used)}

    async def stream(job, events, request, head, echo, include_usage, prompts, n):
        """Server-sent events: a chunk per decoded piece of text, one per finished choice, then [DONE]."""
        def chunk(i, text, finish):
            return "data: " + json.dumps({**head, "choices": [{"text": text, "index": i, "logprobs": None,
                                                              "finish_reason": finish}]}) + "\n\n"

        done, used = 0, 0
        try:
            for i, text in enumerate(echo):
                if text:
                    yield chunk(i, text, None)
            while done < len(job.choices):
                kind, i, payload = await next_event(events, request)
                if kind == "error":
                    yield "data: " + json.dumps({"error": {"message": f"generation failed: {payload}",
                                                           "type": "server_error"}}) + "\n\n"
                    return
                if kind == "text":
                    yield chunk(i, payload, None)
                else:
                    done, used = done + 1, used + payload[1]
                    yield chunk(i, "", payload[0])
            if include_usage:
                yield "data: " + json.dumps({**head, "choices": [], "usage": usage(prompts, n, used)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = done < len(job.choices)

    @app.post("/v1/predict")
    async def predict(request: Request):
        if service.predictor is None:
            raise req.BadRequest(f"this server holds a task={service.task} model; use POST /v1/completions",
                                 status=404)
        body = await read_json(request, service.max_body)
        check_model(body)
        inputs = req.predict_inputs(body, service.predictor.max_rows)
        try:
            x_N = service.to_rows(inputs)
        except UserError as e:
            raise req.BadRequest(str(e), "inputs") from None
        rows = await asyncio.wrap_future(service.predictor.submit(x_N))
        return {"object": "list", "model": service.model_id, "predictions": rows}

    return app


KNOWN_ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/predict"}


def usage(prompts: list, n: int, completion_tokens: int) -> dict:
    prompt_tokens = sum(map(len, prompts))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
