"""Server-side aggregation: user-level DP-FedAvg (McMahan et al. 2018) and plain weighted FedAvg.

DP-FedAvg with Poisson client sampling at rate q over N clients:
    new_global = global + (sum_i clip(delta_i, C) + N(0, (sigma*C)^2 I)) / (q*N)
The denominator is the FIXED expected cohort q*N and every client has weight 1. Adding or removing one
user then changes the noised sum by at most C, which is the sensitivity the Opacus accountants assume.
Dividing by the realised cohort size, or weighting clients by example counts, would make the
sensitivity data-dependent and the reported epsilon wrong.

All arithmetic is float64 numpy; arrays may be numpy arrays or torch tensors, and the new global
weights come back as the same kind, dtype and device as `global_weights`.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class DPAggregateStats:
    """What happened in one DP-FedAvg aggregation (for logs; none of it is private except via DP)."""

    num_updates: int
    update_norms: list[float]  # L2 norms before clipping
    fraction_clipped: float  # share of updates with norm > C (0 when there were no updates)
    noise_std: float  # std of the noise per coordinate of the averaged update: sigma*C/(q*N)


def _as_float64(array: ArrayLike, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        if not array.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {array.dtype} (send trainable parameters only)")
        return array.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {array.dtype} (send trainable parameters only)")
    return array.astype(np.float64)


def _like(array: np.ndarray, reference: ArrayLike) -> ArrayLike:
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(array).to(device=reference.device, dtype=reference.dtype)
    return array.astype(np.asarray(reference).dtype)


def _check_shapes(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], name: str) -> None:
    if len(arrays) != len(reference):
        raise ValueError(f"{name} has {len(arrays)} arrays, expected {len(reference)}")
    for i, (a, r) in enumerate(zip(arrays, reference, strict=True)):
        if a.shape != r.shape:
            raise ValueError(f"{name}[{i}] has shape {a.shape}, expected {r.shape}")


def l2_norm(arrays: Sequence[ArrayLike]) -> float:
    """L2 norm of all arrays flattened and concatenated (the norm DP-FedAvg clips)."""
    return math.sqrt(sum(float(np.sum(np.square(_as_float64(a, "array")))) for a in arrays))


def model_update(local_weights: Sequence[ArrayLike], global_weights: Sequence[ArrayLike]) -> list[np.ndarray]:
    """A client's update delta = local_weights - global_weights, per array, in float64."""
    local = [_as_float64(a, f"local_weights[{i}]") for i, a in enumerate(local_weights)]
    base = [_as_float64(a, f"global_weights[{i}]") for i, a in enumerate(global_weights)]
    _check_shapes(local, base, "local_weights")
    return [w - g for w, g in zip(local, base, strict=True)]


def clip_update(update: Sequence[ArrayLike], clip_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale the whole update so its global L2 norm is at most clip_norm; return (clipped, original_norm).

    Updates already within the bound are returned unchanged (scale 1); clip_norm=inf disables clipping.
    A NaN or infinite entry makes the norm non-finite, and no scale bounds such an update (NaN > C is
    False), so it is refused with a ValueError: the caller must treat its client as failed.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    arrays = [_as_float64(a, f"update[{i}]") for i, a in enumerate(update)]
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError(f"the update's L2 norm is {norm}: it holds NaN or infinite values and cannot be clipped")
    scale = clip_norm / norm if norm > clip_norm else 1.0
    return [a * scale for a in arrays], norm


def aggregate_dp_fedavg(
    global_weights: Sequence[ArrayLike],
    client_updates: Sequence[Sequence[ArrayLike]],
    clip_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
    rng: np.random.Generator,
    canary_updates: Iterable[Sequence[ArrayLike]] = (),
) -> tuple[list[ArrayLike], DPAggregateStats]:
    """One DP-FedAvg round: clip each update to clip_norm, sum, add N(0, (sigma*C)^2), divide by q*N.

    `client_updates` are deltas (see `model_update`) of the clients that succeeded, possibly none: with
    Poisson sampling an empty cohort still releases a noised (all-noise) update. `expected_cohort` is
    q*N, not len(client_updates). Noise comes from `rng`, so a seeded generator reproduces a run; numpy's
    PCG64 is not a cryptographic generator, which matters for deployments but not for simulations.
    With noise_multiplier=0 and clip_norm=inf this is the plain uniform mean over the expected cohort.
    `canary_updates` (see `fed_userllm.privacy.canaries`) are clipped and summed like client updates but
    are not clients: they stay out of the statistics and out of the denominator.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and math.isinf(clip_norm):
        raise ValueError("noise_multiplier > 0 needs a finite clip_norm (noise std is noise_multiplier*clip_norm)")
    if not (expected_cohort > 0 and math.isfinite(expected_cohort)):
        raise ValueError(f"expected_cohort (q*N) must be finite and > 0, got {expected_cohort}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    base = [_as_float64(g, f"global_weights[{i}]") for i, g in enumerate(global_weights)]
    total = [np.zeros_like(g) for g in base]
    norms = []
    for k, update in enumerate(client_updates):
        norms.append(_add_clipped(total, update, clip_norm, f"client_updates[{k}]"))
    for k, update in enumerate(canary_updates):
        _add_clipped(total, update, clip_norm, f"canary_updates[{k}]")
    noise_std = noise_multiplier * clip_norm if noise_multiplier > 0 else 0.0
    if noise_std > 0:
        for t in total:
            t += noise_std * rng.standard_normal(t.shape)
    new_weights = [_like(g + t / expected_cohort, ref) for g, t, ref in zip(base, total, global_weights, strict=True)]
    stats = DPAggregateStats(
        num_updates=len(norms),
        update_norms=norms,
        fraction_clipped=sum(n > clip_norm for n in norms) / len(norms) if norms else 0.0,
        noise_std=noise_std / expected_cohort,
    )
    return new_weights, stats


def _add_clipped(total: list[np.ndarray], update: Sequence[ArrayLike], clip_norm: float, name: str) -> float:
    """Add ``update`` clipped to ``clip_norm`` into ``total``; return its norm before clipping."""
    arrays = [_as_float64(a, f"{name}[{i}]") for i, a in enumerate(update)]
    _check_shapes(arrays, total, name)
    clipped, norm = clip_update(arrays, clip_norm)
    for t, c in zip(total, clipped, strict=True):
        t += c
    return norm


def weighted_fedavg(client_weights: Sequence[Sequence[ArrayLike]], num_examples: Sequence[int]) -> list[ArrayLike]:
    """Non-private FedAvg (dp="none"): the example-count weighted mean of the clients' weights.

    Kept beside the DP aggregate because the two must not be confused: this weighting is fine
    without DP but breaks the sensitivity bound of DP-FedAvg.
    """
    if not client_weights:
        raise ValueError("client_weights is empty: FedAvg needs at least one client")
    if len(num_examples) != len(client_weights):
        raise ValueError(f"num_examples has {len(num_examples)} entries for {len(client_weights)} clients")
    if any(not (n > 0 and math.isfinite(n)) for n in num_examples):
        raise ValueError(f"num_examples must all be finite and > 0, got {list(num_examples)}")
    reference = client_weights[0]
    base = [_as_float64(a, f"client_weights[0][{i}]") for i, a in enumerate(reference)]
    total = [np.zeros_like(a) for a in base]
    for k, (weights, n) in enumerate(zip(client_weights, num_examples, strict=True)):
        arrays = [_as_float64(a, f"client_weights[{k}][{i}]") for i, a in enumerate(weights)]
        _check_shapes(arrays, base, f"client_weights[{k}]")
        for t, a in zip(total, arrays, strict=True):
            t += n * a
    count = float(sum(num_examples))
    return [_like(t / count, ref) for t, ref in zip(total, reference, strict=True)]
