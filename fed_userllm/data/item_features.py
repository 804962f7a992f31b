"""Public item features: one vector per item id, computed from the public catalog alone.

What is public is not learned privately. Each catalog item gets, in its vocabulary row:
- its genres (multi-hot over the catalog's genres);
- its release year parsed from the title (standardized, squared, a missing flag, and the decade one-hot);
- optionally the frozen LLM's representation of its title: the mean hidden state of the title's tokens after
  ``llm_layers`` decoder layers, reduced by PCA to ``title_dim`` dimensions.
Each block is standardized and scaled to unit mean squared norm, so no block dominates at initialization.
Reserved ids (PAD, UNK, MASK) get zero rows. The table depends on the catalog, the vocabulary and these
settings only (never on ratings), and the LLM part, the slow one on a CPU, is cached on disk per catalog hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from fed_userllm.data.download import cache_dir
from fed_userllm.data.movielens import Catalog
from fed_userllm.data.vocab import NUM_RESERVED, Vocab

YEAR = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")
FORMAT = 1  # bump when the computation changes (invalidates the cache)


@dataclass(frozen=True)
class ItemFeatureSpec:
    """How the public table is computed. ``llm=""`` leaves out the title representation."""

    llm: str = "smollm2"
    llm_layers: int = 8  # decoder layers run over each title (the first ones: cheap, and lexical enough)
    title_dim: int = 32  # PCA dimensions kept of the title representation

    def __post_init__(self) -> None:
        if self.llm and (self.llm_layers < 1 or self.title_dim < 1):
            raise ValueError(f"llm_layers={self.llm_layers}, title_dim={self.title_dim}: expected both >= 1")


def release_year(title: str) -> int | None:
    """The year in a MovieLens-style title ``"Heat (1995)"``, or None."""
    match = YEAR.search(title)
    return int(match.group(1)) if match else None


def catalog_features(catalog: Catalog, items: Vocab) -> np.ndarray:
    """Genre and year blocks [len(items), G + 4 + decades] (reserved rows zero)."""
    ids = items.tokens
    genres = sorted({g for gs in catalog.genres.values() for g in gs})
    column = {g: j for j, g in enumerate(genres)}
    multi_hot = np.zeros((len(ids), max(1, len(genres))), dtype=np.float64)
    for row, item in enumerate(ids):
        for g in catalog.genres.get(int(item), ()):
            multi_hot[row, column[g]] = 1.0
    years = np.array([release_year(catalog.title(i)) or np.nan for i in ids], dtype=np.float64)
    known = ~np.isnan(years)
    if known.any():
        z = np.where(known, (years - np.nanmean(years)) / (np.nanstd(years) or 1.0), 0.0)
        decade = np.where(known, years // 10, np.nan)
        decades = np.arange(np.nanmin(decade), np.nanmax(decade) + 1)
        one_hot = (decade[:, None] == decades[None, :]).astype(np.float64)
    else:
        z, one_hot = np.zeros(len(ids)), np.zeros((len(ids), 1))
    year = np.column_stack([z, z**2 - 1, (~known).astype(np.float64), one_hot])
    return _with_reserved(np.hstack([_unit_block(multi_hot), _unit_block(year)]))


def title_features(catalog: Catalog, items: Vocab, spec: ItemFeatureSpec) -> np.ndarray:
    """The frozen LLM's title representation, PCA-reduced [len(items), title_dim] (reserved rows zero); cached."""
    titles = [catalog.title(i) for i in items.tokens]
    key = hashlib.sha256(json.dumps({"titles": titles, "spec": asdict(spec), "format": FORMAT}).encode())
    path = cache_dir() / "item_features" / f"{key.hexdigest()[:24]}.npy"
    if path.is_file():
        return np.load(path)
    states = _llm_title_states(titles, spec)
    centered = states - states.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    reduced = centered @ vt[: spec.title_dim].T
    reduced *= np.sign(vt[: spec.title_dim].sum(1))  # a fixed sign per component: SVD's is arbitrary
    table = _with_reserved(_unit_block(reduced))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp.npy")
    np.save(tmp, table)
    tmp.replace(path)
    return table


def public_item_features(catalog: Catalog, items: Vocab, spec: ItemFeatureSpec = ItemFeatureSpec()) -> np.ndarray:
    """The whole public table [len(items), dim] in float32: catalog blocks, then the LLM title block."""
    blocks = [catalog_features(catalog, items)]
    if spec.llm:
        blocks.append(title_features(catalog, items, spec))
    return np.hstack(blocks).astype(np.float32)


def _llm_title_states(titles: list[str], spec: ItemFeatureSpec) -> np.ndarray:
    """Mean hidden state of each title's tokens after the first ``llm_layers`` layers (batched by length)."""
    import torch

    from fed_userllm.models.llm import load_llm

    model, tokenizer = load_llm(spec.llm, device="cpu", dtype=torch.float32)
    body = model.base_model
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if layers is None:
        raise ValueError(f"llm={spec.llm!r}: cannot find its decoder layers (expected .layers or .h)")
    keep = min(spec.llm_layers, len(layers))
    del layers[keep:]  # only the first layers run; the model is discarded afterwards
    tokenizer.padding_side = "right"
    lengths = [len(ids) for ids in tokenizer(titles)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    states = np.zeros((len(titles), model.config.hidden_size), dtype=np.float64)
    batch = 64
    with torch.no_grad():
        for start in tqdm(range(0, len(titles), batch), desc=f"title features ({keep} layers of {spec.llm})",
                          unit="batch", leave=False):
            rows = order[start:start + batch]
            encoded = tokenizer([titles[i] for i in rows], return_tensors="pt", padding=True)
            hidden = body(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            states[rows] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy()
    return states


def _unit_block(block: np.ndarray) -> np.ndarray:
    """Columns standardized (constant columns zeroed), then scaled so rows have mean squared norm 1."""
    std = block.std(0)
    block = np.where(std > 0, (block - block.mean(0)) / np.where(std > 0, std, 1.0), 0.0)
    return block / np.sqrt(max(1, int((std > 0).sum())))


def _with_reserved(block: np.ndarray) -> np.ndarray:
    return np.vstack([np.zeros((NUM_RESERVED, block.shape[1])), block])


@lru_cache(maxsize=2)
def public_item_table(dataset: str, llm: str) -> np.ndarray:
    """The public item features of ``dataset``'s catalog, from the catalog alone (once per process; the LLM
    part is cached on disk)."""
    from fed_userllm.data.datasets import load_catalog
    from fed_userllm.data.sequences import public_vocabularies

    catalog = load_catalog(dataset)
    return public_item_features(catalog, public_vocabularies(catalog)["item"], ItemFeatureSpec(llm=llm))
