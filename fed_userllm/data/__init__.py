"""MovieLens data: readers, the paper's sequence protocol, federated partitions, synthetic data."""

from fed_userllm.data.datasets import (
    DEFAULT_DATASET,
    describe,
    load_catalog,
    load_interactions,
    load_sequences,
    prepare,
)
from fed_userllm.data.movielens import Catalog, DataError, Interactions, read_movielens
from fed_userllm.data.partition import Partitioner
from fed_userllm.data.sequences import FEATURES, UserSequences
from fed_userllm.data.synthetic import synthetic_movielens
from fed_userllm.data.vocab import MASK_ID, NUM_RESERVED, PAD_ID, UNK_ID, Vocab

__all__ = [
    "DEFAULT_DATASET", "FEATURES", "MASK_ID", "NUM_RESERVED", "PAD_ID", "UNK_ID", "Catalog", "DataError",
    "Interactions", "Partitioner", "UserSequences", "Vocab", "describe", "load_catalog", "load_interactions",
    "load_sequences", "prepare", "read_movielens", "synthetic_movielens",
]
