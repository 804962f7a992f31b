"""Device, threads, seeds and atomic writes: the small runtime facts every entry point needs (torch is
imported where it is used, so torch-free commands can write files atomically)."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch (with a clear error)."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine; use 'auto' or 'cpu'")
    return resolved


def quiet_library_diagnostics() -> None:
    """Hide third-party import-time diagnostics that are not the run's (torchao's missing CUDA kernels and
    triton, torch's Enum-registration deprecations) in a Flower app's processes, as the CLI's quiet mode does.
    Call before torch is imported: torch reads TORCH_LOGS then; an explicit TORCH_LOGS wins."""
    os.environ.setdefault("TORCH_LOGS", "-torch")
    logging.getLogger("torchao").setLevel(logging.ERROR)


# Set by the CLI's quiet mode (the default; `-v` leaves it unset): third-party output that bypasses logging
# (native libraries' diagnostics, transformers' GGUF progress bar) is dropped.
QUIET_NATIVE_ENV = "FED_USERLLM_QUIET_NATIVE"


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Drop what native code writes straight to file descriptor 2 (e.g. the ExecuTorch runtime's cpuinfo probe)
    while the CLI is quiet: Python's logging and warnings never reach it, so only the descriptor can silence it."""
    if not os.environ.get(QUIET_NATIVE_ENV):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def set_threads(threads: int) -> None:
    """Torch intra-op threads (1 is fastest on a loaded 2-core VM; see the README)."""
    import torch

    if threads < 1:
        raise ValueError(f"threads={threads}: expected >= 1")
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (metrics survive a crash up to the last full line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
