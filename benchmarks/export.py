"""Benchmark: the on-device encoder (.pte, XNNPACK) vs eager PyTorch and ONNX Runtime on the same weights.

    python benchmarks/export.py [--run RUN_DIR] [--out runs/bench-export] [--runs 400]

Without ``--run`` it first trains a quick SASRec-sized AR encoder (d=128, 4 layers, 4 heads, history 50) on
ml-latest-small for one epoch: latency and size depend on the graph, not on how well it is trained.
Exports float (dynamic length), float (fixed length, padded) and int8 artifacts, then times one embedding
of a full 50-event history (and of a 10-event one) with 1 and 2 threads. Engines are timed in interleaved
rounds so that load from other processes hits them alike; each figure is the median over all runs.
ONNX Runtime runs the same export-friendly graph (`ExportableEncoder`), exported to ONNX for comparison only.
Prints one JSON object (also written to OUT/export.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import warnings
from pathlib import Path

import executorch.extension.pybindings.portable_lib as executorch_runtime
import numpy as np
import onnxruntime as ort
import torch

from fed_userllm.data import load_sequences
from fed_userllm.export.artifact import load_artifact
from fed_userllm.export.build import export_encoder, resolve_run
from fed_userllm.export.device import PteEncoder
from fed_userllm.export.graph import ExportableEncoder
from fed_userllm.models import load_pretrained
from fed_userllm.rundir import RunDir
from fed_userllm.runtime import atomic_write_json
from fed_userllm.train.centralized import pretrain
from fed_userllm.train.pretrain_config import PretrainConfig

VARIANTS = {"pte_float": {"quantize": None, "dynamic": True},
            "pte_float_fixed_len": {"quantize": None, "dynamic": False},
            "pte_int8": {"quantize": "int8", "dynamic": True}}


def quick_run(out: Path, dataset: str) -> Path:
    config = PretrainConfig(dataset=dataset, max_len=50, d_model=128, n_layers=4, n_heads=4, epochs=1,
                            batch_size=64, device="cpu")
    pretrain(config, out / "encoder", resume=RunDir(out / "encoder").exists(), progress=False)
    return out / "encoder"


def onnx_session(module: ExportableEncoder, example: torch.Tensor, threads: int) -> ort.InferenceSession:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["ids"], output_names=["emb"],
                          dynamic_axes={"ids": {1: "T"}, "emb": {1: "T"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def timed(engines: dict, runs: int, rounds: int = 8) -> dict[str, float]:
    """Median milliseconds per call of each engine, timed in interleaved rounds after a warm-up."""
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for fn in engines.values():
        for _ in range(10):
            fn()
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: round(float(np.median(s)) * 1e3, 4) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a training run (default: train a quick encoder)")
    parser.add_argument("--dataset", default="ml-latest-small", help="for the quick encoder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-export"))
    parser.add_argument("--runs", type=int, default=400, help="timed calls per engine and setting")
    args = parser.parse_args()
    run = args.run or quick_run(args.out, args.dataset)

    export_seconds, manifests = {}, {}
    for name, settings in VARIANTS.items():
        start = time.time()
        manifests[name] = export_encoder(run, args.out / name, **settings)
        export_seconds[name] = round(time.time() - start, 1)

    folder, dataset, max_len = resolve_run(run)
    model = load_pretrained(folder)
    seq = load_sequences(dataset, max_len=max_len or model.config.max_len - 1)
    full = int(np.argmax(seq.lengths()))  # a user whose validation history fills the window
    batch = seq.eval_batch(np.array([full]), "val")
    features = model.config.features
    ids = torch.stack([batch[f] for f in features], dim=-1)  # [1, 50, F], all real
    exportable = ExportableEncoder(model, ids.shape[1])

    def engines(n: int, session: ort.InferenceSession, encoders: dict) -> dict:
        eager_batch = {f: batch[f][:, :n] for f in features} | {"mask": batch["mask"][:, :n]}
        sample, feed = ids[0, :n].numpy(), {"ids": ids[:, :n].numpy()}

        def eager() -> None:
            with torch.no_grad():
                model.encode(eager_batch)

        return {"eager_pytorch": eager, "onnxruntime_fp32": lambda: session.run(None, feed),
                **{name: (lambda e=e: e(sample)) for name, e in encoders.items()}}

    latency = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        # XNNPACK programs keep the thread pool they were loaded with: resize it first, then load them
        executorch_runtime._unsafe_reset_threadpool(threads)
        encoders = {name: PteEncoder(load_artifact(args.out / name)) for name in VARIANTS}
        session = onnx_session(exportable, ids, threads)
        for n in (ids.shape[1], 10):
            key = f"{threads}_thread{'s' * (threads > 1)}_{n}_events"
            latency[key] = timed(engines(n, session, encoders), args.runs)
        del encoders

    sizes = {name: m["model"]["bytes"] for name, m in manifests.items()}
    one = latency[f"1_thread_{ids.shape[1]}_events"]
    result = {
        "model": {"run": str(run), "dataset": dataset, "d_model": model.config.d_model,
                  "n_layers": model.config.n_layers, "n_heads": model.config.n_heads, "max_len": ids.shape[1],
                  "item_vocab": model.config.vocab_sizes["item"],
                  "parameters": sum(p.numel() for p in model.parameters())},
        "pte_bytes": sizes,
        "int8_size_ratio": round(sizes["pte_int8"] / sizes["pte_float"], 3),
        "latency_ms_median": latency,
        "export_seconds": export_seconds,
        "delegation": {name: m["delegation"] for name, m in manifests.items()},
        "parity": {name: {k: m["parity"][k] for k in ("users", "max_abs_diff", "min_cosine", "mean_cosine",
                                                       "recall@10_eager", "recall@10_pte", "recall@10_drop")}
                   for name, m in manifests.items()},
        "goals": {
            "float_pte_not_slower_than_ort_1_thread": one["pte_float"] <= one["onnxruntime_fp32"],
            "int8_pte_at_most_0.6x_ort_1_thread": one["pte_int8"] <= 0.6 * one["onnxruntime_fp32"],
            "int8_size_at_most_0.4x_float": sizes["pte_int8"] <= 0.4 * sizes["pte_float"],
            "int8_min_cosine_at_least_0.999": manifests["pte_int8"]["parity"]["min_cosine"] >= 0.999,
        },
        "load_average_1m": round(os.getloadavg()[0], 2),
        "runs_per_figure": args.runs,
    }
    atomic_write_json(args.out / "export.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
