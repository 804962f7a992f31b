"""The HTTP API (FastAPI; OpenAPI at /docs and /openapi.json).

  POST /v1/chat/completions  OpenAI-compatible; the user embedding in ``user_embedding``; ``stream`` for SSE
  POST /v1/generate          user embedding + task (nextitem | favgenre | free) -> text (+ ranked items) + timing
  GET  /v1/models            the served model, as OpenAI lists models
  GET  /v1/model             what is loaded: LLM, integration, encoder hash and shape, device, limits
  GET  /healthz              liveness, no auth
  GET  /metrics              Prometheus text format
Errors: 401 missing/wrong bearer token, 404 unknown model, 409 encoder hash mismatch, 413 body too large, 422
invalid input (shape, dtype, NaN/inf, too many events, token limits, unknown task), 503 queue full, 504 timed
out. Request bodies (embeddings, prompts) are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import asdict
from functools import partial
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from fed_userllm.serving.batching import DynamicBatcher, Overloaded
from fed_userllm.serving.config import ServingConfig
from fed_userllm.serving.metrics import Metrics, RequestMetrics
from fed_userllm.serving.model import Answer, Job, ServedModel
from fed_userllm.serving.schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    GenerateRequest,
    GenerateResponse,
    Item,
    ModelCard,
    ModelList,
    Timing,
    Usage,
)
from fed_userllm.serving.validation import chat_jobs, generate_job, max_events

log = logging.getLogger("fed_userllm.serving")
BEARER = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
INFERENCE_PATHS = ("/v1/generate", "/v1/chat/completions")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
ERRORS = {401: {"description": "missing or wrong bearer token"},
          404: {"description": "unknown model (chat completions)"},
          409: {"description": "embedding from another encoder (encoder_hash mismatch)"},
          413: {"description": "request body too large"},
          422: {"description": "invalid input: shape, dtype, NaN/inf, too many events, limits, task"},
          503: {"description": "request queue full"}, 504: {"description": "timed out"}}


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message(int(declared))}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message(received))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return f"request body is {size} bytes or more: the limit is {self.max_bytes} bytes"


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def create_app(served: ServedModel, config: ServingConfig | None = None, api_key: str | None = None
               ) -> FastAPI:
    """The FastAPI app; ``api_key`` (if set) is required as a bearer token on every endpoint but /healthz."""
    config = config or ServingConfig()
    metrics = Metrics()
    state: dict = {}
    started = int(time.time())

    async def lifespan(app: FastAPI):
        state["batcher"] = DynamicBatcher(served.run, config.max_batch_size, config.max_wait_ms / 1000,
                                          config.max_queue, metrics.batch)
        try:
            yield
        finally:
            await asyncio.to_thread(state.pop("batcher").close)

    app = FastAPI(title="fed-userllm", version="1", lifespan=lifespan,
                  description="Personalized generation from on-device user embeddings (User-LLM).")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, paths=INFERENCE_PATHS)  # outermost: counts 413s too

    def authorize(credentials: Credentials) -> None:
        if api_key is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field, without echoing the (possibly private, possibly huge) input back."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        if request.url.path in OPENAI_PATHS:
            message = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors)
            return _openai_error(422, message, param=".".join(map(str, errors[0]["loc"][1:])))
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """OpenAI's error body on its endpoints (its clients show ``error.message``), FastAPI's elsewhere."""
        if request.url.path in OPENAI_PATHS:
            return _openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
        return await http_exception_handler(request, exc)

    def submit(job: Job) -> Future:
        try:
            return state["batcher"].submit(job, job.key)
        except Overloaded as err:
            raise HTTPException(503, str(err)) from None

    async def answer(future: Future) -> Answer:
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), config.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"no answer within {config.request_timeout_s} s") from None
        except Exception as err:
            log.exception("generation failed for one request")
            raise HTTPException(500, f"generation failed: {type(err).__name__}") from None
        metrics.answered(result.tokens, result.prompt_tokens)
        return result

    auth = [Depends(authorize)]

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, dependencies=auth)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        start = time.perf_counter()
        result = await answer(submit(generate_job(req, served, config)))
        total, compute = time.perf_counter() - start, result.compute_s
        return GenerateResponse(
            text=result.text, items=_items(result), tokens=result.tokens,
            timing=Timing(queue_ms=1000 * max(total - compute, 0.0), compute_ms=1000 * compute,
                          total_ms=1000 * total, batch_size=result.batch_size),
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS, dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        jobs = chat_jobs(req, served, config)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(jobs, completion_id, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(answer(future) for future in [submit(job) for job in jobs]))
        choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                              items=_items(r)) for i, r in enumerate(results)]
        return ChatCompletion(id=completion_id, created=created, model=served.name, choices=choices,
                              usage=_usage(results))

    def _stream(jobs: list[Job], completion_id: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
        """Submits the jobs (so a full queue is still a 503), then yields OpenAI's chunks: the role, the text as
        it is generated, the rest of the final text with the finish reason, [the usage,] [DONE]."""
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(index: int, text: str | None) -> None:  # from the batcher thread; None: the job is done
            loop.call_soon_threadsafe(pieces.put_nowait, (index, text))

        for index, job in enumerate(jobs):
            job.on_text = partial(deliver, index)
        futures = [submit(job) for job in jobs]
        for index, future in enumerate(futures):
            future.add_done_callback(lambda _, i=index: deliver(i, None))

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
            body = ChatCompletionChunk(id=completion_id, created=created, model=served.name, choices=choices,
                                       usage=usage)
            return _sse(body.model_dump_json(exclude_none=True))

        async def events() -> AsyncIterator[bytes]:
            yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))
                         for i in range(len(jobs))])
            sent, results = [""] * len(jobs), {}
            deadline = loop.time() + config.request_timeout_s
            while len(results) < len(jobs):
                try:
                    index, text = await asyncio.wait_for(pieces.get(), deadline - loop.time())
                    if text is None:
                        results[index] = await answer(futures[index])
                except (TimeoutError, HTTPException) as err:  # the status line is sent: report it in the stream
                    status, detail = (err.status_code, err.detail) if isinstance(err, HTTPException) else \
                        (504, f"no answer within {config.request_timeout_s} s")
                    yield _sse(json.dumps(_error_body(status, detail)))
                    return
                if text is not None:
                    sent[index] += text
                    yield chunk([ChunkChoice(index=index, delta=ChunkDelta(content=text))])
                    continue
                result = results[index]
                if result.text[len(sent[index]):]:
                    yield chunk([ChunkChoice(index=index, delta=ChunkDelta(content=result.text[len(sent[index]):]))])
                yield chunk([ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=result.finish_reason,
                                         items=_items(result))])
            if include_usage:
                yield chunk([], _usage([results[i] for i in range(len(jobs))]))
            yield _sse("[DONE]")

        return events()

    @app.get("/v1/models", response_model=ModelList, dependencies=auth)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=served.name, created=started)])

    @app.get("/v1/model", dependencies=auth)
    async def model_info() -> dict:
        return served.info() | {"limits": asdict(config) | {"max_events": max_events(served, config)}}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok" if "batcher" in state else "starting"}

    @app.get("/metrics", dependencies=auth, response_class=Response)
    async def get_metrics() -> Response:
        return Response(metrics.exposition(), media_type=Metrics.content_type)

    return app


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _openai_error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param), status_code=status, headers=headers)


def _items(result: Answer) -> list[Item] | None:
    return None if result.items is None else [Item(id=i, title=t) for i, t in result.items]


def _usage(results: list[Answer]) -> Usage:
    """OpenAI's usage: the prompt counted once, the completion tokens of every choice."""
    completion = sum(r.tokens for r in results)
    return Usage(prompt_tokens=results[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=results[0].prompt_tokens + completion)
