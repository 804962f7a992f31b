"""Benchmark: HTTP serving throughput and latency, one request at a time vs dynamic batching.

    python benchmarks/serving.py [--model RUN_DIR] [--out runs/bench-serving] [--clients 1,4,16]

A bounded closed-loop load test on loopback: C client threads send requests back to back until C x
``--requests-per-client`` requests are answered (free generation, greedy, at most ``--max-new-tokens`` new
tokens, each request a different user's 50-event embedding). The same loaded model is served twice:
``max_batch_size=1`` (no batching) and ``--max-batch`` (dynamic batching). Reports requests/s, tokens/s,
p50/p95 latency and the mean batch size the server formed; prints one JSON object and writes serving.json
and serving.png to ``--out``.

Without ``--model`` the model is built in memory: the embedded SmolLM2-135M-Instruct (or ``--llm``) wrapped
as an untrained cross-attention UserLLM (the default UserLLMConfig), fed by a randomly initialised AR encoder
over ml-latest-small. Untrained weights cost exactly what trained ones do, so the timings hold for a real run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import httpx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fed_userllm.data import load_sequences  # noqa: E402
from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig  # noqa: E402
from fed_userllm.models.llm import load_llm  # noqa: E402
from fed_userllm.models.userllm import UserLLM, UserLLMConfig  # noqa: E402
from fed_userllm.runtime import atomic_write_json, set_threads  # noqa: E402
from fed_userllm.serving.api import create_app  # noqa: E402
from fed_userllm.serving.config import ServingConfig  # noqa: E402
from fed_userllm.serving.model import PrecomputedStates, ServedModel, catalogs, encoder_weights_hash  # noqa: E402
from fed_userllm.serving.server import BackgroundServer  # noqa: E402

DATASET = "ml-latest-small"
HISTORY = 50
PROMPTS = [
    "Suggest a movie for tonight.",
    "What kind of films do I seem to enjoy?",
    "Recommend something similar to what I watched recently.",
    "Describe my taste in movies in one sentence.",
]


def demo_model(out: Path, llm: str | None) -> tuple[ServedModel, list[torch.Tensor]]:
    """An untrained UserLLM over the real LLM, plus encoder outputs of real ml-latest-small histories."""
    seq = load_sequences(DATASET, max_len=HISTORY)
    torch.manual_seed(0)
    encoder = ARUserEncoder(ARUserEncoderConfig(vocab_sizes=seq.vocab_sizes, max_len=HISTORY + 1)).eval()
    encoder.save_pretrained(out / "demo-encoder")
    base, tokenizer = load_llm(llm, device="cpu")
    model = UserLLM(UserLLMConfig(llm=llm), PrecomputedStates(encoder.state_dim), base)
    served = ServedModel(model, tokenizer, encoder_weights_hash(out / "demo-encoder"), encoder.config.max_len,
                         catalogs(seq), source=f"demo: {llm or 'smollm2'} + untrained AR encoder / xattn")
    users = np.arange(min(64, seq.num_users))
    starts, ends = seq.offsets[users], seq.target_index(users, "test")
    batch = seq.gather(np.maximum(starts, ends - HISTORY), ends, HISTORY)
    with torch.no_grad():
        states = encoder.encode(batch)
    return served, [s[: int(m.sum())] for s, m in zip(states, batch["mask"], strict=True)]


def request_bodies(served: ServedModel, states: list[torch.Tensor], max_new_tokens: int) -> list[bytes]:
    """Pre-serialised request bodies (the clients measure the server, not JSON encoding)."""
    def body(i: int, s: torch.Tensor) -> dict:
        user = {"embeddings": s.tolist(), "shape": list(s.shape), "dtype": "float32",
                "encoder_hash": served.encoder_hash}
        return {"user": user, "task": "free", "prompt": PROMPTS[i % len(PROMPTS)],
                "max_new_tokens": max_new_tokens}

    return [json.dumps(body(i, s)).encode() for i, s in enumerate(states)]


def load_test(url: str, bodies: list[bytes], clients: int, total: int) -> dict:
    """Closed loop: ``clients`` threads each send a request as soon as their previous one is answered."""
    counter, lock = itertools.count(), threading.Lock()
    latencies, tokens, failures = [], [], []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600, headers={"Content-Type": "application/json"}) as http:
            while (i := next(counter)) < total:
                start = time.perf_counter()
                r = http.post("/v1/generate", content=bodies[i % len(bodies)])
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                        tokens.append(r.json()["tokens"])
                    else:
                        failures.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed with status {sorted(set(failures))}")
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": total, "seconds": round(wall, 2),
            "req_per_s": round(total / wall, 3), "tokens_per_s": round(sum(tokens) / wall, 1),
            "mean_new_tokens": round(float(np.mean(tokens)), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1)}


def batches(url: str) -> tuple[float, float]:
    """(model calls, requests they answered) so far, from the server's Prometheus metrics."""
    samples = {s.name: s.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for s in family.samples}
    return samples["fed_userllm_batch_size_count"], samples["fed_userllm_batch_size_sum"]


def measure(url: str, bodies: list[bytes], clients: int, total: int) -> dict:
    """One load test plus the mean batch size the server formed during it (from /metrics)."""
    calls, answered = batches(url)
    row = load_test(url, bodies, clients, total)
    calls_after, answered_after = batches(url)
    return row | {"mean_batch_size": round((answered_after - answered) / (calls_after - calls), 2)}


def plot(result: dict, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in result["modes"].items():
        clients = [r["clients"] for r in rows]
        ax1.plot(clients, [r["req_per_s"] for r in rows], marker="o", label=label)
        ax2.plot(clients, [r["p95_ms"] / 1000 for r in rows], marker="o", label=label)
    for ax, ylabel in ((ax1, "requests / s"), (ax2, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["clients"], [str(c) for c in result["clients"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"fed-userllm serving: {result['model']}\n<= {result['max_new_tokens']} new tokens, "
                 f"{result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="contextualization run dir (default: the in-memory demo model)")
    parser.add_argument("--llm", default=None, help="LLM of the demo model (default: embedded SmolLM2)")
    parser.add_argument("--out", default="runs/bench-serving")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",")]

    start = time.time()
    if args.model:  # the cost does not depend on the values: unit-scale states, like the encoder's LayerNorm
        served = ServedModel.load(args.model, device="cpu")
        shape = (64, min(HISTORY, served.max_len), served.state_dim)
        states = list(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    else:
        served, states = demo_model(out, args.llm)
    bodies = request_bodies(served, states, args.max_new_tokens)
    info = served.info()
    result = {
        "model": info["source"], "llm": info["llm"] or "smollm2", "integration": info["integration"],
        "device": info["device"], "llm_dtype": info["llm_dtype"], "history_events": HISTORY,
        "max_new_tokens": args.max_new_tokens, "max_wait_ms": args.max_wait_ms, "clients": clients,
        "requests_per_client": args.requests_per_client, "torch_threads": torch.get_num_threads(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "modes": {},
        "load_seconds": round(time.time() - start, 1),
    }
    modes = {"one at a time": 1, f"batched (max {args.max_batch})": args.max_batch}
    with contextlib.ExitStack() as stack:  # both servers share the loaded model; one load test runs at a time
        urls = {}
        for label, max_batch in modes.items():
            config = ServingConfig(max_batch_size=max_batch, max_wait_ms=args.max_wait_ms,
                                   max_new_tokens=args.max_new_tokens)
            urls[label] = stack.enter_context(BackgroundServer(create_app(served, config))).url
            load_test(urls[label], bodies, 1, 2)  # warm-up
            result["modes"][label] = []
        for c in clients:  # modes interleaved per level, so drifting machine load hits both alike
            for label, url in urls.items():
                row = measure(url, bodies, c, c * args.requests_per_client)
                row = {"max_batch_size": modes[label], **row}
                result["modes"][label].append(row)
                print(json.dumps(row), flush=True)
    single, batched = result["modes"].values()
    result["speedup_req_per_s"] = {str(a["clients"]): round(b["req_per_s"] / a["req_per_s"], 2)
                                   for a, b in zip(single, batched, strict=True)}
    atomic_write_json(out / "serving.json", result)
    plot(result, out / "serving.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
