"""Running the API with uvicorn: in the foreground (``fed-userllm serve``) or from a background thread on a free
loopback port (benchmarks and tests, which share one loaded model between several servers)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fed_userllm.serving.api import create_app
from fed_userllm.serving.config import ServingConfig
from fed_userllm.serving.model import ServedModel

log = logging.getLogger("fed_userllm.serving")
API_KEY_ENV = "FED_USERLLM_API_KEY"


def serve(model_dir: str | Path, config: ServingConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, device: str = "auto") -> None:
    """Load a contextualization run and serve it until interrupted."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can query the model", host)
    served = ServedModel.load(model_dir, device=device)
    uvicorn.run(create_app(served, config, api_key), host=host, port=port, ws="none")


class BackgroundServer:
    """uvicorn serving ``app`` from a background thread on a free loopback port."""

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
