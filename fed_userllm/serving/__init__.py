"""HTTP serving of a User-LLM: a frozen LLM answers requests contextualized by on-device user embeddings.

`config` (limits, torch-free), `model` (the loaded model that takes precomputed encoder states), `batching`
(dynamic batching), `schema` (request and response bodies), `metrics` (Prometheus), `api` (the FastAPI app
and the server).
"""
