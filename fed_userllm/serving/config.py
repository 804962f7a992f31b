"""The limits of one server (batching, request sizes, timeouts), importable without torch for the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from fed_userllm.settings import setting


@dataclass
class ServingConfig:
    """Batching and safety limits of one server."""

    max_batch_size: int = setting(16, "requests answered by one model call (1: no batching)")
    max_wait_ms: float = setting(20.0, "how long the first request of a batch waits for company")
    max_queue: int = setting(256, "requests waiting beyond this get 503")
    max_new_tokens: int = setting(64, "default and upper bound of max_new_tokens / max_tokens")
    max_events: int | None = setting(None, "most events per user embedding (default: the encoder's max_len)")
    max_prompt_chars: int = setting(2000, "longest prompt (all chat messages together), in characters")
    max_k: int = setting(20, "most ranked items per answer")
    max_n: int = setting(4, "most choices per chat completion (n)")
    max_body_bytes: int = setting(1 << 20, "largest request body (413 beyond)")
    request_timeout_s: float = setting(120.0, "504 when a request waits longer for its answer")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_new_tokens", "max_prompt_chars", "max_k", "max_n",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.max_events is not None and self.max_events < 1:
            raise ValueError(f"max_events={self.max_events}: expected a positive integer or None")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms}, request_timeout_s={self.request_timeout_s}: "
                             "expected max_wait_ms >= 0 and request_timeout_s > 0")
