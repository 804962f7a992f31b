"""fed-userllm: federated, differentially private, on-device User-LLM."""

__version__ = "0.1.0"
