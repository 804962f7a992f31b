"""HTTP serving of a User-LLM: a frozen LLM answers requests contextualized by on-device user embeddings.

`config` (the server's limits, torch-free), `model` (the loaded model, which takes precomputed encoder states),
`batching` (dynamic batching), `schema` (request and response bodies), `validation` (requests to jobs),
`metrics` (Prometheus), `api` (the FastAPI app), `server` (running it with uvicorn).
"""
