"""The FastAPI application over one AsyncLLM: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus
/health and /metrics.

A request is checked in full (key, size, JSON, fields, model, media, prompt) before it reaches the engine; then
the handler waits for the engine's first output, so a video that cannot be decoded (or a prompt over the context)
is still a 400 even for a stream. A client that goes away (mid-stream or while waiting) aborts its request, which
frees its KV capacity at the engine's next step. Every error is OpenAI-shaped JSON.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import conversation_request
from ..errors import RequestError
from .api_errors import APIError, bad_request
from .media import MediaStore
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, validation_message
from .responses import ResponseBuilder
from .settings import ServerSettings

log = logging.getLogger("dynfocus_infer.server")


def _engine_gauges(engine) -> dict:
    stats = engine.stats()
    return {"requests_in_flight": (engine.num_unfinished_requests, "Requests accepted and not yet finished."),
            "requests_waiting": (stats["waiting"], "Requests queued for admission (queue depth)."),
            "requests_encoding": (stats["encoding"], "Requests whose visual tokens are not ready yet (queued, decoding or encoding)."),
            "requests_running": (stats["running"], "Requests holding KV cache."),
            "kv_cache_usage_ratio": (stats["kv_usage"], "Fraction of KV-cache blocks in use."),
            "preemptions": (stats["preemptions"], "Requests preempted (recomputed) since start."),
            "prefix_cache_queries_tokens": (stats["prefix_cache_queries"],
                                            "Prompt tokens looked up in the prefix cache since start."),
            "prefix_cache_hits_tokens": (stats["prefix_cache_hits"],
                                         "Of those, tokens whose K/V came from the cache (not computed).")}


class Server:
    """Routes' shared state: the engine, settings, media store and metrics."""

    def __init__(self, engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.media = MediaStore(settings)
        self.metrics = Metrics(lambda: _engine_gauges(engine))
        self.tokenizer = engine.llm.loaded.tokenizer
        self.template = engine.llm.loaded.template

    # -- checks ----------------------------------------------------------------------------------------------------

    def authorise(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    async def body(self, request: Request, model_type):
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {int(declared):,} bytes is over this server's limit of {limit:,} "
                                f"(--max-request-bytes)", "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over this server's limit of {limit:,} bytes "
                                    f"(--max-request-bytes)", "request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise bad_request(f"malformed JSON body: {error}", code="invalid_json") from error
        if not isinstance(data, dict):
            raise bad_request(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        try:
            parsed = model_type.model_validate(data)
        except ValidationError as error:
            raise bad_request(validation_message(error.errors()), code="invalid_request") from error
        if parsed.model != self.settings.served_model_name:
            raise APIError(404, f"model {parsed.model!r} does not exist: this server serves "
                                f"{self.settings.served_model_name!r} (GET /v1/models)", "model_not_found",
                           param="model")
        return parsed

    def admit(self) -> None:
        if self.engine.dead_error is not None:
            raise APIError(503, f"the engine has stopped: {self.engine.dead_error!r}", "engine_dead")
        if self.engine.num_unfinished_requests >= self.settings.max_queued_requests:
            raise APIError(503, f"the server is at its limit of {self.settings.max_queued_requests} requests in "
                                f"flight: retry later", "queue_full")

    def check_prompt_size(self, text: str) -> None:
        if len(text) > self.settings.max_prompt_chars:
            raise bad_request(f"prompt of {len(text):,} characters is over this server's limit of "
                              f"{self.settings.max_prompt_chars:,}", code="prompt_too_long")

    # -- building engine requests -----------------------------------------------------------------------------------

    async def chat_request(self, body: ChatCompletionRequest, opened: list):
        messages = []
        for message in body.messages:
            content = message.content
            if isinstance(content, str):
                self.check_prompt_size(content)
            else:
                parts = []
                for part in content:
                    if part.type == "text":
                        self.check_prompt_size(part.text)
                        parts.append({"type": "text", "text": part.text})
                    else:
                        video = await run_in_threadpool(self.media.open, part.video_url.url)
                        opened.append(video)
                        parts.append({"type": "video", "video": video.path})
                content = parts
            messages.append({"role": message.role, "content": content})
        try:
            request = self.frame_sampling(conversation_request(messages, self.template, self.tokenizer), body)
        except RequestError as error:
            raise bad_request(str(error)) from error
        if body.focus is None:
            return request
        try:
            return dataclasses.replace(request, focus=body.focus)
        except RequestError as error:
            raise bad_request(f"focus: {error}", param="focus") from error

    def completion_request(self, body: CompletionRequest):
        from ..outputs import Request as EngineRequest
        text = body.prompt_text()
        self.check_prompt_size(text)
        try:
            return self.frame_sampling(EngineRequest(prompt=text), body)
        except RequestError as error:
            raise bad_request(str(error), param="prompt") from error

    @staticmethod
    def frame_sampling(request, body):
        if body.num_frames is None and body.fps is None:
            return request
        return dataclasses.replace(request, num_frames=body.num_frames, fps=body.fps)

    # -- answering ---------------------------------------------------------------------------------------------------

    async def answer(self, request: Request, kind: str) -> Response:
        started = time.perf_counter()
        self.authorise(request)
        body = await self.body(request, ChatCompletionRequest if kind == "chat" else CompletionRequest)
        params = body.sampling_params()
        self.admit()
        opened: list = []
        try:
            engine_request = (await self.chat_request(body, opened) if kind == "chat"
                              else self.completion_request(body))
            response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            top = (body.top_logprobs or 0) if kind == "chat" else (body.logprobs or 0)
            builder = ResponseBuilder(kind, response_id, self.settings.served_model_name, self._decode, top)
            outputs = self.engine.generate(engine_request, params, response_id)
            first = await _first_or_disconnect(request, outputs)
            if first.finished and first.error is not None:
                await outputs.aclose()
                raise _engine_error(first, opened)
        except BaseException:
            for video in opened:
                video.release()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(builder, first, outputs, params.n, include_usage, opened, started)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            last = first
            last_token_at = first_token_at = time.perf_counter()
            if not first.finished:
                last = await _drain_or_disconnect(request, outputs)
                last_token_at = time.perf_counter()
        finally:
            for video in opened:
                video.release()
        if last.error is not None:
            raise _engine_error(last, opened)
        self._observe(last, started, first_token_at, last_token_at)
        return JSONResponse(builder.final(last))

    async def _events(self, builder: ResponseBuilder, first, outputs, n: int, include_usage: bool, opened: list,
                      started: float) -> AsyncIterator[str]:
        sent: dict = {}
        first_token_at = last_token_at = time.perf_counter()
        output = first
        try:
            for chunk in builder.first_chunks(n):
                yield _sse(chunk)
            while True:
                if output.error is not None:
                    error = _engine_error(output, opened)
                    yield _sse(error.body())
                    break
                for chunk in builder.delta_chunks(output, sent, with_focus=output.finished and not include_usage):
                    yield _sse(chunk)
                last_token_at = time.perf_counter()
                if output.finished:
                    if include_usage:
                        yield _sse(builder.chunk([], usage_of=output))
                    self._observe(output, started, first_token_at, last_token_at)
                    break
                output = await outputs.__anext__()
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()  # a client gone mid-stream lands here (cancelled): the request is aborted
            for video in opened:
                video.release()

    def _observe(self, output, started: float, first_token_at: float, last_token_at: float) -> None:
        generated = sum(len(c.token_ids) for c in output.outputs) if output.outputs else len(output.token_ids)
        self.metrics.tokens(output.tokens.prompt_tokens, generated)
        per_token = (last_token_at - first_token_at) / (generated - 1) if generated > 1 else None
        self.metrics.latency(first_token_at - started, per_token)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _engine_error(output, opened: list) -> APIError:
    message = output.error or "unknown engine error"
    for video in opened:
        message = message.replace(video.path, video.label)
    if message.startswith("internal error"):
        return APIError(500, message, "internal_error")
    return bad_request(message, code="invalid_request")


async def _watch_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.1)


async def _until_disconnected(request: Request, coroutine):
    """Run `coroutine`; cancel it (aborting its engine request) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(coroutine)
    watcher = asyncio.ensure_future(_watch_disconnect(request, task))
    try:
        return await task
    finally:
        watcher.cancel()


async def _first_or_disconnect(request: Request, outputs):
    return await _until_disconnected(request, outputs.__anext__())


async def _drain_or_disconnect(request: Request, outputs):
    async def drain():
        last = None
        async for output in outputs:
            last = output
        return last

    try:
        return await _until_disconnected(request, drain())
    except asyncio.CancelledError:
        await outputs.aclose()
        raise


def build_app(engine, settings: ServerSettings) -> FastAPI:
    server = Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.media.close()

    app = FastAPI(title="dynfocus-infer", version=_version(), docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        server.metrics.request_done(request.url.path, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        body = APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        server.metrics.request_done(request.url.path, 500)
        body = APIError(500, f"internal error ({type(error).__name__}): {error}", "internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        response = await server.answer(request, "chat")
        server.metrics.request_done(request.url.path, response.status_code)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        response = await server.answer(request, "completion")
        server.metrics.request_done(request.url.path, response.status_code)
        return response

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorise(request)
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "dynfocus-infer"}]}

    @app.get("/health")
    async def health():
        if engine.dead_error is not None:
            return JSONResponse({"status": "dead", "error": repr(engine.dead_error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _version() -> str:
    from .. import __version__
    return __version__


def run(engine, settings: ServerSettings, *, log_level: str = "info") -> None:
    """Serve until interrupted (SIGINT/SIGTERM), then stop the engine."""
    import uvicorn

    app = build_app(engine, settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_keep_alive=30)
    finally:
        engine.shutdown()
