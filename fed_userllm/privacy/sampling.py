"""Poisson client sampling: the sampling scheme the Opacus accountants assume."""

import numpy as np


def poisson_sample(num_clients: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted int64) of the clients selected when each joins independently with probability q.

    Drawing the count K ~ Binomial(N, q) and then K distinct indices uniformly at random is
    distributionally identical to N independent Bernoulli(q) draws: given K, the Bernoulli subset is
    uniform over all K-subsets. numpy's choice without replacement samples in O(K) memory when K << N,
    so 100,000 clients at small q never materialise an N-sized mask. The cohort size is random
    (that randomness is what the accountants' amplification-by-sampling relies on) and may be 0.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not 0 < q <= 1:
        raise ValueError(f"q (client sampling rate) must be in (0, 1], got {q}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    count = rng.binomial(num_clients, q)
    return np.sort(rng.choice(num_clients, size=count, replace=False)).astype(np.int64)
