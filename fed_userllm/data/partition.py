"""Federated partitioning: which users' histories each simulated client holds.

The default is the natural non-IID split of the method: one client = one user. Partitions are index
arithmetic over a seeded permutation, so 100,000 clients cost one int64 array, not 100,000 data copies.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np


class Partitioner:
    """Maps client ids ``0..num_clients-1`` to disjoint groups of ``users_per_client`` user indices."""

    def __init__(self, num_users: int, users_per_client: int = 1, seed: int = 0) -> None:
        if num_users < 1:
            raise ValueError(f"num_users={num_users}: expected >= 1")
        if users_per_client < 1:
            raise ValueError(f"users_per_client={users_per_client}: expected >= 1")
        self.num_users, self.users_per_client, self.seed = num_users, users_per_client, seed

    @property
    def num_clients(self) -> int:
        return -(-self.num_users // self.users_per_client)

    @cached_property
    def _order(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(self.num_users)

    def users(self, client_id: int) -> np.ndarray:
        """User indices held by ``client_id`` (the identity when each client holds one user)."""
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client_id={client_id}: expected 0..{self.num_clients - 1}")
        if self.users_per_client == 1:
            return np.array([client_id], dtype=np.int64)
        lo = client_id * self.users_per_client
        return self._order[lo:lo + self.users_per_client]
