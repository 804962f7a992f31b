"""Server-side contextualization: a frozen LLM answers personalized requests over HTTP (PAPER.md §6).

A phone runs the exported user encoder and sends only its per-event outputs ``[T, d_model]`` (float32, taken
before the projection) with the sha256 of the encoder weights that produced them. The server applies the
trained projection and cross-attention / soft prompt of a UserLLM run to those states and generates.

Endpoints (OpenAPI at /docs and /openapi.json):
  POST /v1/generate   user embedding + task (nextitem | favgenre | free) -> text (+ ranked items) + timing
  GET  /v1/model      what is loaded: LLM, integration, encoder hash and shape, device, limits
  GET  /healthz       liveness, no auth
  GET  /metrics       requests, errors, batches, mean batch size, latency percentiles
Errors: 401 missing/wrong bearer token, 409 encoder hash mismatch, 413 body too large, 422 invalid input
(shape, dtype, NaN/inf, too many events, max_new_tokens over the limit, unknown task), 503 queue full,
504 timed out. Request bodies (embeddings, prompts) are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

import numpy as np
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from fed_userllm.data.sequences import UserSequences
from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.models import load_pretrained
from fed_userllm.models.constrained import TitleTrie, rank_titles
from fed_userllm.models.llm import load_llm
from fed_userllm.models.userllm import CONFIG_NAME, ENCODER_DIR, UserLLM
from fed_userllm.runtime import resolve_device
from fed_userllm.tasks.prompts import INSTRUCTIONS, QUESTIONS, format_prompt
from fed_userllm.train.contextualize import load_task
from fed_userllm.train.contextualize_config import ContextualizeConfig

from .batching import DynamicBatcher, Overloaded

log = logging.getLogger("fed_userllm.serving")
API_KEY_ENV = "FED_USERLLM_API_KEY"
TASKS = ("nextitem", "favgenre", "free")
RANKED_TASKS = ("nextitem", "favgenre")
EMBEDDING_DTYPE = "float32"
FREE_INSTRUCTION = "Answer the user's request. Personalize the answer to the user's history."


@dataclass
class ServingConfig:
    """Batching and safety limits of one server."""

    max_batch_size: int = 16  # 1 = no batching
    max_wait_ms: float = 20.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # requests waiting beyond this get 503
    max_new_tokens: int = 64
    max_events: int | None = None  # None = the encoder's max_len
    max_prompt_chars: int = 2000
    max_k: int = 20
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_new_tokens", "max_prompt_chars", "max_k",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.max_events is not None and self.max_events < 1:
            raise ValueError(f"max_events={self.max_events}: expected a positive integer or None")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms}, request_timeout_s={self.request_timeout_s}: "
                             "expected max_wait_ms >= 0 and request_timeout_s > 0")


# ---------------------------------------------------------------------------------------------- the model


class PrecomputedStates(nn.Module):
    """Stands in for the user encoder: the phone already ran it, so ``encode`` returns the states it sent.

    Plugged into ``UserLLM.from_pretrained(..., encoder=...)``, it lets the UserLLM apply its own projection
    and cross-attention / soft prompt exactly as in training, with no copy of that logic here. ``encoder``
    (the on-device encoder's weights) serves models trained with ``user_tokens='next_item'``: its next-item
    head maps the sent states to the vector the model reads.
    """

    def __init__(self, d_model: int, encoder: nn.Module | None = None):
        super().__init__()
        self.config = SimpleNamespace(d_model=d_model)
        self.encoder = encoder
        self.next_item_dim = getattr(encoder, "next_item_dim", None)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["states"]

    def next_item_vectors(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.next_item_vectors(states, mask)


@dataclass
class Job:
    """One validated request, ready for batching."""

    states: torch.Tensor  # [n_events, d_model] float32, real events only
    prompt: str
    task: str
    constrained: bool
    k: int
    max_new_tokens: int
    temperature: float

    @property
    def key(self) -> tuple:
        """Requests with equal keys share one generate call."""
        if self.constrained:
            return self.task, self.k
        return "generate", self.max_new_tokens, self.temperature


@dataclass
class Answer:
    text: str
    items: list[tuple[int, str]] | None
    tokens: int
    batch_size: int
    compute_s: float


class ServedModel:
    """A UserLLM loaded once, frozen, in inference mode, that takes precomputed encoder states.

    ``catalogs`` are what constrained decoding ranks per task: {"nextitem": {item id: title},
    "favgenre": {genre id: name}}.
    """

    def __init__(self, model: UserLLM, tokenizer: PreTrainedTokenizerBase, encoder_hash: str, max_len: int,
                 catalogs: dict[str, dict[int, str]], noun: str = "movie", trained_task: str | None = None,
                 source: str = ""):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.encoder_hash, self.max_len, self.noun = encoder_hash, max_len, noun
        self.trained_task, self.source = trained_task, source
        self.d_model = model.encoder.config.d_model
        self.device = next(model.parameters()).device
        self.catalogs = {task: names for task, names in catalogs.items() if names}
        self.tries = {
            task: TitleTrie.from_titles(list(names.values()), tokenizer, list(names))
            for task, names in self.catalogs.items()
        }

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto") -> ServedModel:
        """Load a contextualization run (`fed_userllm.train.contextualize`): its UserLLM from ``model/``, the
        task's data for the catalogs, and the hash of the encoder whose outputs the model was trained on."""
        run_dir = Path(run_dir)
        model_dir = run_dir / "model"
        if not (run_dir / "config.json").is_file() or not (model_dir / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{run_dir}: expected a finished contextualization run "
                                    f"(config.json and model/{CONFIG_NAME})")
        config = ContextualizeConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        if config.integration == "text":
            raise ValueError(f"{run_dir}: a TextPrompt baseline (integration='text') takes no embeddings")
        saved = model_dir / ENCODER_DIR  # trained encoder; a frozen one (strategy 'proj') stays in its run
        encoder_dir = saved if saved.is_dir() else Path(config.encoder) / "best"
        encoder = json.loads((encoder_dir / "config.json").read_text())
        llm, tokenizer = load_llm(config.llm, device=resolve_device(device))
        states = PrecomputedStates(encoder["d_model"], load_pretrained(encoder_dir, "cpu"))
        model = UserLLM.from_pretrained(model_dir, llm=llm, encoder=states)
        task = load_task(config, tokenizer)
        return cls(model, tokenizer, encoder_weights_hash(encoder_dir), encoder["max_len"],
                   catalogs(task.seq), task.noun, config.task, str(run_dir))

    def prompt(self, task: str, text: str | None) -> str:
        """The prompt text: NextItem / FavGenre ask exactly what `fed_userllm.tasks` trained on (no text
        history); ``free`` sends the request under a generic instruction."""
        if task == "free":
            return format_prompt(self.tokenizer, FREE_INSTRUCTION, text)
        return format_prompt(self.tokenizer, INSTRUCTIONS[task].format(noun=self.noun),
                             QUESTIONS[task].format(noun=self.noun))

    def info(self) -> dict:
        llm = self.model.llm
        return {
            "source": self.source,
            "llm": self.model.config.llm,
            "llm_type": llm.config.model_type,
            "llm_dtype": str(llm.dtype).removeprefix("torch."),
            "integration": self.model.config.integration,
            "strategy": self.model.config.strategy,
            "device": str(self.device),
            "encoder_hash": self.encoder_hash,
            "embedding": {"shape": ["T", self.d_model], "dtype": EMBEDDING_DTYPE, "max_events": self.max_len},
            "tasks": list(TASKS),
            "trained_task": self.trained_task,
            "constrained_tasks": sorted(self.tries),
        }

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> list[Answer]:
        """Answer jobs sharing one key with one batched generate call."""
        start = time.perf_counter()
        n = max(len(j.states) for j in jobs)
        states = torch.zeros(len(jobs), n, self.d_model)
        mask = torch.zeros(len(jobs), n, dtype=torch.bool)
        for i, job in enumerate(jobs):
            states[i, : len(job.states)], mask[i, : len(job.states)] = job.states, True
        user = {"states": states.to(self.device), "mask": mask.to(self.device)}
        prompts, first = [j.prompt for j in jobs], jobs[0]
        if first.constrained:
            names = self.catalogs[first.task]
            trie = self.tries[first.task]
            ranked = rank_titles(self.model, self.tokenizer, prompts, trie, first.k, batch_user=user)
            items = [[(i, names[i]) for i in row if i >= 0] for row in ranked.tolist()]
            texts, tokens = [row[0][1] if row else "" for row in items], [0] * len(jobs)
        else:
            texts, tokens = self._generate(user, prompts, first.max_new_tokens, first.temperature)
            items = [None] * len(jobs)
        seconds = time.perf_counter() - start
        return [Answer(text, ranked_items, n_tokens, len(jobs), seconds)
                for text, ranked_items, n_tokens in zip(texts, items, tokens, strict=True)]

    def _generate(self, user: dict, prompts: list[str], max_new_tokens: int, temperature: float
                  ) -> tuple[list[str], list[int]]:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(self.device)
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out = self.model.generate(user, ids, mask, max_new_tokens=max_new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
        texts, counts = [], []
        for row in out.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True))
            counts.append(len(row))
        return texts, counts


def encoder_weights_hash(encoder_dir: str | Path) -> str:
    """sha256 of the encoder's safetensors file: names the exact encoder whose outputs the server accepts."""
    return hashlib.sha256((Path(encoder_dir) / "model.safetensors").read_bytes()).hexdigest()


def catalogs(seq: UserSequences) -> dict[str, dict[int, str]]:
    """What constrained decoding ranks, as the tasks do: every item of the item vocabulary (raw id -> title)
    and every genre of the genre vocabulary (id -> name)."""
    return {"nextitem": {int(raw): seq.catalog.title(raw) for raw in seq.vocabs["item"].tokens},
            "favgenre": {i + NUM_RESERVED: str(g) for i, g in enumerate(seq.vocabs["genre"].tokens)}}


# ---------------------------------------------------------------------------------------------- HTTP schema


class UserEmbedding(BaseModel):
    """Per-event outputs of the on-device encoder, before the projection: ``embeddings``, ``shape`` and
    ``dtype`` as `fed_userllm.export.device.embed` writes them, plus the encoder hash from the manifest."""

    model_config = ConfigDict(extra="forbid")
    embeddings: list[list[float]] = Field(description="[T, d_model], one row per event, oldest first")
    shape: list[int] = Field(description="[T, d_model]; must match embeddings and the loaded model")
    dtype: str = Field(EMBEDDING_DTYPE, description="float32, the encoder's output dtype")
    encoder_hash: str = Field(description="sha256 of the encoder weights: the manifest's source.model_sha256")
    length: int | None = Field(None, description="real events; later rows are right-padding (default: T)")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: UserEmbedding
    task: Literal["nextitem", "favgenre", "free"] = "free"
    prompt: str | None = Field(None, description="the question (required for task=free)")
    max_new_tokens: int | None = Field(None, ge=1, description="default and upper bound: the server's limit")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy decoding")
    constrained: bool | None = Field(None, description="rank catalog titles (default: nextitem, favgenre)")
    k: int = Field(5, ge=1, description="how many ranked items to return when constrained")


class Item(BaseModel):
    id: int = Field(description="nextitem: the dataset's item id (movieId); favgenre: the genre's vocab id")
    title: str


class Timing(BaseModel):
    queue_ms: float = Field(description="time outside the model call: validation and waiting for a batch")
    compute_ms: float = Field(description="the batched model call this request was part of")
    total_ms: float
    batch_size: int


class GenerateResponse(BaseModel):
    text: str = Field(description="the generated text; for ranked tasks the top item's title")
    items: list[Item] | None = Field(None, description="ranked catalog items, best first (constrained only)")
    tokens: int = Field(description="new tokens generated (0 for ranked tasks)")
    timing: Timing


# ---------------------------------------------------------------------------------------------- validation


def _reject(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def max_events(served: ServedModel, config: ServingConfig) -> int:
    """The configured event limit, never above what the encoder (and so the projection) was trained on."""
    return min(config.max_events or served.max_len, served.max_len)


def validate(req: GenerateRequest, served: ServedModel, config: ServingConfig) -> Job:
    """Turn a request into a Job or raise the HTTP error that says what is wrong."""
    emb = req.user
    if emb.dtype != EMBEDDING_DTYPE:
        raise _reject(422, f"user.dtype={emb.dtype!r}: expected {EMBEDDING_DTYPE!r} (encoder output dtype)")
    if not hmac.compare_digest(emb.encoder_hash.lower(), served.encoder_hash):
        raise _reject(409, f"user.encoder_hash={emb.encoder_hash[:16]!r}...: the loaded model expects "
                           f"embeddings from encoder {served.encoder_hash[:16]}...")
    limit = max_events(served, config)
    if len(emb.shape) != 2 or emb.shape[1] != served.d_model or emb.shape[0] < 1:
        raise _reject(422, f"user.shape={emb.shape}: expected [T, {served.d_model}] with T >= 1")
    if emb.shape[0] > limit:
        raise _reject(422, f"user.shape={emb.shape}: {emb.shape[0]} events, at most {limit} allowed")
    widths = sorted({len(r) for r in emb.embeddings})
    if len(emb.embeddings) != emb.shape[0] or widths != [emb.shape[1]]:
        raise _reject(422, f"user.embeddings has {len(emb.embeddings)} rows of lengths {widths[:5]}: "
                           f"expected shape {emb.shape} as declared in user.shape")
    states = np.asarray(emb.embeddings, dtype=np.float64)
    bad = ~np.isfinite(states)
    if bad.any():
        event, dim = np.argwhere(bad)[0]
        raise _reject(422, f"user.embeddings has {int(bad.sum())} NaN/inf values (first: event {event}, "
                           f"dim {dim})")
    length = emb.shape[0] if emb.length is None else emb.length
    if not 1 <= length <= emb.shape[0]:
        raise _reject(422, f"user.length={emb.length}: expected 1 <= length <= {emb.shape[0]} (T)")
    if np.abs(states).max() > np.finfo(np.float32).max:
        raise _reject(422, "user.embeddings has values outside the float32 range")
    max_new_tokens = req.max_new_tokens or config.max_new_tokens
    if max_new_tokens > config.max_new_tokens:
        raise _reject(422, f"max_new_tokens={req.max_new_tokens}: the limit is {config.max_new_tokens}")
    constrained = req.task in RANKED_TASKS if req.constrained is None else req.constrained
    if constrained and req.task not in served.tries:
        raise _reject(422, f"constrained=true with task={req.task!r}: this model ranks only "
                           f"{sorted(served.tries)} (task 'free' is never constrained)")
    if constrained and not req.k <= min(config.max_k, served.tries[req.task].num_distinct):
        raise _reject(422, f"k={req.k}: expected <= {min(config.max_k, served.tries[req.task].num_distinct)}")
    if req.task == "free" and not (req.prompt or "").strip():
        raise _reject(422, "prompt: required (non-empty) for task='free'")
    if req.task != "free" and req.prompt is not None:
        raise _reject(422, f"prompt: only for task='free'; task={req.task!r} asks its trained question")
    if req.prompt is not None and len(req.prompt) > config.max_prompt_chars:
        raise _reject(422, f"prompt has {len(req.prompt)} characters: the limit is {config.max_prompt_chars}")
    states = torch.tensor(states[:length], dtype=torch.float32)
    return Job(states, served.prompt(req.task, req.prompt), req.task, constrained, req.k, max_new_tokens,
               req.temperature)


# ---------------------------------------------------------------------------------------------- the app


class Metrics:
    """Counters and a window of recent latencies, safe to update from the batcher thread."""

    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self.requests = self.errors = self.batches = self.batched = self.max_batch = self.tokens = 0
        self.status: dict[str, int] = {}
        self.latencies: deque[float] = deque(maxlen=window)
        self.batch_seconds = 0.0

    def request(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests += 1
            self.errors += status >= 400
            self.status[str(status)] = self.status.get(str(status), 0) + 1
            self.latencies.append(seconds)

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batched += size
            self.max_batch = max(self.max_batch, size)
            self.batch_seconds += seconds

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n

    def snapshot(self) -> dict:
        with self._lock:
            lat = np.array(self.latencies) * 1000
            return {
                "requests": self.requests,
                "errors": self.errors,
                "status": dict(self.status),
                "batches": self.batches,
                "batched_requests": self.batched,
                "mean_batch_size": self.batched / self.batches if self.batches else 0.0,
                "max_batch_size": self.max_batch,
                "tokens": self.tokens,
                "model_seconds": self.batch_seconds,
                "latency_ms": {
                    "mean": float(lat.mean()) if lat.size else None,
                    "p50": float(np.percentile(lat, 50)) if lat.size else None,
                    "p95": float(np.percentile(lat, 95)) if lat.size else None,
                    "window": int(lat.size),
                },
            }


BEARER = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


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


def create_app(served: ServedModel, config: ServingConfig | None = None, api_key: str | None = None
               ) -> FastAPI:
    """The FastAPI app; ``api_key`` (if set) is required as a bearer token on every endpoint but /healthz."""
    config = config or ServingConfig()
    metrics = Metrics()
    state: dict = {}

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch(size, seconds)

    async def lifespan(app: FastAPI):
        state["batcher"] = DynamicBatcher(served.run, config.max_batch_size, config.max_wait_ms / 1000,
                                          config.max_queue, on_batch)
        try:
            yield
        finally:
            await asyncio.to_thread(state.pop("batcher").close)

    app = FastAPI(title="fed-userllm", version="1", lifespan=lifespan,
                  description="Personalized generation from on-device user embeddings (User-LLM).")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    def authorize(credentials: Credentials) -> None:
        if api_key is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field, without echoing the (possibly private, possibly huge) input back."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path == "/v1/generate":
            metrics.request(response.status_code, time.perf_counter() - start)
        return response

    errors = {401: {"description": "missing or wrong bearer token"},
              409: {"description": "embedding from another encoder (encoder_hash mismatch)"},
              413: {"description": "request body too large"},
              422: {"description": "invalid input: shape, dtype, NaN/inf, too many events, limits, task"},
              503: {"description": "request queue full"}, 504: {"description": "timed out"}}

    auth = [Depends(authorize)]

    @app.post("/v1/generate", response_model=GenerateResponse, responses=errors, dependencies=auth)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        start = time.perf_counter()
        job = validate(req, served, config)
        try:
            future = state["batcher"].submit(job, job.key)
        except Overloaded as err:
            raise HTTPException(503, str(err)) from None
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(future), config.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"no answer within {config.request_timeout_s} s") from None
        except Exception as err:
            log.exception("generation failed for one request")
            raise HTTPException(500, f"generation failed: {type(err).__name__}") from None
        total, compute = time.perf_counter() - start, answer.compute_s
        metrics.add_tokens(answer.tokens)
        return GenerateResponse(
            text=answer.text,
            items=None if answer.items is None else [Item(id=i, title=t) for i, t in answer.items],
            tokens=answer.tokens,
            timing=Timing(queue_ms=1000 * max(total - compute, 0.0), compute_ms=1000 * compute,
                          total_ms=1000 * total, batch_size=answer.batch_size),
        )

    @app.get("/v1/model", dependencies=auth)
    async def model_info() -> dict:
        return served.info() | {"limits": asdict(config) | {"max_events": max_events(served, config)}}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok" if "batcher" in state else "starting"}

    @app.get("/metrics", dependencies=auth)
    async def get_metrics() -> dict:
        return metrics.snapshot()

    return app


class BackgroundServer:
    """uvicorn serving ``app`` from a background thread on a free loopback port (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 60.0):
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none"))
        self._thread = threading.Thread(target=self._server.run, args=([self._sock],), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Graceful shutdown: in-flight requests finish, the batcher stops, the port is released."""
        self._server.should_exit = True
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", **limits) -> None:
    """Load a contextualization run and serve it until interrupted (``limits``: ServingConfig fields)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can query the model", host)
    served = ServedModel.load(model_dir, device=device)
    uvicorn.run(create_app(served, ServingConfig(**limits), api_key), host=host, port=port, ws="none")
