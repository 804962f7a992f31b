"""Dynamic batching: concurrent requests share one model call, so throughput grows with load.

One worker thread owns the model. It takes the first queued request, waits at most ``max_wait_s`` for more
(or until ``max_batch_size`` are queued), groups them by a key (requests that can share one ``generate`` call)
and runs each group. Under load the queue fills while a batch runs, so the next batch starts full without
waiting. A group whose call raises is retried one request at a time, so a bad request fails alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The request queue is full; the caller should retry later (HTTP 503)."""


class DynamicBatcher(Generic[T, R]):
    """Run ``run(items) -> results`` (same length, same order) on batches of submitted items.

    ``on_batch(size, seconds)`` is called after every model call (for metrics).
    """

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s}: expected >= 0")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: expected >= 1")
        self.run, self.max_batch_size, self.max_wait_s = run, max_batch_size, max_wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue[tuple[Hashable, T, Future] | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._loop, name="model-batcher", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, item: T, key: Hashable = None) -> Future:
        """Queue one item; the returned future resolves to its result or raises its own error."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        try:
            self._queue.put_nowait((key, item, future))
        except queue.Full:
            raise Overloaded(f"request queue is full ({self._queue.maxsize} waiting); retry later") from None
        return future

    def close(self) -> None:
        """Finish the running batch, fail whatever is still queued, stop the worker thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not None:
                entry[2].set_exception(RuntimeError("server is shutting down"))

    def _collect(self) -> list[tuple[Hashable, T, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                entry = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if entry is None:  # close() was called: run what we have, then stop
                self._queue.put(None)
                break
            batch.append(entry)
        return batch

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            groups: dict[Hashable, list[tuple[T, Future]]] = {}
            for key, item, future in batch:
                if future.set_running_or_notify_cancel():
                    groups.setdefault(key, []).append((item, future))
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[tuple[T, Future]]) -> None:
        start = time.perf_counter()
        try:
            results = self.run([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(group)} items")
        except Exception as err:
            if len(group) == 1:
                group[0][1].set_exception(err)
            else:  # isolate the offending request(s)
                for entry in group:
                    self._run_group([entry])
            return
        if self.on_batch is not None:
            self.on_batch(len(group), time.perf_counter() - start)
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)
