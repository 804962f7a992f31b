"""Export a trained AR user encoder to an ExecuTorch .pte (XNNPACK) with a manifest, parity-checked.

``export_encoder`` loads the model from a run, rewrites it with export-friendly ops (`ExportableEncoder`,
same weights), optionally quantizes it to int8, lowers it with ``torch.export`` and the XNNPACK partitioner,
then runs the resulting .pte in the ExecuTorch runtime on the dataset's validation histories and compares
with the eager model. Only an artifact that passes is written (the .pte, then the manifest, each atomically).

int8 (``quantize="int8"``): torchao's dynamic int8 activations with int8 per-channel weights for every
Linear (XNNPACK's dynamically quantized GEMMs) and int8 per-row tables for the embeddings (the runtime's
``embedding_byte`` kernel), so both compute and the dominant item table shrink.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.granularity import PerAxis
from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

from fed_userllm.data import load_sequences
from fed_userllm.data.sequences import RATING_BUCKETS, UserSequences
from fed_userllm.data.vocab import MASK_ID, NUM_RESERVED, PAD_ID, UNK_ID
from fed_userllm.eval.ranking import finalize, ranking_sums, target_ranks
from fed_userllm.export.artifact import FORMAT, MANIFEST_NAME, PTE_NAME, Artifact, sha256_hex
from fed_userllm.export.device import PteEncoder
from fed_userllm.export.graph import ExportableEncoder
from fed_userllm.models import ARUserEncoder, load_pretrained
from fed_userllm.models.layers import CONFIG_FILE
from fed_userllm.rundir import find_encoder
from fed_userllm.runtime import atomic_write_bytes, atomic_write_json

QUANTIZE = (None, "int8")
FLOAT_MAX_ABS_DIFF = 1e-4  # float .pte vs eager, any coordinate of any real event's embedding
INT8_MIN_COSINE = 0.99  # int8 .pte vs eager, every real event's embedding
DERIVABLE = ("item", "genre", "rating")  # features the on-device path derives from movieId and rating


class ParityError(RuntimeError):
    """The exported program does not reproduce the eager model within the stated tolerance."""


def resolve_run(path: str | Path, dataset: str | None = None,
                max_len: int | None = None) -> tuple[Path, str, int | None]:
    """(model folder, dataset, history length) of a run of any kind or of a model folder
    (`fed_userllm.rundir.find_encoder`); ``dataset`` and ``max_len`` override the run's own."""
    source = find_encoder(path)
    dataset = dataset or source.dataset
    if not dataset:
        raise ValueError(f"{path} is a model folder outside a run directory: pass dataset= (the dataset it "
                         "was trained on; its vocabularies go into the manifest)")
    return source.folder, dataset, max_len or source.max_len


def lower(module: ExportableEncoder, quantize: str | None = None, dynamic: bool = True) -> tuple[bytes, dict]:
    """The .pte bytes of ``module`` and its delegation summary; quantizes ``module`` in place for int8.

    ``dynamic``: the sequence dimension is a ``torch.export.Dim`` in 1..max_len (run on the real events
    only); otherwise the program has the fixed length max_len (histories are right-padded to it).
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
    if quantize == "int8":
        quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                  filter_fn=lambda m, _: isinstance(m, nn.Embedding))
        quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                weight_granularity=PerAxis(0)))
    example = torch.full((1, module.max_len, len(module.features)), UNK_ID, dtype=torch.long)
    shapes = {"ids": {1: torch.export.Dim("T", min=1, max=module.max_len)}} if dynamic else None
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    final = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    return final.buffer, delegation_summary(final.exported_program().graph_module)


def delegation_summary(graph: torch.fx.GraphModule) -> dict:
    """How many XNNPACK pieces the final program has and which kernels run outside them (portable ops)."""
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    names = [getattr(n.target, "__name__", str(n.target)) for n in calls]
    undelegated = Counter(n for n in names if n not in ("executorch_call_delegate", "getitem", "alloc"))
    return {"backend": "XnnpackBackend", "partitions": names.count("executorch_call_delegate"),
            "undelegated_ops": dict(sorted(undelegated.items()))}


def manifest_for(model: ARUserEncoder, seq: UserSequences, max_len: int, dynamic: bool, quantize: str | None,
                 program: bytes) -> dict:
    """Everything the device needs besides the runtime (see `fed_userllm.export.device`)."""
    c = model.config
    unknown = [f for f in c.features if f not in DERIVABLE]
    if unknown:
        raise ValueError(f"the model's features {list(c.features)} include {unknown}: the on-device path "
                         f"derives only {list(DERIVABLE)} from movieId and rating")
    genre_ids = {g: i for i, g in enumerate(seq.vocabs["genre"].tokens, start=NUM_RESERVED)}
    primary = {m: genre_ids[g[0]] for m, g in sorted(seq.catalog.genres.items()) if g and g[0] in genre_ids}
    vocabularies = {
        "item": {"source": "movieId", "first_id": NUM_RESERVED,
                 "values": [int(v) for v in seq.vocabs["item"].tokens]},
        "genre": {"source": "primary (first listed) genre of movieId", "first_id": NUM_RESERVED,
                  "values": list(seq.vocabs["genre"].tokens),
                  "by_movie": {"movie_ids": list(primary), "ids": list(primary.values())}},
        "rating": {"source": "rating bucket: ceil(rating) clipped to the values (half stars round up)",
                   "first_id": NUM_RESERVED, "values": [int(v) for v in seq.vocabs["rating"].tokens]},
    }
    if vocabularies["rating"]["values"] != list(RATING_BUCKETS):
        raise ValueError(f"rating vocabulary {vocabularies['rating']['values']}: expected "
                         f"{list(RATING_BUCKETS)}")
    return {
        "format": FORMAT,
        "model": {"file": PTE_NAME, "sha256": sha256_hex(program), "bytes": len(program)},
        "features": list(c.features),
        "input": {"name": "ids", "dtype": "int64", "shape": [1, "T", len(c.features)],
                  "layout": "feature ids per event, columns in `features` order"},
        "output": {"dtype": "float32", "shape": [1, "T", model.state_dim],
                   "meaning": "one user embedding per event; row t depends on events <= t only"},
        "embedding_dim": model.state_dim,
        "dtype": "float32",
        "weights": "int8" if quantize else "float32",
        "quantization": None if quantize is None else {
            "linear": "int8 dynamic per-token activations, int8 symmetric per-channel weights "
                      "(torchao Int8DynamicActivationIntxWeightConfig, XNNPACK)",
            "embedding": "int8 symmetric per-row tables (torchao IntxWeightOnlyConfig, embedding_byte)"},
        "sequence": {"max_len": max_len, "min_len": 1 if dynamic else max_len, "dynamic": dynamic,
                     "padding": "right", "pad_id": PAD_ID,
                     "order": "events sorted by timestamp (stable), the last max_len kept; pad to min_len"},
        "reserved_ids": {"PAD": PAD_ID, "UNK": UNK_ID, "MASK": MASK_ID},
        "vocabularies": vocabularies,
        "versions": {pkg: version(pkg) for pkg in ("executorch", "torch", "torchao")},
    }


def parity(model: ARUserEncoder, encoder: PteEncoder, seq: UserSequences, users: np.ndarray) -> dict:
    """Eager vs .pte embeddings on the users' validation histories, and Recall@10 / NDCG@10 of both.

    Both rankings use the eager model's item scores of the last event's embedding (the tied item head and the
    seen offset), so the drop measures what the exported embedding loses for next-item prediction, nothing else.
    """
    batch = seq.eval_batch(users, "val")
    lengths = batch["mask"].sum(1).tolist()
    ids = torch.stack([batch[f] for f in model.config.features], dim=-1).numpy()
    with torch.no_grad():
        eager = model.encode({k: batch[k] for k in (*model.config.features, "mask")})
    diffs, cosines, last_eager, last_pte = [], [], [], []
    for row, n in enumerate(lengths):
        ref = eager[row, :n]
        out = torch.from_numpy(encoder(ids[row, :n]))
        diffs.append(float((out - ref).abs().max()))
        cosines.append(torch.nn.functional.cosine_similarity(out, ref, dim=-1))
        last_eager.append(ref[-1])
        last_pte.append(out[-1])
    cosines = torch.cat(cosines)

    def ranking(last: list[torch.Tensor]) -> dict:
        with torch.no_grad():
            scores = model.next_item_scores(torch.stack(last), batch)
        return finalize(ranking_sums(target_ranks(scores, batch["target_item"])))

    eager_rank, pte_rank = ranking(last_eager), ranking(last_pte)
    return {"users": len(users), "events": int(sum(lengths)), "max_abs_diff": max(diffs),
            "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
            "recall@10_eager": eager_rank["recall@10"], "recall@10_pte": pte_rank["recall@10"],
            "recall@10_drop": eager_rank["recall@10"] - pte_rank["recall@10"],
            "ndcg@10_eager": eager_rank["ndcg@10"], "ndcg@10_pte": pte_rank["ndcg@10"]}


def check_parity(report: dict, quantize: str | None) -> None:
    if quantize is None and not report["max_abs_diff"] <= FLOAT_MAX_ABS_DIFF:
        raise ParityError(f"float .pte differs from the eager model by {report['max_abs_diff']:.3g} "
                          f"(> {FLOAT_MAX_ABS_DIFF}) on validation histories; nothing was written")
    if quantize == "int8" and not report["min_cosine"] >= INT8_MIN_COSINE:
        raise ParityError(f"int8 .pte embeddings reach cosine {report['min_cosine']:.4f} with the eager "
                          f"model (< {INT8_MIN_COSINE}) on validation histories; nothing was written")


def export_encoder(run_dir: str | Path, out_dir: str | Path, quantize: str | None = None, *,
                   dataset: str | None = None, max_len: int | None = None, dynamic: bool = True,
                   parity_users: int = 1000, seed: int = 0) -> dict:
    """Export the run's AR encoder to ``out_dir`` (encoder.pte + manifest.json); returns the manifest.

    ``max_len`` (the longest on-device history) defaults to the run's, i.e. the evaluation history length.
    Parity runs on the validation histories of up to ``parity_users`` users (a seeded sample); a failed
    check raises `ParityError` and leaves ``out_dir`` untouched.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
    start = time.time()
    folder, dataset, max_len = resolve_run(run_dir, dataset, max_len)
    model = load_pretrained(folder, "cpu")
    if not isinstance(model, ARUserEncoder):
        raise ValueError(f"{folder} holds a {type(model).__name__}: export supports the autoregressive "
                         "encoder (model_type 'ar_encoder'), whose per-event embeddings are causal")
    max_len = max_len or model.config.max_len - 1  # training windows are the history length + 1
    seq = load_sequences(dataset, max_len=max_len)
    sizes = {f: seq.vocab_sizes[f] for f in model.config.features if f in seq.vocab_sizes}
    if sizes != model.config.vocab_sizes:
        raise ValueError(f"dataset {dataset!r} has vocabulary sizes {sizes}, the model "
                         f"{model.config.vocab_sizes}: it was trained on other data")
    program, delegation = lower(ExportableEncoder(model, max_len), quantize, dynamic)
    manifest = manifest_for(model, seq, max_len, dynamic, quantize, program)
    encoder = PteEncoder(Artifact(Path(out_dir), manifest, program))
    rng = np.random.default_rng(seed)
    users = np.sort(rng.permutation(seq.num_users)[:parity_users])
    report = parity(model, encoder, seq, users)
    check_parity(report, quantize)
    manifest.update({
        "delegation": delegation,
        "parity": {**report, "thresholds": {"float_max_abs_diff": FLOAT_MAX_ABS_DIFF,
                                            "int8_min_cosine": INT8_MIN_COSINE}},
        "source": {"run_dir": str(Path(run_dir).resolve()), "model_dir": str(folder.resolve()),
                   "model_sha256": sha256_hex((folder / "model.safetensors").read_bytes()),
                   "dataset": dataset, "model_type": model.model_type,
                   "config": json.loads((folder / CONFIG_FILE).read_text())},
        "export_seconds": round(time.time() - start, 2),
    })
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / PTE_NAME, program)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest
