"""From request bodies to jobs: every check, each raising the HTTP error that says what is wrong (422 invalid
input, 409 an embedding from another encoder, 404 another model) without echoing the input back."""

from __future__ import annotations

import hmac

import numpy as np
import torch
from fastapi import HTTPException

from fed_userllm.serving.config import ServingConfig
from fed_userllm.serving.model import Job, ServedModel
from fed_userllm.serving.schema import (
    EMBEDDING_DTYPE,
    RANKED_TASKS,
    ChatCompletionRequest,
    GenerateRequest,
    UserEmbedding,
)


def _reject(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def max_events(served: ServedModel, config: ServingConfig) -> int:
    """The configured event limit, never above what the encoder (and so the projection) was trained on."""
    return min(config.max_events or served.max_len, served.max_len)


def user_states(emb: UserEmbedding, field: str, served: ServedModel, config: ServingConfig) -> torch.Tensor:
    """The real events' states [length, state_dim] of a user embedding sent as request field ``field``."""
    if emb.dtype != EMBEDDING_DTYPE:
        raise _reject(422, f"{field}.dtype={emb.dtype!r}: expected {EMBEDDING_DTYPE!r} (encoder output dtype)")
    if not hmac.compare_digest(emb.encoder_hash.lower(), served.encoder_hash):
        raise _reject(409, f"{field}.encoder_hash={emb.encoder_hash[:16]!r}...: the loaded model expects "
                           f"embeddings from encoder {served.encoder_hash[:16]}...")
    limit = max_events(served, config)
    if len(emb.shape) != 2 or emb.shape[1] != served.state_dim or emb.shape[0] < 1:
        raise _reject(422, f"{field}.shape={emb.shape}: expected [T, {served.state_dim}] with T >= 1")
    if emb.shape[0] > limit:
        raise _reject(422, f"{field}.shape={emb.shape}: {emb.shape[0]} events, at most {limit} allowed")
    widths = sorted({len(r) for r in emb.embeddings})
    if len(emb.embeddings) != emb.shape[0] or widths != [emb.shape[1]]:
        raise _reject(422, f"{field}.embeddings has {len(emb.embeddings)} rows of lengths {widths[:5]}: "
                           f"expected shape {emb.shape} as declared in {field}.shape")
    states = np.asarray(emb.embeddings, dtype=np.float64)
    bad = ~np.isfinite(states)
    if bad.any():
        event, dim = np.argwhere(bad)[0]
        raise _reject(422, f"{field}.embeddings has {int(bad.sum())} NaN/inf values (first: event {event}, "
                           f"dim {dim})")
    length = emb.shape[0] if emb.length is None else emb.length
    if not 1 <= length <= emb.shape[0]:
        raise _reject(422, f"{field}.length={emb.length}: expected 1 <= length <= {emb.shape[0]} (T)")
    if np.abs(states).max() > np.finfo(np.float32).max:
        raise _reject(422, f"{field}.embeddings has values outside the float32 range")
    return torch.tensor(states[:length], dtype=torch.float32)


def decoding(task: str, constrained: bool | None, k: int, max_new_tokens: int | None, tokens_field: str,
             served: ServedModel, config: ServingConfig) -> tuple[bool, int]:
    """Whether the answer is ranked (constrained) and how many new tokens it may have."""
    limit = max_new_tokens or config.max_new_tokens
    if limit > config.max_new_tokens:
        raise _reject(422, f"{tokens_field}={max_new_tokens}: the limit is {config.max_new_tokens}")
    constrained = task in RANKED_TASKS if constrained is None else constrained
    if constrained and task not in served.tries:
        raise _reject(422, f"constrained=true with task={task!r}: this model ranks only "
                           f"{sorted(served.tries)} (task 'free' is never constrained)")
    if constrained and not k <= min(config.max_k, served.tries[task].num_distinct):
        raise _reject(422, f"k={k}: expected <= {min(config.max_k, served.tries[task].num_distinct)}")
    return constrained, limit


def generate_job(req: GenerateRequest, served: ServedModel, config: ServingConfig) -> Job:
    """The job of a /v1/generate request."""
    states = user_states(req.user, "user", served, config)
    constrained, max_new_tokens = decoding(req.task, req.constrained, req.k, req.max_new_tokens, "max_new_tokens",
                                           served, config)
    if req.task == "free" and not (req.prompt or "").strip():
        raise _reject(422, "prompt: required (non-empty) for task='free'")
    if req.task != "free" and req.prompt is not None:
        raise _reject(422, f"prompt: only for task='free'; task={req.task!r} asks its trained question")
    if req.prompt is not None and len(req.prompt) > config.max_prompt_chars:
        raise _reject(422, f"prompt has {len(req.prompt)} characters: the limit is {config.max_prompt_chars}")
    return Job(states, served.prompt(req.task, req.prompt), req.task, constrained, req.k, max_new_tokens,
               req.temperature)


def chat_jobs(req: ChatCompletionRequest, served: ServedModel, config: ServingConfig) -> list[Job]:
    """The jobs of a chat completion request, one per choice (``n``)."""
    if req.model is not None and req.model != served.name:
        raise _reject(404, f"model={req.model!r} not found: this server serves {served.name!r}")
    states = user_states(req.user_embedding, "user_embedding", served, config)
    tokens_field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    constrained, max_new_tokens = decoding(req.task, req.constrained, req.k,
                                           req.max_completion_tokens or req.max_tokens, tokens_field, served, config)
    if req.n > config.max_n:
        raise _reject(422, f"n={req.n}: the limit is {config.max_n}")
    if req.task == "free" and not any(m.role == "user" and m.content.strip() for m in req.messages):
        raise _reject(422, "messages: a non-empty user message is required for task='free'")
    if req.task != "free" and req.messages:
        raise _reject(422, f"messages: only for task='free'; task={req.task!r} asks its trained question "
                           "(send messages=[])")
    chars = sum(len(m.content) for m in req.messages)
    if chars > config.max_prompt_chars:
        raise _reject(422, f"messages have {chars} characters: the limit is {config.max_prompt_chars}")
    prompt = served.chat_prompt([m.model_dump() for m in req.messages]) if req.task == "free" else \
        served.prompt(req.task, None)
    return [Job(states, prompt, req.task, constrained, req.k, max_new_tokens, req.temperature, req.top_p)
            for _ in range(req.n)]
