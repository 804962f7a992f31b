"""Optional parts of the install: the ExecuTorch export and the HTTP server are extras (``pip install
'fed-userllm[export]'``, ``'fed-userllm[serve]'``; ``[all]`` for both), checked before a command needs them."""

from __future__ import annotations

from importlib.util import find_spec

EXTRAS = {"export": ("executorch", "torchao"), "serve": ("fastapi", "uvicorn", "prometheus_client")}


class MissingExtra(ImportError):
    """A module of an optional extra is not installed."""


def require(extra: str) -> None:
    """Raise `MissingExtra` naming the extra to install when one of its modules is missing."""
    missing = [module for module in EXTRAS[extra] if find_spec(module) is None]
    if missing:
        raise MissingExtra(f"{', '.join(missing)} not installed: this needs the '{extra}' extra "
                           f"(pip install 'fed-userllm[{extra}]')")
