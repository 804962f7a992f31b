"""MovieLens data: readers, the paper's sequence protocol, federated partitions, synthetic data.

The names below load their module on first use (PEP 562), so importing one light module of this package
(e.g. ``fed_userllm.data.movielens``) does not import torch, which the sequences need.
"""

from __future__ import annotations

from importlib import import_module

_MODULE_OF = {
    "DEFAULT_DATASET": "datasets", "describe": "datasets", "load_catalog": "datasets", "load_interactions": "datasets",
    "load_sequences": "datasets", "prepare": "datasets",
    "Catalog": "movielens", "DataError": "movielens", "Interactions": "movielens", "read_movielens": "movielens",
    "Partitioner": "partition",
    "FEATURES": "sequences", "UserSequences": "sequences",
    "synthetic_movielens": "synthetic",
    "MASK_ID": "vocab", "NUM_RESERVED": "vocab", "PAD_ID": "vocab", "UNK_ID": "vocab", "Vocab": "vocab",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
