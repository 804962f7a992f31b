"""Synthetic MovieLens-schema data with learnable structure, for scale tests and benchmarks.

Each user has a few preferred genres and a current genre that drifts between them; items are drawn by
popularity within the current genre, often continuing a "series" (the next item of the same genre), and
ratings follow the user's affinity for the genre. A sequence model can therefore beat popularity.
"""

from __future__ import annotations

import numpy as np

from fed_userllm.data.movielens import Catalog, Interactions


def synthetic_movielens(num_users: int = 1000, num_items: int = 2000, num_genres: int = 12,
                        mean_events: int = 40, min_events: int = 5, max_events: int = 200,
                        drift: float = 0.15, series: float = 0.3, seed: int = 0) -> tuple[Interactions, Catalog]:
    """Generate ``num_users`` time-ordered histories in the normalised MovieLens representation."""
    for name, value, low in (("num_users", num_users, 1), ("num_items", num_items, num_genres),
                             ("num_genres", num_genres, 1), ("min_events", min_events, 3)):
        if value < low:
            raise ValueError(f"{name}={value}: expected >= {low}")
    if not min_events <= mean_events <= max_events:
        raise ValueError(f"expected min_events <= mean_events <= max_events, got {min_events}, {mean_events}, "
                         f"{max_events}")
    rng = np.random.default_rng(seed)
    genre_names = [f"Genre{g:02d}" for g in range(num_genres)]
    item_genre = np.sort(rng.integers(num_genres, size=num_items))
    item_genre[:num_genres] = np.arange(num_genres)  # every genre has at least one item
    item_genre = np.sort(item_genre)
    genre_start = np.searchsorted(item_genre, np.arange(num_genres))
    genre_size = np.bincount(item_genre, minlength=num_genres)

    lengths = np.clip(min_events + rng.geometric(1.0 / max(1, mean_events - min_events + 1), num_users) - 1,
                      min_events, max_events)
    preferred = rng.integers(num_genres, size=(num_users, 3))
    affinity = rng.normal(3.5, 0.8, size=(num_users, num_genres))
    genre = preferred[:, 0].copy()
    rank = np.zeros(num_users, dtype=np.int64)
    clock = rng.integers(9 * 10**8, 15 * 10**8, size=num_users)

    users, items, ratings, times = [], [], [], []
    for t in range(int(lengths.max())):
        active = np.flatnonzero(lengths > t)
        switch = rng.random(active.size) < drift
        genre[active[switch]] = preferred[active[switch], rng.integers(3, size=int(switch.sum()))]
        g = genre[active]
        follow = (rng.random(active.size) < series) & (t > 0) & ~switch
        fresh = np.floor(genre_size[g] * rng.random(active.size) ** 3).astype(np.int64)  # popular items first
        rank[active] = np.where(follow, (rank[active] + 1) % genre_size[g], fresh)
        items.append(genre_start[g] + rank[active])
        ratings.append(np.clip(np.round(affinity[active, g] + rng.normal(0, 0.7, active.size)), 1, 5))
        clock[active] += rng.integers(0, 3 * 86400, size=active.size) * (rng.random(active.size) > 0.1)
        times.append(clock[active].copy())
        users.append(active)

    order = np.argsort(np.concatenate(times), kind="stable")  # a file sorted by time, like a real export
    interactions = Interactions(
        user=np.concatenate(users)[order].astype(np.int64) + 1,
        item=np.concatenate(items)[order].astype(np.int64) + 1,
        rating=np.concatenate(ratings)[order].astype(np.float32),
        timestamp=np.concatenate(times)[order].astype(np.int64),
    )
    second = rng.integers(num_genres, size=num_items)
    catalog = Catalog(
        titles={i + 1: f"Synthetic Movie {i + 1} ({1950 + i % 70})" for i in range(num_items)},
        genres={i + 1: tuple(dict.fromkeys((genre_names[item_genre[i]], genre_names[second[i]])))
                for i in range(num_items)},
    )
    return interactions, catalog
